import ContreeTestSupport
import Foundation
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

    @Test("explain names one matrix instance, and after a failure and a fix says what changed since the failure")
    func explainInstancesAndFailures() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: test
                matrix: {opt: ["-O0", "-O2"]}
                run: test "${{ matrix.opt }}" = "-O0"
            """
        let failed = try await w.run(yaml, options: RunOptions(keepGoing: true))
        #expect(failed.node("test[opt=-O2]")?.status == .failed)
        try w.write("pipeline.yaml", yaml.replacingOccurrences(of: "= \"-O0\"", with: "!= x"))
        let plan = PipelinePlan(try PipelineParser.parse(file: w.project + "/pipeline.yaml"))
        let explained = try KeyExplainer(plan: plan, engine: w.engine).explain(step: "test[opt=-O2]")
        #expect(explained.map(\.node) == ["test[opt=-O2]"])
        #expect(explained.first?.failedRun == failed.runID)
        #expect(explained.first?.changesSinceFailure == ["command: the script or shell changed"])
        #expect(try KeyExplainer(plan: plan, engine: w.engine).explain(step: "test").count == 2)
        #expect(throws: PipelineError.self) {
            try KeyExplainer(plan: plan, engine: w.engine).explain(step: "test[opt=-O3]")
        }
    }

    @Test("a fork variant that fails by design does not fail --fail-on-cache-miss once its failure is known")
    func knownVariantFailure() async throws {
        let w = try Workspace()
        try Repository.copyExamples(to: w)
        let first = try await w.run(file: "tree-search.yaml")
        #expect(first.status == .passed)
        #expect(first.nodes.contains { $0.node.contains("broken") && $0.status == .failed })
        let strict = try await w.run(options: RunOptions(failOnCacheMiss: true), file: "tree-search.yaml")
        #expect(strict.status == .passed, "\(strict.nodes.map { ($0.node, $0.status, $0.reason ?? "") })")
        #expect(strict.ran.isEmpty)
    }
}
