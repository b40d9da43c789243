// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "contree-pipeline",
    products: [
        .executable(name: "contree-pipeline", targets: ["contree-pipeline"]),
        .executable(name: "contree-init", targets: ["contree-init"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-crypto", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.0.0"),
        // traits: [] skips swift-configuration and full-Foundation extras the server does not use.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        // Already in the graph through Hummingbird; named because the server imports them.
        .package(url: "https://github.com/apple/swift-http-types", from: "1.0.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.5.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.0.0"),
    ],
    targets: [
        // System library over Debian's libsqlite3 (libsqlite3-dev).
        .systemLibrary(
            name: "CSQLite", path: "Sources/CSQLite", pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]),
        // The C launcher (clone to exec) and the libseccomp policy (libseccomp-dev).
        .target(name: "CSandbox", linkerSettings: [.linkedLibrary("seccomp")]),
        // Pid 1 of every container sandbox: a small static C program (see its header comment).
        .executableTarget(
            name: "contree-init", path: "Sources/contree-init",
            // Static: the linker driver adds the Swift runtime, and loading it dynamically costs
            // 1.4 ms per exec; linked statically the exec costs what a static C program does.
            linkerSettings: [.unsafeFlags(["-static-executable"])]),
        // Pid 1 of every VM guest (its initramfs's /init): a small static C program.
        .executableTarget(
            name: "contree-agent", path: "Sources/contree-agent",
            linkerSettings: [.unsafeFlags(["-static-executable"])]),
        .target(
            name: "Sandbox",
            dependencies: [
                "CSandbox", "CSQLite", "contree-init",
                .product(name: "Crypto", package: "swift-crypto"),
            ]),
        // The VM backend: QEMU microvm guests over the same store (Debian's kernel, an initramfs
        // with the agent, layers as erofs disks).
        .target(name: "VirtualMachine", dependencies: ["Sandbox", "contree-agent"]),
        // YAML pipelines: model with source positions, validation, planning, step keys, the
        // scheduler, artifacts and reports. Knows nothing of HTTP.
        .target(
            name: "Pipeline",
            dependencies: [
                "Sandbox",
                .product(name: "Yams", package: "Yams"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]),
        // OCI distribution: images from registries (FoundationNetworking, the toolchain's URLSession).
        .target(name: "Registry", dependencies: ["Sandbox"]),
        // A registry repository as a pipeline step cache shared by many stores (`run --cache-to/--cache-from`).
        .target(name: "RegistryCache", dependencies: ["Pipeline", "Registry"]),
        // The ConTree /v1 REST API over the engine (Hummingbird), so the official clients work.
        .target(
            name: "ContreeServer",
            dependencies: [
                "Sandbox", "Registry",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]),
        .executableTarget(
            name: "contree-pipeline",
            dependencies: [
                "Sandbox", "Pipeline", "ContreeServer", "Registry", "RegistryCache", "VirtualMachine",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .executableTarget(
            name: "contree-bench", dependencies: ["Sandbox", "ContreeServer", "Registry", "VirtualMachine"],
            path: "bench/Sources/contree-bench"),
        // What several test targets need: a loopback registry, scratch directories.
        .target(name: "ContreeTestSupport", dependencies: ["Sandbox"], path: "Tests/ContreeTestSupport"),
        .testTarget(name: "SandboxTests", dependencies: ["Sandbox", "Registry", "ContreeTestSupport"]),
        .testTarget(
            name: "PipelineTests",
            dependencies: ["Pipeline", "Sandbox", "Registry", "RegistryCache", "ContreeTestSupport"]),
        .testTarget(name: "ContreeServerTests", dependencies: ["ContreeServer", "Sandbox", "ContreeTestSupport"]),
        .testTarget(name: "VirtualMachineTests", dependencies: ["VirtualMachine", "Sandbox", "Pipeline"]),
    ],
    swiftLanguageModes: [.v6]
)
