import ContreeTestSupport
import Foundation
import Glibc
import Testing

@testable import Sandbox
@testable import SystemSupport

/// The slow path: debootstrap takes about a minute, so one focused test covers it.
@Suite("The debian:bookworm built-in image", .requiresRoot, .timeLimit(.minutes(10)))
struct DebianImageTests {
    @Test("is built with debootstrap on first use, runs Debian's tools, and branches like any image")
    func buildAndRun() async throws {
        let t = try TemporaryStore()
        let engine = t.engine
        let base = try await BlockingPool.shared.run { try engine.baseImages.resolve("debian:bookworm") }
        #expect(base.tags == ["debian:bookworm"])
        #expect(base.size > 50 << 20)
        let info = try await engine.run(
            RunSpec(
                image: "debian:bookworm",
                command: ["sh", "-c", "cat /etc/debian_version; dpkg-query -W | wc -l; id -un"]))
        let lines = info.out.split(separator: "\n")
        #expect(lines.first?.hasPrefix("12") == true, "\(info.out) \(info.err)")
        #expect(Int(lines.dropFirst().first ?? "") ?? 0 > 50)
        #expect(lines.last == "root")
        #expect(info.record.resultImage == base.uuid, "reading changes nothing")
        // A package-manager style change: a user added with Debian's own tools.
        let user = try await engine.run(RunSpec(image: base.uuid, command: ["useradd", "-m", "builder"]))
        #expect(user.record.exitCode == 0, "\(user.err)")
        let child = try #require(user.record.resultImage)
        let check = try await engine.run(
            RunSpec(image: child, command: ["sh", "-c", "id builder; stat -c %U /home/builder"]))
        #expect(check.out.contains("uid=1000(builder)") && check.out.hasSuffix("builder\n"))
        #expect(try t.store.checkConsistency(verifyContent: false).isConsistent)
        // Built once: a second resolve is the same image.
        #expect(
            try await BlockingPool.shared.run { try engine.baseImages.resolve("debian:bookworm") }.uuid == base.uuid)
    }
}
