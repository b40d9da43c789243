import Foundation
import Sandbox
import Synchronization
import SystemSupport
import Testing

@testable import Pipeline

/// Runs no sandbox: records each request and answers from a script. Each step "leaves" its
/// parent's snapshot unchanged and writes the outputs it is told to.
final class FakeStepExecutor: StepExecutor {
    struct Answer: Sendable {
        var exitCode: Int32 = 0
        var output = ""
    }
    private let answers: [String: Answer]
    private let requests = Mutex<[StepRequest]>([])

    init(_ answers: [String: Answer] = [:]) { self.answers = answers }

    var calls: [String] { requests.withLock { $0.map(\.node) } }
    func request(_ node: String) -> StepRequest? { requests.withLock { $0.last { $0.node == node } } }

    func run(_ request: StepRequest, log: StepLog) async throws -> StepOutcome {
        requests.withLock { $0.append(request) }
        let answer = answers[request.node] ?? Answer()
        log.append(Array("ran \(request.node)\n".utf8))
        let record = RunRecord(
            id: UUID().uuidString, image: request.parent, resultImage: request.parent, command: request.command,
            termination: Termination(exitCode: answer.exitCode), disposable: false, backend: request.isolation,
            startedAt: Date())
        return StepOutcome(record: record, output: Array(answer.output.utf8), attempts: 1)
    }
}

/// The runner's decisions above the executor seam (cache, --from, --fail-on-cache-miss,
/// failures, outputs into later steps, secrets apart from the key), with no sandbox at all.
@Suite("the runner over a fake step executor")
struct StepExecutorTests {
    static let pipeline = """
        name: seam
        image: busybox
        secrets:
          TOKEN: {env: CI_TOKEN}
        steps:
          - id: a
            run: echo a
          - id: b
            needs: [a]
            secrets: [TOKEN]
            env: {FROM_A: "${{ steps.a.outputs.version }}"}
            run: echo b
        """

    func run(
        _ workspace: Workspace, _ executor: FakeStepExecutor, _ options: RunOptions = RunOptions(),
        pipeline: String = pipeline
    ) async throws -> RunReport {
        try workspace.write("pipeline.yaml", pipeline)
        let plan = PipelinePlan(try PipelineParser.parse(file: workspace.project + "/pipeline.yaml"))
        var options = options
        options.environment["CI_TOKEN"] = "s3cret"
        options.outDir = workspace.root + "/runs/" + UUID().uuidString.prefix(8)
        return try await PipelineRunner(plan: plan, engine: workspace.engine, steps: executor, options: options).run()
    }

    @Test("the request carries what the step needs; a rerun is all hits and calls nothing")
    func requestsAndHits() async throws {
        let workspace = try Workspace()
        let first = FakeStepExecutor(["a": .init(output: "version=1.2\n")])
        let report = try await run(workspace, first)
        #expect((report.exitStatus == 0) && first.calls == ["a", "b"])
        let b = try #require(first.request("b"))
        #expect(b.environment["FROM_A"] == "1.2" && b.environment["CONTREE_STEP"] == "b")
        #expect(b.secrets == ["TOKEN": "s3cret"] && b.environment["TOKEN"] == nil)
        #expect(b.parent == report.node("a")?.resultImage && b.key == report.node("b")?.key)
        #expect(b.command.last == "echo b" && b.attempts == 1 && b.inputRoot == workspace.project)

        let again = FakeStepExecutor(["a": .init(output: "version=1.2\n")])
        let rerun = try await run(workspace, again)
        #expect((rerun.exitStatus == 0) && again.calls.isEmpty && rerun.hits == ["a", "b"])
    }

    @Test("--from runs a step and what follows again; --fail-on-cache-miss fails a miss without running it")
    func forcedAndStrict() async throws {
        let workspace = try Workspace()
        _ = try await run(workspace, FakeStepExecutor(["a": .init(output: "version=1\n")]))
        let forced = FakeStepExecutor(["a": .init(output: "version=1\n")])
        var options = RunOptions()
        options.forceSteps = ["b"]
        #expect(try await run(workspace, forced, options).exitStatus == 0 && forced.calls == ["b"])

        // b's command changed: a miss that must not run.
        let strict = FakeStepExecutor()
        options = RunOptions()
        options.failOnCacheMiss = true
        let changed = Self.pipeline.replacingOccurrences(of: "run: echo b", with: "run: echo b2")
        let report = try await run(workspace, strict, options, pipeline: changed)
        #expect(!(report.exitStatus == 0) && strict.calls.isEmpty && report.hits == ["a"])
        #expect(
            report.node("b")?.status == .failed && report.node("b")?.reason?.contains("--fail-on-cache-miss") == true)
    }

    @Test("a failed step fails the run and the step after it never reaches the executor")
    func failure() async throws {
        let workspace = try Workspace()
        let executor = FakeStepExecutor(["a": .init(exitCode: 3)])
        let report = try await run(workspace, executor)
        #expect(!(report.exitStatus == 0) && executor.calls == ["a"])
        #expect(report.node("a")?.reason == "exited with status 3" && report.node("b")?.status != .passed)
    }
}

@Suite("identical keys in one run execute once")
struct SharedKeyTests {
    /// Holds every request until released, counting them.
    final class Gate: StepExecutor {
        let calls = Mutex(0)
        let open = Mutex(false)

        func run(_ request: StepRequest, log: StepLog) async throws -> StepOutcome {
            calls.withLock { $0 += 1 }
            while !open.withLock({ $0 }) { try await Task.sleep(for: .milliseconds(5)) }
            let record = RunRecord(
                id: "r", image: request.parent, resultImage: "child", command: request.command,
                termination: Termination(exitCode: 0), disposable: false, backend: .container, startedAt: Date())
            return StepOutcome(record: record, output: Array("n=1\n".utf8), attempts: 1)
        }
    }

    func request(_ node: String, key: String) -> StepRequest {
        StepRequest(
            node: node, key: key, parent: "p", command: ["true"], environment: [:], secrets: [:], workdir: "/",
            inputs: [], inputRoot: "/", timeout: nil, limits: ResourceLimits(), network: .loopback,
            isolation: .container, attempts: 1, outputPath: "/o")
    }

    @Test(
        "a key already running is waited for and its outcome shared; another key runs at once", .timeLimit(.minutes(5)))
    func shared() async throws {
        let gate = Gate()
        let executor = SharedKeyExecutor(gate)
        let log = StepLog(path: "/tmp/contree-shared-key-\(UUID().uuidString.prefix(8)).log", secrets: [:])
        defer { unlink(log.path) }
        async let first = executor.run(request("a", key: "k"), log: log)
        // The second arrives while the first runs (the gate holds it until all have asked).
        while gate.calls.withLock({ $0 }) < 1 { try await Task.sleep(for: .milliseconds(1)) }
        async let second = executor.run(request("b", key: "k"), log: log)
        async let other = executor.run(request("c", key: "other"), log: log)
        while gate.calls.withLock({ $0 }) < 2 || executor.joined.withLock({ $0 }) < 1 {
            try await Task.sleep(for: .milliseconds(1))
        }
        gate.open.withLock { $0 = true }
        let (a, b, c) = try await (first, second, other)
        #expect(gate.calls.withLock { $0 } == 2)
        #expect(a.record.resultImage == "child" && b.record.resultImage == "child" && b.output == a.output)
        #expect(c.record.resultImage == "child")
    }
}
