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
        // The frames between the VM host and its agent: one C header both sides include.
        .target(name: "CAgentProtocol"),
        // Pid 1 of every VM guest (its initramfs's /init): a small static C program.
        .executableTarget(
            name: "contree-agent", dependencies: ["CAgentProtocol"], path: "Sources/contree-agent",
            linkerSettings: [.unsafeFlags(["-static-executable"])]),
        // The layers of the engine, each depending only on those above it here.
        // System basics: calls by descriptor, child processes, cgroups, digests, the blocking
        // pool, cancellation, tracing, the one error type.
        .target(
            name: "SystemSupport",
            dependencies: ["CSandbox", .product(name: "Crypto", package: "swift-crypto")]),
        // Image formats: the tar stream, layers (archive, extract, flatten, read a stack), OCI JSON.
        .target(name: "ImageFormats", dependencies: ["SystemSupport"]),
        // The store: SQLite, images, layers, tags, runs, leases, pins, snapshots, gc, fsck,
        // OCI layout import and export.
        .target(name: "ImageStore", dependencies: ["SystemSupport", "ImageFormats", "CSQLite"]),
        // The sandbox: run specs, the engine, the isolation protocol, the container backend,
        // the built-in images.
        .target(
            name: "Sandbox",
            dependencies: ["SystemSupport", "ImageFormats", "ImageStore", "CSandbox", "contree-init"]),
        // The VM backend: QEMU microvm guests over the same store (Debian's kernel, an initramfs
        // with the agent, layers as erofs disks).
        .target(
            name: "VirtualMachine",
            dependencies: [
                "SystemSupport", "ImageFormats", "ImageStore", "Sandbox", "CSandbox", "CAgentProtocol", "contree-agent",
            ]),
        // Live sandboxes: VMs that keep running between commands, their memory snapshots and
        // forks, recorded in the store.
        .target(
            name: "LiveSandbox",
            dependencies: ["SystemSupport", "ImageFormats", "ImageStore", "Sandbox", "VirtualMachine"]),
        // YAML pipelines: model with source positions, validation, planning, step keys, the
        // scheduler, artifacts and reports. Knows nothing of HTTP.
        .target(
            name: "Pipeline",
            dependencies: [
                "SystemSupport", "ImageFormats", "ImageStore", "Sandbox", "Telemetry",
                .product(name: "Yams", package: "Yams"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]),
        // OpenTelemetry traces of pipeline runs: OTLP over HTTP, protobuf written by hand (a
        // handful of fields; swift-otel would bring NIO and gRPC into every build).
        .target(name: "Telemetry", dependencies: ["HTTPClient"]),
        // libcurl, loaded with dlopen when a request is first made: linked, it and the ~30
        // libraries it needs cost every process of this program ~3 ms of dynamic linking.
        .target(name: "CCurl", linkerSettings: [.linkedLibrary("dl")]),
        // HTTP requests (the registry client, the trace exporter) over CCurl; redirects are
        // answered, never followed, so each caller keeps its own policy.
        .target(name: "HTTPClient", dependencies: ["CCurl"]),
        // OCI distribution: images from registries and to them (HTTPClient).
        .target(
            name: "Registry", dependencies: ["SystemSupport", "ImageFormats", "ImageStore", "Sandbox", "HTTPClient"]),
        // A registry repository as a pipeline step cache shared by many stores (`run --cache-to/--cache-from`).
        .target(
            name: "RegistryCache", dependencies: ["SystemSupport", "ImageStore", "Sandbox", "Pipeline", "Registry"]),
        // Steps on a cluster scheduler (Slurm): the coordinator's executor (one srun per missed
        // step) and the node's `step --spec -`, with snapshots moving through a registry.
        .target(
            name: "Cluster",
            dependencies: [
                "SystemSupport", "CSandbox", "ImageStore", "Sandbox", "Pipeline", "Registry", "RegistryCache",
            ]),
        // The ConTree /v1 REST API over the engine (Hummingbird), so the official clients work.
        .target(
            name: "ContreeServer",
            dependencies: [
                "SystemSupport", "ImageFormats", "ImageStore", "Sandbox", "Registry",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]),
        .executableTarget(
            name: "contree-pipeline",
            dependencies: [
                "SystemSupport", "ImageFormats", "ImageStore", "Sandbox", "Pipeline", "ContreeServer", "Registry",
                "RegistryCache", "VirtualMachine", "LiveSandbox", "Cluster",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .executableTarget(
            name: "contree-bench",
            dependencies: [
                "SystemSupport", "ImageStore", "Sandbox", "Registry", "VirtualMachine", "ContreeTestSupport",
            ],
            path: "bench/Sources/contree-bench"),
        // What the tests and the benchmarks share: paths, the root trait, a serve child process,
        // a loopback HTTP client. Not part of the product.
        .target(name: "ContreeTestSupport", dependencies: ["SystemSupport"], path: "Tests/ContreeTestSupport"),
        .testTarget(
            name: "SandboxTests",
            dependencies: ["SystemSupport", "ImageFormats", "ImageStore", "Sandbox", "Registry", "ContreeTestSupport"]),
        .testTarget(
            name: "PipelineTests",
            dependencies: [
                "SystemSupport", "ImageFormats", "ImageStore", "Sandbox", "Pipeline", "Registry", "RegistryCache",
                "ContreeTestSupport",
            ]),
        .testTarget(
            name: "ClusterTests",
            dependencies: [
                "SystemSupport", "ImageStore", "Sandbox", "Pipeline", "Registry", "RegistryCache", "Cluster",
                "ContreeTestSupport",
            ]),
        .testTarget(
            name: "ContreeServerTests", dependencies: ["ContreeServer", "SystemSupport", "ContreeTestSupport"]),
        .testTarget(
            name: "VirtualMachineTests",
            dependencies: [
                "SystemSupport", "ImageStore", "Sandbox", "VirtualMachine", "LiveSandbox", "Pipeline",
                "ContreeTestSupport",
            ]),
    ],
    swiftLanguageModes: [.v6]
)
