import Foundation
import Sandbox
import Testing

@testable import Pipeline

/// What `runs`, `explain` and `shell` read back about past runs.
@Suite("Run history", .requiresRoot)
struct HistoryTests {
    @Test("two files that share a pipeline name keep two histories")
    func keptByFile() async throws {
        let w = try Workspace()
        let a = try await w.run("name: quickstart\nsteps:\n  - id: build\n    run: echo one\n", file: "a.yaml")
        let b = try await w.run("name: quickstart\nsteps:\n  - id: build\n    run: echo two\n", file: "ci/b.yaml")
        let cache = try StepCache(store: w.store)
        let planA = PipelinePlan(try PipelineParser.parse(file: w.project + "/a.yaml"))
        let planB = PipelinePlan(try PipelineParser.parse(file: w.project + "/ci/b.yaml"))
        #expect(try cache.lastRun(pipeline: "quickstart", file: planA.definition.absolutePath)?.id == a.runID)
        #expect(try cache.lastRun(pipeline: "quickstart", file: planB.definition.absolutePath)?.id == b.runID)
        #expect(try cache.runs().first { $0.id == b.runID }?.file == w.project + "/ci/b.yaml")
        // explain compares a.yaml's step with a.yaml's last run, not with b.yaml's.
        let explained = try KeyExplainer(plan: planA, engine: w.engine).explain(step: "build")
        #expect(explained.first?.previousRun == a.runID)
        #expect(explained.first?.differences == [])
    }

    @Test("a run's start is taken before its base image is built or imported")
    func startIncludesTheImage() async throws {
        let w = try Workspace()  // a new store: busybox is imported by this run
        let report = try await w.run("steps:\n  - id: a\n    run: true\n")
        let summary = try #require(try StepCache(store: w.store).run(report.runID))
        #expect(abs(summary.started.timeIntervalSince(report.started)) < 0.001)
        #expect(try #require(summary.ended).timeIntervalSince(summary.started) >= report.nodes[0].duration ?? 0)
    }
}
