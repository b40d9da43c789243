// contree-bench oci: debian:bookworm (built here, exported, pushed with skopeo into Debian's
// docker-registry on loopback) imported into a fresh store (cold) and into the same store
// again (warm), against `skopeo copy docker://… oci:DIR` plus `umoci unpack` doing the same
// job, side by side in one run. Then a registry as a shared step cache: a 10-step pipeline
// run cold in one store, pushed with --cache-to, and run in a fresh store with --cache-from.
import Foundation
import Glibc
import ImageStore
import Registry
import Sandbox
import SystemSupport

struct OCIBench {
    let home: String
    let rounds: Int
    let cli: String

    func measure() async throws {
        let work = home + "/oci-bench"
        try? FileSystem.removeTree(work)
        try FileSystem.makeDirectories(work + "/registry")
        // The image: the bench store's debian:bookworm (built once, kept between runs).
        let store = try Store(root: home)
        let debian = try BaseImages(store: store).resolve("debian:bookworm")
        try OCIExporter(store: store).export(debian, to: "oci:\(work)/layout:bookworm")

        let port = 21000 + Int.random(in: 0..<9000)
        try FileSystem.writeFile(
            work + "/registry/config.yml",
            Array(
                "version: 0.1\nlog: {level: error}\nstorage: {filesystem: {rootdirectory: \(work)/registry/data}}\nhttp: {addr: 127.0.0.1:\(port)}\n"
                    .utf8))
        let registry = try ChildProcess.spawn(
            // Its log goes to a file: a pipe nobody reads would fill and stall the registry.
            ["sh", "-c", "exec docker-registry serve \"$0/config.yml\" 2>>\"$0/registry.log\"", work + "/registry"],
            captureStdout: false,
            stdoutFD: open("/dev/null", O_WRONLY | O_CLOEXEC))
        defer {
            kill(registry.pid, SIGTERM)
            _ = try? ChildProcess.wait(registry.pid, "docker-registry")
            close(registry.stderr)
        }
        let reference = "docker://127.0.0.1:\(port)/bench/debian:bookworm"
        var pushed = false
        for _ in 0..<100 where !pushed {
            usleep(50_000)
            pushed =
                (try? ChildProcess.run([
                    "skopeo", "copy", "--dest-tls-verify=false", "oci:\(work)/layout:bookworm", reference,
                ]))?.succeeded ?? false
        }
        guard pushed else { throw SandboxError(.childProcess, "could not push debian:bookworm to the local registry") }
        print(
            "OCI import of debian:bookworm (\(Format.size(debian.size)), gzip layers) from a registry on loopback, \(rounds) rounds"
        )

        var coldOurs: [Double] = []
        var warmOurs: [Double] = []
        var coldPeer: [Double] = []
        var warmPeer: [Double] = []
        for round in 0..<rounds {
            let target = "\(work)/store-\(round)"
            let fresh = try Store(root: target)
            let importer = RegistryImporter(store: fresh)
            var start = now()
            let image = try importer.importImage(reference)
            coldOurs.append(now() - start)
            start = now()
            let again = try importer.importImage(reference)
            warmOurs.append(now() - start)
            guard again.uuid == image.uuid else { throw SandboxError(.corrupt, "a warm import made a new image") }
            try? FileSystem.removeTree(target)

            let layout = "\(work)/peer-\(round)"
            coldPeer.append(
                try timed(["skopeo", "copy", "--src-tls-verify=false", reference, "oci:\(layout):bookworm"])
                    + timed(["umoci", "unpack", "--image", "\(layout):bookworm", "\(layout)-bundle"]))
            try? FileSystem.removeTree(layout + "-bundle")
            warmPeer.append(
                try timed(["skopeo", "copy", "--src-tls-verify=false", reference, "oci:\(layout):bookworm"])
                    + timed(["umoci", "unpack", "--image", "\(layout):bookworm", "\(layout)-bundle"]))
            try? FileSystem.removeTree(layout)
            try? FileSystem.removeTree(layout + "-bundle")
        }
        print(pad("", 30) + pad("contree-pipeline", 18) + pad("skopeo + umoci", 18) + "ratio")
        for (name, ours, peer) in [
            ("cold (empty store)", coldOurs, coldPeer), ("warm (image known)", warmOurs, warmPeer),
        ] {
            print(
                pad(name, 30) + pad(ms(median(ours)), 18) + pad(ms(median(peer)), 18)
                    + String(format: "%.2f", median(ours) / median(peer)))
        }
        Summary.record(.ociImport, median(coldOurs), peer: median(coldPeer))
        try sharedCache(work: work, port: port)
    }

    /// The work of each of the 10 steps: some shell arithmetic and 4 MiB of new files (a layer
    /// worth moving).
    func step(_ i: Int) -> String {
        "i=0; while [ $i -lt 60000 ]; do i=$((i+1)); done; dd if=/dev/urandom of=f\(i) bs=1M count=4 2>/dev/null"
    }

    func pipeline(salt: String) -> String {
        var yaml = "name: bench-shared\nimage: busybox\nenv: {SALT: \(salt)}\nsteps:\n"
        for i in 1...10 { yaml += "  - id: s\(i)\n    run: \(step(i))\n" }
        return yaml
    }

    func containerfile(salt: String) -> String {
        var text = "FROM scratch\nADD rootfs.tar /\nWORKDIR /workspace\n"
        for i in 1...10 { text += "RUN \(step(i)) # \(salt)\n" }
        return text
    }

    /// Runs the CLI with the store at `home`; returns the wall time and the report.
    func run(_ arguments: [String], home: String) throws -> (seconds: Double, hits: Int, err: String) {
        let env =
            ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=\(home)"]
        let start = now()
        let result = try ChildProcess.run([cli] + arguments + ["--json"], environment: env)
        let seconds = now() - start
        guard result.succeeded else { throw SandboxError(.childProcess, "\(arguments) failed: \(result.stderrText)") }
        let report = try JSONSerialization.jsonObject(with: Data(result.stdout)) as? [String: Any]
        let steps = report?["steps"] as? [[String: Any]] ?? []
        return (seconds, steps.filter { $0["cached"] as? Bool == true }.count, result.stderrText)
    }

    /// `buildah build --layers` with extra arguments in a fresh storage root; returns its wall time.
    func buildah(_ arguments: [String], context: String, root: String) throws -> Double {
        defer {
            _ = try? ChildProcess.run(
                ["buildah", "--root", root, "--runroot", root + "-run", "--storage-driver", "overlay", "rm", "--all"])
            _ = try? ChildProcess.run(["umount", "-R", root + "/overlay"])
            try? FileSystem.removeTree(root)
            try? FileSystem.removeTree(root + "-run")
        }
        let start = now()
        let result = try ChildProcess.run(
            [
                "buildah", "--root", root, "--runroot", root + "-run", "--storage-driver", "overlay", "build",
                "--layers", "-q", "--tls-verify=false",
            ] + arguments + ["-f", context + "/Containerfile", "-t", "contree-bench", context],
            environment: ChildProcess.hostEnvironment() + ["BUILDAH_ISOLATION=chroot"])
        let seconds = now() - start
        guard result.succeeded else { throw SandboxError(.childProcess, "buildah failed: \(result.stderrText)") }
        return seconds
    }

    func sharedCache(work: String, port: Int) throws {
        let cache = "docker://127.0.0.1:\(port)/bench/cache"
        let peerCache = "127.0.0.1:\(port)/bench/buildah-cache"
        let context = work + "/buildah"
        try FileSystem.makeDirectories(context)
        let store = try Store(root: home)
        let busybox = try BaseImages(store: store).resolve("busybox")
        let tar = try ChildProcess.run([
            "tar", "-C", store.layerPath(busybox.layers[0]), "-cf", context + "/rootfs.tar", ".",
        ])
        guard tar.succeeded else { throw SandboxError(.childProcess, "tar failed: \(tar.stderrText)") }
        var rows: [String: [Double]] = [:]
        for round in 0..<rounds {
            let salt = UUID().uuidString.prefix(8).description
            let file = "\(work)/shared-\(round).yaml"
            try pipeline(salt: salt).write(toFile: file, atomically: true, encoding: .utf8)
            try containerfile(salt: salt).write(toFile: context + "/Containerfile", atomically: true, encoding: .utf8)
            let out = ["--out", "\(work)/out-\(round)"]
            let stores = (0..<3).map { "\(work)/store-\(round)-\($0)" }
            let cold = try run(["run", file] + out, home: stores[0])
            let pushed = try run(["run", file, "--cache-to", cache] + out, home: stores[1])
            let pulled = try run(["run", file, "--cache-from", cache, "--fail-on-cache-miss"] + out, home: stores[2])
            let local = try run(["run", file] + out, home: stores[2])
            guard cold.hits == 0, pushed.hits == 0, pulled.hits == 10, local.hits == 10,
                pushed.err.contains("cache: 10 pushed")
            else {
                throw SandboxError(
                    .childProcess,
                    "unexpected cache behaviour: \(cold.hits)/\(pushed.hits)/\(pulled.hits) hits; \(pushed.err)")
            }
            rows["cold", default: []].append(cold.seconds)
            rows["cold + push", default: []].append(pushed.seconds)
            rows["pull", default: []].append(pulled.seconds)
            rows["local", default: []].append(local.seconds)
            for path in stores { try? FileSystem.removeTree(path) }
            let roots = (0..<3).map { "\(work)/buildah-\(round)-\($0)" }
            rows["peer cold", default: []].append(try buildah([], context: context, root: roots[0]))
            rows["peer cold + push", default: []].append(
                try buildah(["--cache-to", peerCache], context: context, root: roots[1]))
            rows["peer pull", default: []].append(
                try buildah(["--cache-from", peerCache], context: context, root: roots[2]))
        }
        func row(_ name: String, _ ours: String, _ peer: String?) {
            let a = median(rows[ours]!)
            var line = pad(name, 40) + pad(ms(a), 14)
            if let peer {
                let b = median(rows[peer]!)
                line += pad(ms(b), 14) + String(format: "%.2f", a / b)
            }
            print(line)
        }
        print(
            "\nshared step cache: 10 steps on busybox (shell loop + 4 MiB each), fresh store each, CLI end to end, medians of \(rounds)"
        )
        print(pad("", 40) + pad("contree", 14) + pad("buildah", 14) + "ratio")
        row("cold run", "cold", "peer cold")
        row("cold run, then --cache-to", "cold + push", "peer cold + push")
        row("another store, --cache-from", "pull", "peer pull")
        row("that store again (local hits)", "local", nil)
        print(String(format: "--cache-from run / cold run: %.2f", median(rows["pull"]!) / median(rows["cold"]!)))
    }
}
