import ContreeTestSupport
import Foundation
import Glibc
import Registry
import Testing

@testable import ImageFormats
@testable import ImageStore
@testable import Sandbox
@testable import SystemSupport

@Suite("OCI images: export, import, round trips with skopeo", .requiresRoot)
struct OCITests {
    /// An image with a new directory, a changed file and a deleted one (a whiteout).
    func sample(_ t: TemporaryStore) async throws -> ImageRecord {
        let run = try await t.sh("mkdir /app && echo one > /app/a && rm /bin/vi && echo x > /etc/motd")
        let uuid = try #require(run.record.resultImage)
        return try #require(try t.store.image(uuid))
    }

    @Test(
        "podman runs an exported snapshot, from an OCI layout and from a docker archive, with its whiteouts and env",
        .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/podman"), "podman is not installed"))
    func podman() async throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        var image = try await sample(t)
        image.config = ImageConfig(env: ["PATH=/bin", "GREETING=hi"], workingDir: "/app", user: nil)
        try OCIExporter(store: t.store).export(image, to: "oci:\(scratch.path)/layout:v1")
        try OCIExporter(store: t.store).export(image, to: "docker-archive:\(scratch.path)/d.tar:contree/sample:v1")
        let root = scratch.path
        for source in ["oci:\(root)/layout:v1", "docker-archive:\(root)/d.tar"] {
            // vfs storage and cgroupfs: no daemon, no systemd; this host's hard limits for nofile/nproc.
            let result = try await BlockingPool.shared.run {
                // From `/`: conmon needs a working directory that exists.
                try ChildProcess.run([
                    "sh", "-c", "cd / && exec \"$@\"", "sh",
                    "podman", "--root", root + "/podman", "--runroot", root + "/podman-run",
                    "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none", "--runtime",
                    "runc", "run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit",
                    "nproc=1024:1024", source, "sh", "-c", "cat a; echo $GREETING; pwd; test -e /bin/vi || echo no-vi",
                ])
            }
            #expect(result.succeeded, "\(source): \(result.stderrText)")
            #expect(String(decoding: result.stdout, as: UTF8.self) == "one\nhi\n/app\nno-vi\n", "\(source)")
        }
    }

    @Test("an exported image reads the same after import from an OCI layout, a Docker archive and compressed layers")
    func roundTrips() async throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        let image = try await sample(t)
        let exporter = OCIExporter(store: t.store)
        try exporter.export(image, to: "oci:\(scratch.path)/layout:v1")
        let inspected =
            try JSONSerialization.jsonObject(
                with: Data(try skopeo(["inspect", "oci:\(scratch.path)/layout:v1"]).utf8)) as! [String: Any]
        #expect(inspected["Layers"] as? [String] == image.layers)

        _ = try skopeo(["copy", "oci:\(scratch.path)/layout:v1", "docker-archive:\(scratch.path)/d.tar:x/y:1"])
        _ = try skopeo(["copy", "--dest-compress", "oci:\(scratch.path)/layout:v1", "oci:\(scratch.path)/gz:v1"])
        _ = try skopeo([
            "copy", "--dest-compress-format", "zstd", "oci:\(scratch.path)/layout:v1", "oci:\(scratch.path)/zst:v1",
        ])
        try exporter.export(image, to: "oci-archive:\(scratch.path)/o.tar:v1")
        try exporter.export(image, to: "docker-archive:\(scratch.path)/mine.tar:mine:1")
        let sources = [
            "oci:\(scratch.path)/layout:v1", "docker-archive:\(scratch.path)/d.tar", "oci:\(scratch.path)/gz:v1",
            "oci:\(scratch.path)/zst:v1", "oci-archive:\(scratch.path)/o.tar:v1",
            "docker-archive:\(scratch.path)/mine.tar",
        ]
        for source in sources {
            // Into a store of its own (the exporting store knows these layers by name already).
            let other = try TemporaryStore()
            let imported = try OCIImporter(store: other.store).importImage(source)
            // Unpacked and committed again, each layer is the same canonical stream: same names.
            #expect(imported.layers == image.layers, "\(source)")
            let fs = ImageFilesystem(layersTopFirst: imported.layers.reversed().map(other.store.layerPath))
            #expect(try fs.lookup("/bin/vi") == nil, "\(source)")
            #expect(try fs.lookup("/app/a") != nil, "\(source)")
        }
        // One store, every source: each diff_id is unpacked once (one layer row per diff_id).
        let shared = try TemporaryStore()
        let importer = try OCIImporter(store: shared.store)
        for source in sources { _ = try importer.importImage(source) }
        let rows = try shared.store.database.query("SELECT COUNT(*) AS n FROM oci_layers")
        #expect(rows.first?["n"].int == Int64(image.layers.count))
        // Our own layout again: the image it made before.
        #expect(
            try importer.importImage("oci:\(scratch.path)/layout:v1").uuid
                == importer.importImage("oci:\(scratch.path)/layout:v1").uuid)
        // The exporting store imports its own export without unpacking: it holds every layer.
        let own = try OCIImporter(store: t.store).importImage("oci:\(scratch.path)/layout:v1")
        #expect(try ImageDiff.changes(from: image, to: own, store: t.store).isEmpty && own.layers == image.layers)
        #expect(try t.store.database.query("SELECT COUNT(*) AS n FROM oci_layers").first?["n"].int == 0)
    }

    @Test("an imported image's env, working directory and named user are the ones it runs with")
    func config() async throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        var image = try await sample(t)
        image.config = ImageConfig(env: ["PATH=/bin", "GREETING=hi"], workingDir: "/app", user: "nobody")
        let layout = scratch.path + "/layout"
        try OCIExporter(store: t.store).export(image, to: "oci:\(layout)")
        let imported = try OCIImporter(store: t.store).importImage("oci:\(layout)")
        #expect(imported.config.env.contains("GREETING=hi") && imported.config.workingDir == "/app")
        let run = try await t.engine.run(
            RunSpec(image: imported.uuid, command: ["sh", "-c", "echo $GREETING $(pwd) $(id -u)"]))
        #expect(run.out == "hi /app 65534\n")
    }

    @Test("imports of images that share layers, at the same time, all succeed and share the layers")
    func concurrentImports() async throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        let base = try await sample(t)
        var layouts: [String] = []
        for i in 0..<4 {
            let run = try await t.sh("echo \(i) > /n") { $0.image = base.uuid }
            let uuid = try #require(run.record.resultImage)
            let image = try #require(try t.store.image(uuid))
            try OCIExporter(store: t.store).export(image, to: "oci:\(scratch.path)/l\(i)")
            layouts.append("oci:\(scratch.path)/l\(i)")
        }
        let other = try TemporaryStore()
        let store = other.store
        let images = try await withThrowingTaskGroup(of: ImageRecord.self) { group in
            for layout in layouts + layouts {
                group.addTask {
                    try await BlockingPool.shared.run { try OCIImporter(store: store).importImage(layout) }
                }
            }
            var all: [ImageRecord] = []
            for try await image in group { all.append(image) }
            return all
        }
        #expect(images.count == 8)
        #expect(Set(images.map { $0.layers.dropLast() }).count == 1)  // the shared base layers
        let report = try other.store.checkConsistency()
        #expect(report.isConsistent, "\(report.problems)")
    }

    @Test("damaged or hostile images are refused with the reason, and nothing is added to the store")
    func badInput() async throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        let image = try await sample(t)
        // Into another store: the exporting one holds these layers and would not read the blobs.
        let other = try TemporaryStore()
        let importer = try OCIImporter(store: other.store)
        func expectRefused(_ source: String, _ words: String, sourceLocation: SourceLocation = #_sourceLocation) throws
        {
            let before = try other.store.listImages().count
            #expect(sourceLocation: sourceLocation) {
                try importer.importImage(source)
            } throws: { error in
                "\(error)".contains(words)
            }
            #expect(try other.store.listImages().count == before, sourceLocation: sourceLocation)
        }
        // A layer blob whose bytes do not match its digest.
        let damaged = scratch.path + "/damaged"
        try OCIExporter(store: t.store).export(image, to: "oci:\(damaged)")
        let top = damaged + "/blobs/sha256/" + image.layers.last!.dropFirst(7)
        var bytes = try FileSystem.readFile(top)
        bytes[600] ^= 0xff
        try FileSystem.writeFile(top, bytes)
        try expectRefused("oci:\(damaged)", "does not match its digest")
        // A missing blob, an unknown tag, a layout that is not one, a truncated gzip layer.
        unlink(top)
        try expectRefused("oci:\(damaged)", "missing")
        try OCIExporter(store: t.store).export(image, to: "oci:\(scratch.path)/ok:v1")
        try expectRefused("oci:\(scratch.path)/ok:nope", "no image is tagged 'nope'")
        try expectRefused("oci:\(scratch.path)", "not an OCI image layout")
        _ = try skopeo(["copy", "--dest-compress", "oci:\(scratch.path)/ok:v1", "oci:\(scratch.path)/gz:v1"])
        let gz = try FileSystem.list(scratch.path + "/gz/blobs/sha256").map { scratch.path + "/gz/blobs/sha256/" + $0 }
            .filter { (try? FileSystem.readFile($0).prefix(2)) == [0x1f, 0x8b] }
        for blob in gz {
            let whole = try FileSystem.readFile(blob)
            try FileSystem.writeFile(blob, Array(whole.prefix(whole.count / 2)))
        }
        try expectRefused("oci:\(scratch.path)/gz:v1", "does not match its digest")

        // A layer that climbs out of the root, with a correct digest and diff_id.
        let evil = scratch.path + "/evil"
        try FileSystem.makeDirectories(evil + "/blobs/sha256")
        var tar: [UInt8] = []
        let writer = TarWriter { tar.append(contentsOf: $0) }
        try writer.append(
            TarEntry(path: "../../escaped", kind: .regular, mode: 0o644, uid: 0, gid: 0, size: 0, mtime: 0))
        try writer.finish()
        func blob(_ data: [UInt8]) throws -> String {
            let digest = Digest.sha256(data).description
            try FileSystem.writeFile(evil + "/blobs/sha256/" + digest.dropFirst(7), data)
            return digest
        }
        let layer = try blob(tar)
        let config = try blob(Array(#"{"rootfs":{"type":"layers","diff_ids":["\#(layer)"]}}"#.utf8))
        let manifest = try blob(
            Array(
                #"{"schemaVersion":2,"mediaType":"\#(OCI.manifestType)","config":{"digest":"\#(config)","size":1},"layers":[{"mediaType":"\#(OCI.layerTar)","digest":"\#(layer)","size":\#(tar.count)}]}"#
                    .utf8))
        try FileSystem.writeFile(evil + "/oci-layout", Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8))
        try FileSystem.writeFile(
            evil + "/index.json",
            Array(
                #"{"schemaVersion":2,"manifests":[{"mediaType":"\#(OCI.manifestType)","digest":"\#(manifest)","size":1}]}"#
                    .utf8))
        try expectRefused("oci:\(evil)", "..")
        #expect(
            !FileSystem.exists(other.store.root + "/escaped") && !FileSystem.exists(other.store.tmpPath + "/escaped"))
        // An unsupported manifest type.
        let odd = try blob(
            Array(#"{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+json"}"#.utf8))
        try FileSystem.writeFile(
            evil + "/index.json", Array(#"{"schemaVersion":2,"manifests":[{"digest":"\#(odd)","size":1}]}"#.utf8))
        try expectRefused("oci:\(evil)", "not supported")

        // Layers decompressed and hashed as they are extracted: a gzip stream cut short under a
        // digest that matches the cut bytes is the decompressor's complaint (igzip's or gzip's); a whole one whose content is not
        // the config's diff_id is refused by that digest. Neither leaves anything behind.
        var content: [UInt8] = []
        let contentWriter = TarWriter { content.append(contentsOf: $0) }
        let payload = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
        try contentWriter.append(
            TarEntry(path: "data", kind: .regular, mode: 0o644, uid: 0, gid: 0, size: Int64(payload.count), mtime: 0)
        ) { write in try payload.withUnsafeBytes { try write($0) } }
        try contentWriter.finish()
        try FileSystem.writeFile(scratch.path + "/content.tar", content)
        let zipped = try ChildProcess.run(["gzip", "-n", "-c", scratch.path + "/content.tar"]).stdout
        func gzipLayout(_ layerBytes: [UInt8], diffID: String) throws -> String {
            let layer = try blob(layerBytes)
            let config = try blob(Array(#"{"rootfs":{"type":"layers","diff_ids":["\#(diffID)"]}}"#.utf8))
            let manifest = try blob(
                Array(
                    #"{"schemaVersion":2,"mediaType":"\#(OCI.manifestType)","config":{"digest":"\#(config)","size":1},"layers":[{"mediaType":"\#(OCI.layerGzip)","digest":"\#(layer)","size":\#(layerBytes.count)}]}"#
                        .utf8))
            try FileSystem.writeFile(
                evil + "/index.json",
                Array(
                    #"{"schemaVersion":2,"manifests":[{"mediaType":"\#(OCI.manifestType)","digest":"\#(manifest)","size":1}]}"#
                        .utf8))
            return "oci:\(evil)"
        }
        let diffID = Digest.sha256(content).description
        try expectRefused(
            try gzipLayout(Array(zipped.prefix(zipped.count / 2)), diffID: diffID), "cannot be decompressed with")
        try expectRefused(
            try gzipLayout(zipped, diffID: Digest.sha256(Array("other".utf8)).description), "but the config says")
        // The whole stream under its own diff_id imports, and holds the file.
        let good = try importer.importImage(try gzipLayout(zipped, diffID: diffID))
        let fs = ImageFilesystem(layersTopFirst: good.layers.reversed().map(other.store.layerPath))
        #expect(try fs.lookup("/data").map { try fs.readFile($0) } == payload)
        #expect(try FileSystem.list(other.store.tmpPath).allSatisfy { !$0.hasPrefix("layer") })
    }
}

@Suite("OCI images from a registry on loopback", .requiresRoot)
struct RegistryTests {
    @Test("an image pushed to a registry imports, by tag and by digest, and its layers are fetched once")
    func pull() async throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        let registry = try LocalRegistry()
        let run = try await t.sh("mkdir /app && echo one > /app/a && rm /bin/vi")
        let resultUUID = try #require(run.record.resultImage)
        let image = try #require(try t.store.image(resultUUID))
        try OCIExporter(store: t.store).export(image, to: "oci:\(scratch.path)/layout:v1")
        try registry.push("oci:\(scratch.path)/layout:v1", "team/app:v1")

        let other = try TemporaryStore()  // another machine's store
        let importer = RegistryImporter(store: other.store)
        let pulled = try importer.importImage("docker://127.0.0.1:\(registry.port)/team/app:v1")
        let fs = ImageFilesystem(layersTopFirst: pulled.layers.reversed().map(other.store.layerPath))
        #expect(try fs.lookup("/app/a") != nil && fs.lookup("/bin/vi") == nil)
        let again = try importer.importImage("docker://127.0.0.1:\(registry.port)/team/app:v1")
        #expect(again.uuid == pulled.uuid)
        let digest = try skopeo([
            "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
            "docker://127.0.0.1:\(registry.port)/team/app:v1",
        ])
        .trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try importer.importImage("docker://127.0.0.1:\(registry.port)/team/app@\(digest)").uuid == pulled.uuid)
        let result = try await other.engine.run(RunSpec(image: pulled.uuid, command: ["cat", "/app/a"]))
        #expect(result.out == "one\n")
        // Wherever an image is named, a registry reference is imported on first use.
        let third = try TemporaryStore()
        let engine = SandboxEngine(store: third.store, sources: RegistryImporter.imageSource())
        let named = try await engine.run(
            RunSpec(image: "docker://127.0.0.1:\(registry.port)/team/app:v1", command: ["cat", "/app/a"]))
        #expect(named.out == "one\n")
        let layout = try await engine.run(
            RunSpec(image: "oci:\(scratch.path)/layout:v1", command: ["cat", "/app/a"]))
        #expect(layout.out == "one\n")
        // Two manifests (skopeo compressed the pushed layers), one set of layers in the store.
        #expect(try third.store.image(layout.record.image)?.layers == third.store.image(named.record.image)?.layers)
    }

    @Test(
        "a pushed snapshot is a standard image: skopeo reads it, another store imports it, a second push uploads nothing new"
    )
    func push() async throws {
        let t = try TemporaryStore()
        let registry = try LocalRegistry()
        let run = try await t.sh("echo pushed > /p")
        let resultUUID = try #require(run.record.resultImage)
        let image = try #require(try t.store.image(resultUUID))
        let destination = "docker://127.0.0.1:\(registry.port)/team/pushed:v1"
        let digest = try RegistryPusher(store: t.store).push(image, to: destination)
        let inspected =
            try JSONSerialization.jsonObject(
                with: Data(
                    try skopeo(["inspect", "--tls-verify=false", "docker://127.0.0.1:\(registry.port)/team/pushed:v1"])
                        .utf8))
            as! [String: Any]
        #expect(inspected["Digest"] as? String == digest && inspected["Layers"] as? [String] == image.layers)
        #expect(try RegistryPusher(store: t.store).push(image, to: destination) == digest)
        let other = try TemporaryStore()
        let pulled = try RegistryImporter(store: other.store).importImage(destination)
        #expect(pulled.layers == image.layers)  // canonical tars: the same digests on both machines
        let result = try await other.engine.run(RunSpec(image: pulled.uuid, command: ["cat", "/p"]))
        #expect(result.out == "pushed\n")
    }

    @Test(
        "a registry that asks for basic auth, or for bearer tokens from a token service: refused without credentials or with wrong ones, used with the right ones",
        arguments: [false, true])
    func auth(tokens: Bool) async throws {
        let t = try TemporaryStore()
        let registry = try LocalRegistry(user: ("alice", "s3cret"), tokens: tokens)
        let run = try await t.sh("echo guarded > /g")
        let resultUUID = try #require(run.record.resultImage)
        let image = try #require(try t.store.image(resultUUID))
        let destination = "docker://127.0.0.1:\(registry.port)/team/guarded:1"
        let good = RegistryCredentials(username: "alice", password: "s3cret")
        let bad = RegistryCredentials(username: "alice", password: "nope")
        // Basic: the registry's challenge needs credentials; bearer: the token service refuses.
        let missing = tokens ? "give credentials" : "needs credentials"
        #expect { try RegistryPusher(store: t.store).push(image, to: destination) } throws: {
            "\($0)".contains(missing)
        }
        #expect { try RegistryPusher(store: t.store, credentials: bad).push(image, to: destination) } throws: {
            "\($0)".contains("refused the credentials")
        }
        try RegistryPusher(store: t.store, credentials: good).push(image, to: destination)
        let other = try TemporaryStore()
        #expect { try RegistryImporter(store: other.store).importImage(destination) } throws: {
            "\($0)".contains(missing)
        }
        #expect { try RegistryImporter(store: other.store, credentials: bad).importImage(destination) } throws: {
            "\($0)".contains("refused the credentials")
        }
        #expect(try other.store.listImages().isEmpty)
        let pulled = try RegistryImporter(store: other.store, credentials: good).importImage(destination)
        #expect(pulled.layers == image.layers)
    }

    @Test(
        "an altered blob, a truncated download, a missing tag or repository, and a registry that is not there are clear errors that import nothing"
    )
    func failures() async throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        let registry = try LocalRegistry()
        let run = try await t.sh("echo data > /f")
        let resultUUID = try #require(run.record.resultImage)
        let image = try #require(try t.store.image(resultUUID))
        try OCIExporter(store: t.store).export(image, to: "oci:\(scratch.path)/layout:v1")
        try registry.push("oci:\(scratch.path)/layout:v1", "team/app:v1")
        let other = try TemporaryStore()
        let importer = RegistryImporter(store: other.store)
        let base = "docker://127.0.0.1:\(registry.port)"
        // The message says what to do; the cause says what the registry did.
        for (reference, words, cause) in [
            ("\(base)/team/app:nope", "not found", RegistryError.Kind.status(404)),
            ("\(base)/team/none:v1", "not found", .status(404)),
            ("docker://127.0.0.1:1/team/app:v1", "cannot reach", .transport),
            ("docker://127.0.0.1:\(registry.port)/Bad/Name", "lower-case", nil),
        ] {
            #expect {
                try importer.importImage(reference)
            } throws: { error in
                "\(error)".contains(words) && ((error as? SandboxError)?.cause as? RegistryError)?.kind == cause
            }
        }
        // A connection that closes in the middle of a layer.
        let cutting = try StallingProxy(upstreamPort: registry.port, cut: true)
        #expect {
            try importer.importImage("docker://127.0.0.1:\(cutting.port)/team/app:v1")
        } throws: { error in
            "\(error)".contains("failed") || "\(error)".contains("truncated")
        }
        #expect(try other.store.listImages().isEmpty)
        // Alter the layers' bytes in the registry's storage (skopeo pushed them gzip-compressed):
        // the downloads must be refused.
        let blobs = registry.root + "/data/docker/registry/v2/blobs/sha256"
        for prefix in try FileSystem.list(blobs) {
            for digest in try FileSystem.list(blobs + "/" + prefix) {
                let stored = blobs + "/" + prefix + "/" + digest + "/data"
                var bytes = try FileSystem.readFile(stored)
                guard bytes.prefix(2) == [0x1f, 0x8b] else { continue }
                bytes[bytes.count / 2] ^= 0xff
                try FileSystem.writeFile(stored, bytes)
            }
        }
        #expect {
            try importer.importImage("\(base)/team/app:v1")
        } throws: { error in
            "\(error)".contains("hashing to")
        }
        #expect(try other.store.listImages().isEmpty)
    }

    @Test("Ctrl-C during an import stops the download in flight at once, exits 130 and leaves nothing in the store")
    func interrupted() async throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        let registry = try LocalRegistry()
        let run = try await t.sh("echo second > /second")
        let uuid = try #require(run.record.resultImage)
        let image = try #require(try t.store.image(uuid))
        try OCIExporter(store: t.store).export(image, to: "oci:\(scratch.path)/layout:v1")
        try registry.push("oci:\(scratch.path)/layout:v1", "team/slow:v1")
        // Every blob over 64 KiB (busybox's layer) stalls after its first 4 KiB.
        let proxy = try StallingProxy(upstreamPort: registry.port)
        let home = scratch.path + "/other"
        var env = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") }
        env.append("CONTREE_HOME=\(home)")
        let child = try ChildProcess.spawn(
            [Paths.cli, "image", "import", "docker://127.0.0.1:\(proxy.port)/team/slow:v1"], environment: env,
            captureStdout: false, stdoutFD: open("/dev/null", O_WRONLY | O_CLOEXEC))
        let ended = try await interruptDuringDownload(pid: child.pid, stderr: child.stderr, storeRoot: home)
        #expect(ended.downloading)
        #expect(ended.status == 130, "\(ended.stderr)")
        #expect(ended.stderr.contains("the import was interrupted; nothing was imported"))
        #expect(ended.seconds < 20)  // not the proxy's minute
        let store = try Store(root: home)
        #expect(try store.listImages().isEmpty)
        #expect(try store.checkConsistency(verifyContent: false).isConsistent)
    }
}
