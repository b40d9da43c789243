// contree-bench oci: debian:bookworm (built here, exported, pushed with skopeo into Debian's
// docker-registry on loopback) imported into a fresh store (cold) and into the same store
// again (warm), against `skopeo copy docker://… oci:DIR` plus `umoci unpack` doing the same
// job, side by side in one run.
import Foundation
import Glibc
import Registry
import Sandbox

struct OCIBench {
    let home: String
    let rounds: Int

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
            ["docker-registry", "serve", work + "/registry/config.yml"], captureStdout: false,
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
            pushed = (try? ChildProcess.run([
                "skopeo", "copy", "--dest-tls-verify=false", "oci:\(work)/layout:bookworm", reference,
            ]))?.succeeded ?? false
        }
        guard pushed else { throw SandboxError(.childProcess, "could not push debian:bookworm to the local registry") }
        print("OCI import of debian:bookworm (\(Format.size(debian.size)), gzip layers) from a registry on loopback, \(rounds) rounds")

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
        for (name, ours, peer) in [("cold (empty store)", coldOurs, coldPeer), ("warm (image known)", warmOurs, warmPeer)] {
            print(
                pad(name, 30) + pad(ms(median(ours)), 18) + pad(ms(median(peer)), 18)
                    + String(format: "%.2f", median(ours) / median(peer)))
        }
    }
}
