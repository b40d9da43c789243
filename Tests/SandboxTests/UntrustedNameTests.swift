import ContreeTestSupport
import Foundation
import Glibc
import Testing

@testable import ImageFormats
@testable import SystemSupport

/// File names from a sandbox are bytes: any byte but `/` and NUL, UTF-8 or not. The layer
/// digest must cover every one of them, or layers that look identical share a directory.
@Suite("Untrusted names: bytes from readdir to the tar header", .requiresRoot)
struct UntrustedNameTests {
    @Test("a file whose name is not UTF-8 is part of its layer, and a change that looks the same does not inherit it")
    func nonUTF8NameIsInTheDigest() async throws {
        let t = try TemporaryStore()
        let same = "echo 'print(1)' > /app/main.py && touch -d @1000 /app/main.py /app"
        let poisoned = try await t.sh("mkdir /app && printf 'echo pwned' > \"/app/$(printf '\\377').sh\" && " + same)
        let clean = try await t.sh("mkdir /app && " + same)
        let poisonedImage = try t.image(of: poisoned)
        let cleanImage = try t.image(of: clean)
        #expect(poisonedImage.layers.last != cleanImage.layers.last)
        #expect(try await t.sh("ls /app") { $0.image = cleanImage.uuid }.out == "main.py\n")
        // The odd name survives byte for byte, in the image and in its digest.
        let listed = try await t.sh("find /app -name '*.sh' | od -An -c | tr -s ' '") { $0.image = poisonedImage.uuid }
        #expect(listed.out.contains("377 . s h"))
        #expect(try t.store.checkConsistency().isConsistent)
    }

    @Test("a name that is not UTF-8 round-trips through the canonical tar and extraction")
    func roundTrip() throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        let odd: [UInt8] = Array("dir-".utf8) + [0xff, 0xfe] + Array("\nline".utf8)
        let dir = scratch.path + "/tree"
        try FileSystem.makeDirectory(dir)
        let handle = try DirectoryHandle(path: dir)
        try handle.makeDirectory(RawPath(odd), mode: 0o755)
        let inner = try handle.directory(RawPath(odd))
        let fd = try inner.openFile(RawPath([0xc3, 0x28]), flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o644)
        try FileSystem.writeAll(fd: fd, Array("hidden".utf8), path: "file")
        close(fd)
        #expect(symlinkat(String(decoding: [0x61], as: UTF8.self), inner.fd, "link") == 0)
        let summary = try LayerArchiver.archive(directory: dir)
        #expect(summary.entries == 3)

        // Through the stream and back into a directory: the same digest.
        let tarPath = scratch.path + "/tree.tar"
        let out = open(tarPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        _ = try LayerArchiver.archive(directory: dir) { try FileSystem.writeAll(fd: out, $0, path: tarPath) }
        close(out)
        let input = open(tarPath, O_RDONLY | O_CLOEXEC)
        defer { close(input) }
        var reader = TarReader(fd: input, name: tarPath)
        let copy = scratch.path + "/copy"
        try FileSystem.makeDirectory(copy)
        var extractor = LayerExtractor(root: copy)
        try extractor.extract(&reader, source: tarPath)
        #expect(try LayerArchiver.archive(directory: copy).digest == summary.digest)
        #expect(try DirectoryHandle(path: copy).directory(RawPath(odd)).entries().contains(RawPath([0xc3, 0x28])))
        _ = t
    }

    @Test("fsck finds a file hidden in a layer directory behind a name that is not UTF-8")
    func fsckSeesHiddenFiles() async throws {
        let t = try TemporaryStore()
        let run = try await t.sh("mkdir /app && echo 1 > /app/main.py")
        let image = try t.image(of: run)
        let layer = try DirectoryHandle(path: t.store.layerPath(image.layers.last!) + "/app")
        let fd = try layer.openFile(RawPath([0xff]), flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o755)
        close(fd)
        let report = try t.store.checkConsistency()
        #expect(!report.isConsistent)
        #expect(report.problems.contains { $0.contains(image.layers.last!) })
    }

    @Test("a commit over a layer directory that an older version named wrongly replaces it instead of sharing it")
    func noDedupOntoUnprovenLayer() async throws {
        let t = try TemporaryStore()
        let script = "mkdir /app && echo 1 > /app/main.py && touch -d @1000 /app/main.py /app"
        let first = try await t.sh(script)
        let image = try t.image(of: first)
        let digest = image.layers.last!
        // What an older archiver let through: a hidden file in a directory whose row was
        // written before names were archived as bytes.
        let fd = try DirectoryHandle(path: t.store.layerPath(digest) + "/app")
            .openFile(RawPath([0xff]), flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o755)
        close(fd)
        try t.store.database.execute("UPDATE layers SET archive_format = NULL")
        let second = try await t.sh(script)
        #expect(try t.image(of: second).layers.last == digest)
        #expect(try await t.sh("ls /app") { $0.image = second.record.resultImage! }.out == "main.py\n")
        #expect(try t.store.checkConsistency().isConsistent)
    }
}

@Suite("Trees nothing could remove: odd names, deeper than PATH_MAX")
struct DeepTreeTests {
    /// Makes `depth` nested directories named `name` below `root`, with a file at the bottom.
    static func makeDeepTree(_ root: String, name: RawPath, depth: Int) throws {
        var current = try DirectoryHandle(path: root)
        for _ in 0..<depth {
            try current.makeDirectory(name, mode: 0o755)
            current = try current.directory(name)
        }
        close(try current.openFile(RawPath([0xff]), flags: O_WRONLY | O_CREAT, mode: 0o644))
    }

    @Test("removeTree removes a tree deeper than PATH_MAX whose names are not UTF-8")
    func removeDeepTree() async throws {
        let scratch = try ScratchDirectory()
        let path = scratch.path
        try await BlockingPool.shared.run {
            try FileSystem.makeDirectory(path + "/deep")
            try Self.makeDeepTree(path + "/deep", name: RawPath([0xff, 0xfe, 0x64, 0x64, 0x64]), depth: 1000)
            try FileSystem.removeTree(path + "/deep")
        }
        #expect(!FileSystem.exists(scratch.path + "/deep"))
    }

    @Test("the layer archive of a tree deeper than PATH_MAX round-trips")
    func archiveDeepTree() async throws {
        let scratch = try ScratchDirectory()
        let path = scratch.path
        let (entries, digest, copied) = try await BlockingPool.shared.run { try Self.archiveRoundTrip(path) }
        #expect(entries == 601)
        #expect(copied == digest)
    }

    /// Makes a deep tree under `path`, archives it, extracts it, archives the copy.
    /// - Returns: the entries and digest of the tree, and the digest of its copy.
    static func archiveRoundTrip(_ path: String) throws -> (Int, String, String) {
        try FileSystem.makeDirectory(path + "/deep")
        try Self.makeDeepTree(path + "/deep", name: "dddddd", depth: 600)
        let summary = try LayerArchiver.archive(directory: path + "/deep")
        let tarPath = path + "/deep.tar"
        let out = open(tarPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        _ = try LayerArchiver.archive(directory: path + "/deep") {
            try FileSystem.writeAll(fd: out, $0, path: tarPath)
        }
        close(out)
        let input = open(tarPath, O_RDONLY | O_CLOEXEC)
        defer { close(input) }
        var reader = TarReader(fd: input, name: tarPath)
        try FileSystem.makeDirectory(path + "/copy")
        var extractor = LayerExtractor(root: path + "/copy")
        try extractor.extract(&reader, source: tarPath)
        return (summary.entries, summary.digest, try LayerArchiver.archive(directory: path + "/copy").digest)
    }

    @Test("runs that leave such trees commit them or leave nothing, and gc keeps working", .requiresRoot)
    func runsLeavingDeepTrees() async throws {
        let t = try TemporaryStore()
        let deep =
            "i=0; while [ $i -lt 600 ]; do mkdir dddddd && cd -P dddddd || exit 9; i=$((i+1)); done; echo x > \"$(printf '\\377')\""
        let kept = try await t.sh("cd /tmp && " + deep)
        #expect(kept.record.exitCode == 0, "\(kept.err)")
        let image = try t.image(of: kept)
        let bottom = try await t.sh("cd /tmp && while [ -d dddddd ]; do cd -P dddddd || exit 9; done; cat *") {
            $0.image = image.uuid
        }
        #expect(bottom.out == "x\n")
        _ = try await t.sh("cd /tmp && " + deep) { $0.disposable = true }
        _ = try await t.sh("cd /tmp && " + deep + "; sleep 30") { $0.timeout = 2 }
        #expect(try FileSystem.list(t.store.tmpPath).isEmpty)
        try t.store.removeImage(image.uuid, force: true)
        let report = try t.store.collectGarbage()
        #expect(report.failures.isEmpty && report.layersRemoved == 1)
        #expect(try t.store.checkConsistency().isConsistent)
    }
}

@Suite("Whiteouts that name no file")
struct WhiteoutNameTests {
    @Test("a whiteout of '', '.' or '..' is refused and touches nothing", arguments: [".wh.", ".wh..", ".wh..."])
    func refused(_ name: String) throws {
        let target = try ScratchDirectory()
        try FileSystem.makeDirectory(target.path + "/layer")
        try FileSystem.makeDirectory(target.path + "/layer/keep")
        var extractor = LayerExtractor(root: target.path + "/layer")
        let error = try #require(throws: SandboxError.self) {
            try extractor.add(TarEntry(path: RawPath("keep/" + name), kind: .regular, mode: 0), source: "t.tar") { _ in
                0
            }
        }
        #expect(error.code == .invalidArgument && error.message.contains("names no file"))
        #expect(FileSystem.isDirectory(target.path + "/layer/keep"))
        #expect(FileSystem.isDirectory(target.path))
    }
}

@Suite("Odd names print escaped", .requiresRoot)
struct EscapedNameTests {
    @Test("inspect ls and image diff escape a newline, a bad byte and a direction override in a name")
    func escaped() async throws {
        let t = try TemporaryStore()
        let made = try await runCLI(
            [
                "exec", "--tag", "v1", "--", "sh", "-c",
                "mkdir /d; touch \"/d/$(printf 'x\\ny')\" \"/d/$(printf '\\377')\" \"/d/a$(printf '\\342\\200\\256')b\"",
            ],
            home: t.root)
        #expect(made.status == 0, "\(made.err)")
        let ls = try await runCLI(["inspect", "ls", "v1", "/d"], home: t.root)
        #expect(ls.out.split(separator: "\n").sorted() == ["\\xff", "a\\u{202e}b", "x\\ny"], "\(ls.out)")
        let diff = try await runCLI(["image", "diff", "busybox", "v1"], home: t.root)
        #expect(diff.out.contains("A /d/x\\ny\n") && diff.out.contains("A /d/\\xff\n"), "\(diff.out)")
    }
}
