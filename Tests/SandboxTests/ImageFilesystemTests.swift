import ContreeTestSupport
import Foundation
import Glibc
import Testing

@testable import ImageFormats
@testable import SystemSupport

@Suite("Reading images without a sandbox", .requiresRoot)
struct ImageFilesystemTests {
    /// Two hand-made layers: the upper deletes, hides and replaces parts of the lower.
    func layers() throws -> (ScratchDirectory, ScratchDirectory, ImageFilesystem) {
        let lower = try ScratchDirectory()
        let upper = try ScratchDirectory()
        try lower.write("etc/passwd", "root\n")
        try lower.write("etc/deleted", "old\n")
        try lower.write("opaque/hidden", "below\n")
        try lower.write("data/a", "a\n")
        #expect(symlink("/etc/passwd", lower.path + "/abs") == 0)
        #expect(symlink("../../../../etc/shadow", lower.path + "/etc/escape") == 0)
        #expect(symlink("etc", lower.path + "/rel") == 0)
        try upper.write("data/b", "b\n")
        try upper.write("opaque/new", "above\n")
        try FileSystem.setXattr(upper.path + "/opaque", "trusted.overlay.opaque", Array("y".utf8))
        try FileSystem.makeDirectories(upper.path + "/etc")
        #expect(mknod(upper.path + "/etc/deleted", S_IFCHR, 0) == 0)
        return (lower, upper, ImageFilesystem(layersTopFirst: [upper.path, lower.path]))
    }

    @Test("whiteouts delete, opaque directories hide what is below, other directories merge")
    func mergedView() throws {
        let (lower, upper, fs) = try layers()
        defer { withExtendedLifetime((lower, upper)) {} }
        #expect(try fs.lookup("/etc/deleted") == nil)
        #expect(try fs.lookup("/etc/passwd") != nil)
        #expect(try fs.list(try #require(try fs.lookup("/opaque"))).map(\.name) == ["new"])
        #expect(try fs.list(try #require(try fs.lookup("/data"))).map(\.name) == ["a", "b"])
        #expect(try fs.list(try #require(try fs.lookup("/etc"))).map(\.name) == ["escape", "passwd"])
    }

    @Test("symlinks resolve inside the image, absolute ones from the image's root")
    func symlinks() throws {
        let (lower, upper, fs) = try layers()
        defer { withExtendedLifetime((lower, upper)) {} }
        let viaAbsolute = try #require(try fs.lookup("/abs"))
        #expect(try fs.readFile(viaAbsolute) == Array("root\n".utf8))
        #expect(try fs.lookup("/rel/passwd") != nil)
        #expect(try fs.lookup("/abs", followFinal: false)?.isSymlink == true)
    }

    @Test("paths and links that climb above the root are errors, never host paths")
    func escapes() throws {
        let (lower, upper, fs) = try layers()
        defer { withExtendedLifetime((lower, upper)) {} }
        let viaPath = try #require(throws: SandboxError.self) { _ = try fs.lookup("/../../etc/passwd") }
        #expect(viaPath.code == .pathEscapes)
        let viaLink = try #require(throws: SandboxError.self) { _ = try fs.lookup("/etc/escape") }
        #expect(viaLink.code == .pathEscapes && viaLink.message.contains("/etc/escape"))
    }

    @Test("an export carries the merged tree without whiteouts")
    func export() throws {
        let (lower, upper, fs) = try layers()
        defer { withExtendedLifetime((lower, upper)) {} }
        var bytes: [UInt8] = []
        try fs.export(try #require(try fs.lookup("/etc"))) { bytes.append(contentsOf: $0) }
        let scratch = try ScratchDirectory()
        try FileSystem.writeFile(scratch.path + "/etc.tar", bytes)
        let names = String(
            decoding: try ChildProcess.run(["tar", "-tf", scratch.path + "/etc.tar"]).stdout, as: UTF8.self)
        #expect(names.split(separator: "\n") == ["etc/", "etc/escape", "etc/passwd"])
    }
}
