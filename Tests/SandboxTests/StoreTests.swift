import Foundation
import Glibc
import Synchronization
import Testing

@testable import ImageFormats
@testable import ImageStore
@testable import SystemSupport

@Suite("The image store")
struct StoreTests {
    /// Imports a directory with the given files as a root image.
    func importTree(_ store: Store, _ files: [String: String]) throws -> ImageRecord {
        let scratch = try ScratchDirectory()
        for (path, content) in files { try scratch.write(path, content) }
        // Same content means same times too: two trees written across a second boundary
        // (a loaded machine) would otherwise differ in their mtimes.
        var times = [timespec(tv_sec: 1_000_000_000, tv_nsec: 0), timespec(tv_sec: 1_000_000_000, tv_nsec: 0)]
        for path in files.keys.map({ scratch.path + "/" + $0 }) + [scratch.path] {
            utimensat(AT_FDCWD, path, &times, AT_SYMLINK_NOFOLLOW)
        }
        return try ImageImporter(store: store).importRootfs(from: scratch.path)
    }

    @Test("text goes into the database and comes out whole, a NUL inside it included")
    func textWithNUL() throws {
        let scratch = try ScratchDirectory()
        let database = try Database(path: scratch.path + "/db.sqlite")
        try database.execute("CREATE TABLE t(k TEXT PRIMARY KEY, v TEXT)")
        try database.query("INSERT INTO t VALUES(?, ?)", [.text("a\u{0}b"), .text("one\u{0}two")])
        try database.query("INSERT INTO t VALUES(?, ?)", [.text("a\u{0}c"), .text("")])
        #expect(
            try database.query("SELECT v FROM t WHERE k = ?", [.text("a\u{0}b")]).first?["v"].string == "one\u{0}two")
        #expect(try database.query("SELECT v FROM t WHERE k = ?", [.text("a\u{0}c")]).first?["v"].string == "")
        #expect(try database.query("SELECT v FROM t WHERE k = ?", [.text("a")]).isEmpty)
    }

    @Test("recovery leaves a lease another process is still creating, and removes one it abandoned")
    func leaseCreationRace() throws {
        let t = try TemporaryStore()
        // Another process has created its lease file but not locked it yet.
        let young = t.store.leasesPath + "/.\(UUID().uuidString.lowercased()).new"
        try FileSystem.writeFile(young, [])
        try t.store.recoverAbandonedWork()
        #expect(FileSystem.exists(young))
        // Long unlocked: its creator died before locking it.
        var times = [timespec(tv_sec: time(nil) - 600, tv_nsec: 0), timespec(tv_sec: time(nil) - 600, tv_nsec: 0)]
        utimensat(AT_FDCWD, young, &times, 0)
        try t.store.recoverAbandonedWork()
        #expect(!FileSystem.exists(young))
        // Leases taken while recovery runs all succeed.
        let leases = try (0..<20).map { _ in
            try t.store.recoverAbandonedWork()
            return try t.store.acquireLease(layers: [])
        }
        leases.forEach { $0.release() }
    }

    @Test("a new store opened by many at once: every opener gets it (none meets 'database is locked')")
    func concurrentFirstOpen() async throws {
        for _ in 0..<3 {
            try await firstOpenRace()
        }
    }

    private func firstOpenRace() async throws {
        let root = "/tmp/contree-test-" + UUID().uuidString.lowercased().prefix(12)
        defer { try? FileSystem.removeTree(root) }
        let failures = try await withThrowingTaskGroup(of: String?.self) { group in
            for _ in 0..<16 {
                group.addTask {
                    try await BlockingPool.shared.run {
                        do {
                            _ = try Store(root: root)
                            return nil
                        } catch {
                            return "\(error)"
                        }
                    }
                }
            }
            return try await group.reduce(into: [String]()) { list, failure in
                if let failure { list.append(failure) }
            }
        }
        #expect(failures.isEmpty, "\(failures)")
    }

    @Test("gc removes the VM backend's erofs copy of a layer with the layer, and keeps those of live layers")
    func derivedFiles() async throws {
        let t = try TemporaryStore()
        let busybox = try t.busybox()
        let live = Store.hex(busybox.layers[0])
        try FileSystem.makeDirectories(t.root + "/vm/erofs")
        let dead = String(repeating: "ab", count: 32)
        for name in [live + ".erofs", dead + ".erofs", dead + ".erofs.123.abcd.partial"] {
            try FileSystem.writeFile(t.root + "/vm/erofs/" + name, [1, 2, 3], mode: 0o644)
        }
        // The VM backend's provider, as VirtualMachine defines it (this target does not link it).
        struct Erofs: DerivedLayerFiles {
            var directory: String { "vm/erofs" }
            func layer(ofFile name: String) -> String? { String(name.prefix { $0 != "." }) }
        }
        #expect(try t.store.collectGarbage().derivedRemoved == 0, "gc knows no derived files it is not told of")
        let report = try t.store.collectGarbage(derived: [Erofs()])
        #expect(report.derivedRemoved == 2)
        #expect(try FileSystem.list(t.root + "/vm/erofs") == [live + ".erofs"])
    }

    @Test("tags point at images, move, and can be removed; bad names are refused")
    func tags() throws {
        let t = try TemporaryStore()
        let a = try importTree(t.store, ["a": "1"])
        let b = try importTree(t.store, ["b": "2"])
        try t.store.tag("release", image: a.uuid)
        #expect(try t.store.resolveImage("release").uuid == a.uuid)
        try t.store.tag("release", image: b.uuid)
        #expect(try t.store.resolveImage("release").uuid == b.uuid)
        try t.store.untag("release")
        #expect(try t.store.findImage("release") == nil)
        for bad in ["", "-x", "has space", a.uuid] {
            #expect(throws: SandboxError.self) { try t.store.tag(bad, image: b.uuid) }
        }
        #expect(throws: SandboxError.self) { try t.store.untag("never-existed") }
    }

    @Test("an unknown reference is an error that names it and says what to do")
    func unknownImage() throws {
        let t = try TemporaryStore()
        let error = try #require(throws: SandboxError.self) { try t.store.resolveImage("no-such-image") }
        #expect(error.code == .notFound)
        #expect(error.message.contains("no-such-image") && error.message.contains("image ls"))
    }

    @Test("images resolve by UUID, by unique prefix, and by tag")
    func resolution() throws {
        let t = try TemporaryStore()
        let a = try importTree(t.store, ["a": "1"])
        #expect(try t.store.resolveImage(a.uuid).uuid == a.uuid)
        #expect(try t.store.resolveImage(String(a.uuid.prefix(10))).uuid == a.uuid)
        #expect(try t.store.resolveImage(a.uuid.uppercased()).uuid == a.uuid)
    }

    @Test("identical content shares one layer; removing an image frees only unshared layers")
    func layerSharingAndGC() throws {
        let t = try TemporaryStore()
        let a = try importTree(t.store, ["same": "content"])
        let b = try importTree(t.store, ["same": "content"])
        #expect(a.uuid != b.uuid)
        #expect(a.layers == b.layers)
        try t.store.removeImage(a.uuid, force: false)
        var report = try t.store.collectGarbage()
        #expect(report.layersRemoved == 0)
        #expect(FileSystem.isDirectory(t.store.layerPath(b.layers[0])))
        try t.store.removeImage(b.uuid, force: false)
        report = try t.store.collectGarbage()
        #expect(report.layersRemoved == 1)
        #expect(!FileSystem.exists(t.store.layerPath(b.layers[0])))
        #expect(try t.store.checkConsistency().isConsistent)
    }

    @Test("a tagged image is not removed without force")
    func removeTagged() throws {
        let t = try TemporaryStore()
        let a = try importTree(t.store, ["a": "1"])
        try t.store.tag("keep", image: a.uuid)
        let error = try #require(throws: SandboxError.self) { try t.store.removeImage(a.uuid, force: false) }
        #expect(error.code == .conflict && error.message.contains("keep"))
        try t.store.removeImage(a.uuid, force: true)
        #expect(try t.store.findImage("keep") == nil)
    }

    @Test("gc keeps the layers a live lease names, and removes them once it is released")
    func leasesProtectLayers() throws {
        let t = try TemporaryStore()
        let a = try importTree(t.store, ["a": "1"])
        let lease = try t.store.acquireLease(layers: a.layers, image: a.uuid)
        try t.store.removeImage(a.uuid, force: true)
        #expect(try t.store.collectGarbage().layersRemoved == 0)
        #expect(FileSystem.isDirectory(t.store.layerPath(a.layers[0])))
        lease.release()
        #expect(try t.store.collectGarbage().layersRemoved == 1)
    }

    @Test(
        "a memory state waits in its lease's directory (gc leaves it) until the commit that records it moves it into the store; gc removes it with its image; fsck re-hashes it"
    )
    func statesAwaitTheirCommit() throws {
        let t = try TemporaryStore()
        let base = try importTree(t.store, ["a": "1"])
        let lease = try t.store.acquireLease(layers: base.layers, image: base.uuid)
        let staging = lease.workPath + "/state"
        try FileSystem.makeDirectories(staging)
        try FileSystem.writeFile(staging + "/ram", Array(repeating: 7, count: 3 << 20))
        try FileSystem.writeFile(staging + "/devices", Array("device state".utf8))
        let (digest, bytes) = try Store.sealState(staging)
        #expect(bytes > 0)
        // A gc between the snapshot and its commit (the race a placed-then-recorded state lost).
        #expect(try t.store.collectGarbage().statesRemoved == 0)
        #expect(FileSystem.isDirectory(staging))
        let upper = lease.workPath + "/upper"
        try FileSystem.makeDirectories(upper)
        try FileSystem.writeFile(upper + "/b", Array("2".utf8))
        let state = PlacedState(
            digest: digest, bytes: bytes, base: base.uuid, kind: "test", metadata: "{}", directory: staging)
        let image = try Snapshotter(store: t.store).commit(
            upper, base: base, config: base.config, origin: "test", lease: lease, newImage: true
        ) { tx, image, _ in try t.store.recordState(tx, image: image.uuid, state: state) }.image
        lease.release()
        let recorded = try #require(try t.store.state(of: image.uuid))
        #expect(recorded.digest == digest && !FileSystem.exists(staging))
        #expect(try FileSystem.readFile(recorded.path + "/devices") == Array("device state".utf8))
        #expect(try t.store.collectGarbage().statesRemoved == 0)
        #expect(try t.store.checkConsistency(verifyContent: true).isConsistent)
        try FileSystem.writeFile(recorded.path + "/devices", Array("tampered".utf8))
        #expect(try t.store.checkConsistency(verifyContent: true).problems.contains { $0.contains("has changed") })
        try t.store.removeImage(image.uuid, force: true)
        #expect(try t.store.collectGarbage().statesRemoved == 1)
        #expect(!FileSystem.exists(recorded.path))
    }

    @Test("a lease on an image that is gone is refused")
    func leaseOnRemovedImage() throws {
        let t = try TemporaryStore()
        let a = try importTree(t.store, ["a": "1"])
        try t.store.removeImage(a.uuid, force: false)
        #expect(throws: SandboxError.self) { _ = try t.store.acquireLease(layers: a.layers, image: a.uuid) }
    }

    @Test("work a dead process left behind is removed when the store is next opened")
    func abandonedWorkIsRecovered() throws {
        let t = try TemporaryStore()
        // A dead owner: the lease file exists but nobody holds its lock.
        let id = "dead-" + UUID().uuidString.lowercased()
        try FileSystem.makeDirectories(t.store.tmpPath + "/" + id + "/upper")
        try FileSystem.writeFile(t.store.leasesPath + "/" + id + ".lock", [])
        try t.store.database.query(
            "INSERT INTO leases(id, pid, layers, created) VALUES(?, 1, '[]', 0)", [.text(id)])
        let live = try t.store.acquireLease(layers: [])
        let reopened = try Store(root: t.root)
        #expect(!FileSystem.exists(t.store.tmpPath + "/" + id))
        #expect(try reopened.database.query("SELECT id FROM leases").compactMap { $0["id"].string } == [live.id])
        #expect(FileSystem.isDirectory(live.workPath))
        live.release()
    }

    @Test("fsck finds a layer whose files changed and a layer that went missing")
    func fsckDetectsDamage() throws {
        let t = try TemporaryStore()
        let a = try importTree(t.store, ["etc/file": "original"])
        let b = try importTree(t.store, ["other": "x"])
        #expect(try t.store.checkConsistency().isConsistent)
        try FileSystem.writeFile(t.store.layerPath(a.layers[0]) + "/etc/file", Array("tampered".utf8))
        var report = try t.store.checkConsistency()
        #expect(!report.isConsistent)
        #expect(report.problems.contains { $0.contains(a.layers[0]) && $0.contains("changed") })
        try FileSystem.removeTree(t.store.layerPath(b.layers[0]))
        report = try t.store.checkConsistency(verifyContent: false)
        #expect(report.problems.contains { $0.contains(b.layers[0]) && $0.contains("missing") })
    }

    @Test("a layer directory without a record (an interrupted commit) is garbage, not damage")
    func orphanLayerIsGarbage() throws {
        let t = try TemporaryStore()
        try FileSystem.makeDirectories(t.store.layersPath + "/" + String(repeating: "ab", count: 32) + "/etc")
        let report = try t.store.checkConsistency()
        #expect(report.isConsistent)
        #expect(report.garbage.count == 1)
        #expect(try t.store.collectGarbage().layersRemoved == 1)
        #expect(try t.store.checkConsistency().garbage.isEmpty)
    }

    @Test("importing a path that does not exist writes nothing")
    func importMissing() throws {
        let t = try TemporaryStore()
        let error = try #require(throws: SandboxError.self) {
            _ = try ImageImporter(store: t.store).importRootfs(from: "/nonexistent/rootfs")
        }
        #expect(error.code == .notFound && error.message.contains("/nonexistent/rootfs"))
        #expect(try t.store.listImages().isEmpty)
        #expect(try FileSystem.list(t.store.layersPath).isEmpty)
        #expect(try FileSystem.list(t.store.tmpPath).isEmpty)
    }

    @Test("a tar archive with a member escaping the root is refused and leaves nothing behind")
    func importEscapingTar() throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        let tarPath = scratch.path + "/evil.tar"
        var bytes: [UInt8] = []
        let writer = TarWriter { bytes.append(contentsOf: $0) }
        try writer.append(TarEntry(path: "ok", kind: .regular, mode: 0o644))
        try writer.append(TarEntry(path: "../../escaped", kind: .regular, mode: 0o644))
        try writer.finish()
        try FileSystem.writeFile(tarPath, bytes)
        let error = try #require(throws: SandboxError.self) {
            _ = try ImageImporter(store: t.store).importRootfs(from: tarPath)
        }
        #expect(error.code == .pathEscapes)
        #expect(try t.store.listImages().isEmpty)
        #expect(try FileSystem.list(t.store.tmpPath).isEmpty)
    }

    @Test("a gzip tar imports, and its files read back through the image view")
    func importTarGz() throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        try scratch.write("root/etc/motd", "welcome\n")
        let archive = scratch.path + "/rootfs.tar.gz"
        let tar = try ChildProcess.run(["tar", "-czf", archive, "-C", scratch.path + "/root", "."])
        #expect(tar.succeeded)
        let image = try ImageImporter(store: t.store).importRootfs(from: archive)
        let fs = ImageFilesystem(layersTopFirst: image.layers.reversed().map(t.store.layerPath))
        let node = try #require(try fs.lookup("/etc/motd"))
        #expect(try fs.readFile(node) == Array("welcome\n".utf8))
    }
}

@Suite("The store is its owner's alone")
struct StorePermissionTests {
    @Test("a new store is 0700 and its database 0600; an older, open store is tightened")
    func modes() throws {
        let t = try TemporaryStore()
        var st = stat()
        #expect(stat(t.root, &st) == 0 && st.st_mode & 0o777 == 0o700)
        #expect(stat(t.root + "/db.sqlite", &st) == 0 && st.st_mode & 0o777 == 0o600)
        chmod(t.root, 0o755)
        chmod(t.root + "/db.sqlite", 0o644)
        _ = try Store(root: t.root)
        #expect(stat(t.root, &st) == 0 && st.st_mode & 0o777 == 0o700)
        #expect(stat(t.root + "/db.sqlite", &st) == 0 && st.st_mode & 0o777 == 0o600)
    }
}

@Suite("Digests")
struct DigestTests {
    @Test("sha256 of known inputs, whole or streamed, in the OCI form and as hex")
    func knownVectors() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        #expect(Digest.sha256("abc").hex == abc)
        #expect(Digest.sha256("abc").description == "sha256:" + abc)
        var hasher = Digest.Hasher()
        hasher.update(Array("a".utf8))
        Array("bc".utf8).withUnsafeBytes { hasher.update($0) }
        #expect(hasher.finalize() == Digest.sha256("abc"))
        #expect(Digest.sha256([UInt8]()).hex == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(Hex.encode([0x00, 0x0f, 0xa0, 0xff]) == "000fa0ff")
    }
}

@Suite("Module schemas")
struct SchemaTests {
    @Test("each migration runs once, in order; a module written by a newer build is refused")
    func migrations() throws {
        let t = try TemporaryStore()
        let ran = Mutex<[Int]>([])
        let steps: [SchemaMigration] = [
            { tx in
                ran.withLock { $0.append(1) }
                try tx.execute("CREATE TABLE probe_things(id TEXT PRIMARY KEY)")
            },
            { tx in
                ran.withLock { $0.append(2) }
                try tx.addColumn("probe_things", "size INTEGER")
                try tx.addColumn("probe_things", "size INTEGER")  // idempotent
            },
        ]
        try t.store.migrate("probe", Array(steps.prefix(1)))
        try t.store.migrate("probe", steps)
        try t.store.migrate("probe", steps)
        #expect(ran.withLock { $0 } == [1, 2])
        try t.store.database.query("INSERT INTO probe_things(id, size) VALUES('a', 1)")
        #expect(throws: SandboxError.self) { try t.store.migrate("probe", Array(steps.prefix(1))) }
        // Another store process opening it sees the same version: nothing runs again.
        try Store(root: t.root).migrate("probe", steps)
        #expect(ran.withLock { $0 } == [1, 2])
    }
}

@Suite("Abandoned run cgroups", .requiresRoot)
struct AbandonedCgroupTests {
    @Test(
        "starting a command with no dead work reads no cgroup; one left behind goes with the next recovery that knows of it, and with gc"
    )
    func lazyRecovery() throws {
        let t = try TemporaryStore()
        let marker = t.store.leasesPath + "/cgroups-left"
        // A run cgroup of this store whose lease is gone: abandoned.
        func abandoned(_ id: String) throws -> (exists: () -> Bool, group: Cgroup) {
            let group = try Cgroup.create(storeRoot: t.root, id: id, limits: ResourceLimits())
            return ({ group.directories.values.contains { FileSystem.exists($0) } }, group)
        }
        let first = try abandoned("gone-1")
        defer { first.group.remove() }
        _ = try Store(root: t.root)  // no dead work, no marker
        #expect(first.exists())
        try FileSystem.writeFile(marker, [], mode: 0o600)  // an earlier recovery left one
        _ = try Store(root: t.root)
        #expect(!first.exists() && !FileSystem.exists(marker))
        let second = try abandoned("gone-2")
        defer { second.group.remove() }
        _ = try t.store.collectGarbage()
        #expect(!second.exists())
    }
}
