import Foundation
import Glibc
import Testing

@testable import ImageFormats
@testable import SystemSupport

@Suite("Tar streams")
struct TarTests {
    func write(_ entries: [(TarEntry, [UInt8])]) throws -> [UInt8] {
        var out: [UInt8] = []
        let writer = TarWriter { out.append(contentsOf: $0) }
        for (entry, content) in entries {
            try writer.append(entry) { emit in try content.withUnsafeBytes { try emit($0) } }
        }
        try writer.finish()
        return out
    }

    let sample: [(TarEntry, [UInt8])] = [
        (TarEntry(path: "etc", kind: .directory, mode: 0o755, mtime: 1_700_000_000), []),
        (
            TarEntry(path: "etc/hello", kind: .regular, mode: 0o644, uid: 7, gid: 8, size: 5, mtime: 1_700_000_001),
            Array("hello".utf8)
        ),
        (TarEntry(path: "etc/link", kind: .symlink(target: "/etc/hello"), mode: 0o777), []),
        (
            TarEntry(
                path: RawPath(String(repeating: "d", count: 120) + "/" + String(repeating: "f", count: 150)),
                kind: .regular,
                mode: 0o600, uid: 3_000_000, size: 3, xattrs: [("user.note", Array("x".utf8))]), Array("abc".utf8)
        ),
    ]

    @Test("the same entries always give the same bytes")
    func deterministic() throws {
        #expect(try write(sample) == write(sample))
        #expect(try write(sample).count % 512 == 0)
    }

    @Test("a written stream reads back entry by entry, long names, big ids and xattrs included")
    func roundTrip() throws {
        let bytes = try write(sample)
        let scratch = try ScratchDirectory()
        let path = scratch.path + "/a.tar"
        try FileSystem.writeFile(path, bytes)
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var reader = TarReader(fd: fd, name: path)
        var read: [(TarEntry, [UInt8])] = []
        while let entry = try reader.next() {
            var content: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 7)
            while true {
                let n = try buffer.withUnsafeMutableBytes { try reader.readContent(into: $0) }
                if n == 0 { break }
                content += buffer[0..<n]
            }
            read.append((entry, content))
        }
        #expect(read.map(\.0.path) == sample.map(\.0.path))
        #expect(read.map(\.1) == sample.map(\.1))
        #expect(read[3].0.uid == 3_000_000)
        #expect(read[3].0.xattrs.first?.0 == "user.note")
        #expect(read[2].0.kind == .symlink(target: "/etc/hello"))
    }

    @Test("GNU tar lists what the writer wrote")
    func gnuTarReads() throws {
        let scratch = try ScratchDirectory()
        let path = scratch.path + "/a.tar"
        try FileSystem.writeFile(path, try write(sample))
        let listing = try ChildProcess.run(["tar", "-tf", path])
        #expect(listing.succeeded, "\(listing.stderrText)")
        let names = String(decoding: listing.stdout, as: UTF8.self).split(separator: "\n").map(String.init)
        #expect(names == ["etc/", "etc/hello", "etc/link", sample[3].0.path.string])
    }

    @Test("a truncated archive is an error naming the file")
    func truncated() throws {
        let scratch = try ScratchDirectory()
        let path = scratch.path + "/cut.tar"
        try FileSystem.writeFile(path, Array(try write(sample).prefix(700)))
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var reader = TarReader(fd: fd, name: path)
        #expect(throws: SandboxError.self) {
            while let _ = try reader.next() {}
        }
    }

    @Test("garbage is not mistaken for a tar archive")
    func notTar() throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.write("junk.tar", String(repeating: "not a tar file ", count: 100))
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var reader = TarReader(fd: fd, name: path)
        let error = try #require(throws: SandboxError.self) { _ = try reader.next() }
        #expect(error.message.contains("not a tar archive"))
    }
}
