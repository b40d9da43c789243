import ContreeTestSupport
import Foundation
import Testing

@testable import Pipeline

@Suite("run --verify", .requiresRoot)
struct VerifyTests {
    static let yaml = """
        name: verify
        steps:
          - id: fixed
            run: echo fixed > /workspace/out; mkdir -p /workspace/d; echo same > /workspace/d/f
          - id: random
            run: cat /proc/sys/kernel/random/uuid > /workspace/id; echo fixed >> /workspace/out
          - id: after
            run: cat /workspace/out
        """

    @Test("cached steps run again from their parents: the same files pass, other files fail and are listed")
    func verify() async throws {
        let w = try Workspace()
        let first = try await w.run(Self.yaml)
        #expect(first.status == .passed && first.ran.count == 3)

        var options = RunOptions(keepGoing: true)
        options.verify = []
        let checked = try await w.run(options: options)
        #expect(checked.status == .failed)
        let fixed = try #require(checked.node("fixed"))
        #expect(fixed.status == .passed && fixed.cached)
        #expect([.identical, .sameFiles].contains(fixed.verification?.verdict))
        #expect(fixed.resultImage == first.node("fixed")?.resultImage, "a verified step goes on as its hit")
        #expect(fixed.verification?.verifiedImage == nil, "a reproducible run's snapshot is not kept")

        let random = try #require(checked.node("random"))
        #expect(random.status == .failed)
        #expect(random.verification?.verdict == .differs)
        #expect(random.verification?.changes == ["M /workspace/id"])
        let kept = try #require(random.verification?.verifiedImage)
        #expect(try w.store.image(kept) != nil, "kept for image diff")
        #expect(random.reason?.contains("not reproducible: run again from the same parent, 1 path differs: M /workspace/id") == true)
        #expect(random.reason?.contains("image diff \(first.node("random")!.resultImage!) \(kept)") == true)
        #expect(checked.log("random").contains("--verify: M /workspace/id"))
        #expect(checked.node("after")?.status == .skipped)
        #expect(RunViews.summary(checked).contains("verify: 2 cached steps run again from the same parent"))

        // Only the steps named are verified; the others are hits as usual.
        options.verify = ["fixed", "after"]
        let some = try await w.run(options: options)
        #expect(some.status == .passed)
        #expect(some.node("random")?.verification == nil && some.node("random")?.cached == true)
        #expect(some.node("after")?.verification != nil)
    }
}
