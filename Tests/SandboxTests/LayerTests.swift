import ContreeTestSupport
import Crypto
import Foundation
import Glibc
import Testing

@testable import ImageFormats
@testable import Sandbox
@testable import SystemSupport

@Suite("Layers: canonical digests and safe extraction")
struct LayerTests {
    @Test("a layer's digest is the sha256 of its canonical tar stream and ignores creation order")
    func digestIsContentAddressed() throws {
        let a = try ScratchDirectory()
        let b = try ScratchDirectory()
        try a.write("x/1", "one")
        try a.write("y", "two")
        try b.write("y", "two")
        try b.write("x/1", "one")
        for dir in [a.path, b.path] {
            try BaseImages.setTimes(dir, 1_000_000)
        }
        var stream: [UInt8] = []
        let summaryA = try LayerArchiver.archive(directory: a.path) { stream.append(contentsOf: $0) }
        let summaryB = try LayerArchiver.archive(directory: b.path)
        #expect(summaryA.digest == summaryB.digest)
        #expect(summaryA.digest == Digest(SHA256.hash(data: stream)).description)
        #expect(summaryA.files == 2 && summaryA.bytes == 6 && summaryA.entries == 3)
        try a.write("y", "changed")
        try BaseImages.setTimes(a.path, 1_000_000)
        #expect(try LayerArchiver.archive(directory: a.path).digest != summaryB.digest)
    }

    @Test("whiteouts and opaque directories become OCI .wh. entries", .requiresRoot)
    func whiteoutsInStream() throws {
        let layer = try ScratchDirectory()
        try FileSystem.makeDirectories(layer.path + "/opaque")
        try FileSystem.setXattr(layer.path + "/opaque", "trusted.overlay.opaque", Array("y".utf8))
        #expect(mknod(layer.path + "/gone", S_IFCHR, 0) == 0)
        var stream: [UInt8] = []
        _ = try LayerArchiver.archive(directory: layer.path) { stream.append(contentsOf: $0) }
        let path = layer.path + ".tar"
        defer { unlink(path) }
        try FileSystem.writeFile(path, stream)
        let names = String(decoding: try ChildProcess.run(["tar", "-tf", path]).stdout, as: UTF8.self)
        #expect(names.split(separator: "\n") == [".wh.gone", "opaque/", "opaque/.wh..wh..opq"])
    }

    @Test("extraction turns .wh. entries back into overlay whiteouts, so the digest round-trips", .requiresRoot)
    func extractionRoundTrip() throws {
        let source = try ScratchDirectory()
        try source.write("keep/file", "data")
        try FileSystem.setXattr(source.path + "/keep", "trusted.overlay.opaque", Array("y".utf8))
        #expect(mknod(source.path + "/removed", S_IFCHR, 0) == 0)
        #expect(link(source.path + "/keep/file", source.path + "/hard") == 0)
        try BaseImages.setTimes(source.path, 1_234_567)
        var stream: [UInt8] = []
        let original = try LayerArchiver.archive(directory: source.path) { stream.append(contentsOf: $0) }
        let tarPath = source.path + ".tar"
        defer { unlink(tarPath) }
        try FileSystem.writeFile(tarPath, stream)

        let target = try ScratchDirectory()
        let fd = open(tarPath, O_RDONLY)
        defer { close(fd) }
        var reader = TarReader(fd: fd, name: tarPath)
        var extractor = LayerExtractor(root: target.path)
        try extractor.extract(&reader, source: tarPath)
        let st = try #require(try FileSystem.status(target.path + "/removed"))
        #expect(st.isWhiteout)
        #expect(try LayerArchiver.isOpaque(target.path + "/keep"))
        #expect(try LayerArchiver.archive(directory: target.path).digest == original.digest)
    }

    @Test("members that climb out with .. are refused", arguments: ["../evil", "a/../../evil", "./../x"])
    func dotDotRefused(member: String) throws {
        let target = try ScratchDirectory()
        var extractor = LayerExtractor(root: target.path)
        let error = try #require(throws: SandboxError.self) {
            try extractor.add(TarEntry(path: RawPath(member), kind: .regular, mode: 0o644), source: "test.tar") { _ in 0
            }
        }
        #expect(error.code == .pathEscapes)
        #expect(error.message.contains(member))
    }

    @Test("a member written through a symlink the archive planted is refused")
    func symlinkTraversalRefused() throws {
        let target = try ScratchDirectory()
        let outside = try ScratchDirectory()
        var extractor = LayerExtractor(root: target.path)
        try extractor.add(
            TarEntry(path: "link", kind: .symlink(target: RawPath(outside.path)), mode: 0o777), source: "t.tar"
        ) {
            _ in 0
        }
        let error = try #require(throws: SandboxError.self) {
            try extractor.add(TarEntry(path: "link/owned", kind: .regular, mode: 0o644), source: "t.tar") { _ in 0 }
        }
        #expect(error.code == .pathEscapes)
        #expect(!FileSystem.exists(outside.path + "/owned"))
    }

    @Test("absolute member names land inside the layer")
    func absoluteNamesStayInside() throws {
        let target = try ScratchDirectory()
        var extractor = LayerExtractor(root: target.path)
        var content = Array("x".utf8)
        try extractor.add(TarEntry(path: "/etc/abs", kind: .regular, mode: 0o644, size: 1), source: "t.tar") { buffer in
            let n = min(buffer.count, content.count)
            buffer.copyMemory(from: UnsafeRawBufferPointer(start: content, count: n))
            content.removeFirst(n)
            return n
        }
        #expect(try FileSystem.readFile(target.path + "/etc/abs") == Array("x".utf8))
    }
}
