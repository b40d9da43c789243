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
        #expect(
            random.reason?.contains("not reproducible: run again from the same parent, 1 path differs: M /workspace/id")
                == true)
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

@Suite(
    "diff-runs", .requiresRoot,
    .enabled(if: FileManager.default.fileExists(atPath: CLI.binary), "needs `swift build` first"))
struct DiffRunsTests {
    @Test("per step, what changed in the key and which files differ; the first step whose snapshot diverged")
    func diffRuns() async throws {
        let w = try Workspace()
        let yaml = """
            name: diverge
            steps:
              - id: gen
                inputs: [data.txt]
                run: cp data.txt copy.txt
              - id: stamp
                image: busybox
                run: cat /proc/sys/kernel/random/uuid > id.txt
              - id: last
                run: echo done
            """
        try w.write("data.txt", "one\n")
        let a = try await w.run(yaml)
        try w.write("data.txt", "two\n")
        let b = try await w.run()
        var options = RunOptions()
        options.noCache = true
        let c = try await w.run(options: options)
        let home = w.root + "/store"

        let ab = try await CLI.run(["diff-runs", a.runID, b.runID], home: home, in: w.project)
        #expect(ab.status == 1, "\(ab.err)")
        #expect(ab.out.contains("first divergence: gen (its key changed)"), "\(ab.out)")
        #expect(ab.out.contains("  key: input"), "\(ab.out)")
        #expect(ab.out.contains("  M /workspace/data.txt") && ab.out.contains("  M /workspace/copy.txt"))

        let bc = try await CLI.run(["diff-runs", b.runID, c.runID, "--json"], home: home, in: w.project)
        #expect(bc.status == 1)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(bc.out.utf8)) as? [String: Any])
        #expect(json["first_divergence"] as? String == "stamp", "gen ran again to the same files: \(bc.out)")
        let steps = try #require(json["steps"] as? [[String: Any]])
        let stamp = try #require(steps.first { $0["node"] as? String == "stamp" })
        #expect(stamp["key_a"] as? String == stamp["key_b"] as? String)
        #expect(stamp["files"] as? [String] == ["M /workspace/id.txt"])
        let text = try await CLI.run(["diff-runs", b.runID, c.runID], home: home, in: w.project)
        #expect(text.out.contains("first divergence: stamp (its key is the same, so the command made other files"))

        let same = try await CLI.run(["diff-runs", b.runID, b.runID], home: home, in: w.project)
        #expect(same.status == 0 && same.out.contains("no step diverged"))
        let missing = try await CLI.run(["diff-runs", b.runID, "19990101-000000-zzzzzz"], home: home, in: w.project)
        #expect(
            missing.status == 2
                && missing.err.contains("no run 19990101-000000-zzzzzz; `contree-pipeline runs` lists them"))
    }
}
