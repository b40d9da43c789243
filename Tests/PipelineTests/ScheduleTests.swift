import Foundation
import Synchronization
import Testing

@testable import Pipeline

/// Runs nodes without sandboxes: each node's outcome comes from `outcomes` (by step id; passed
/// by default), each passed node "makes" the snapshot `image-of-NODE`, and every start is logged.
final class FakeExecutor: Sendable {
    let outcomes: [String: NodeStatus]
    /// Steps that wait until they are cancelled (a long step fail-fast or Ctrl-C stops).
    let hanging: Set<String>
    /// What passed steps write to $CONTREE_OUTPUT, by step id.
    let outputs: [String: [String: String]]
    private let log = Mutex<[String]>([])
    private let concurrent = Mutex((now: 0, most: 0))

    init(
        _ outcomes: [String: NodeStatus] = [:], hanging: Set<String> = [], outputs: [String: [String: String]] = [:]
    ) {
        self.outcomes = outcomes
        self.hanging = hanging
        self.outputs = outputs
    }

    var started: [String] { log.withLock { $0 } }
    var mostAtOnce: Int { concurrent.withLock { $0.most } }

    func execute(_ node: PlanNode, results: ResultTable) async -> NodeResult {
        log.withLock { $0.append(node.id) }
        concurrent.withLock {
            $0.now += 1
            $0.most = max($0.most, $0.now)
        }
        defer { concurrent.withLock { $0.now -= 1 } }
        var result = NodeResult(node: node, status: outcomes[node.step] ?? .passed)
        if hanging.contains(node.step) {
            while !Task.isCancelled { try? await Task.sleep(for: .milliseconds(5)) }
            result.status = .cancelled
        } else {
            await Task.yield()
        }
        if case .node(let parent) = node.parent { result.parentImage = results[parent]?.resultImage }
        if result.status == .passed {
            result.resultImage = "image-of-" + node.id
            result.outputs = outputs[node.step] ?? [:]
        }
        if result.status == .failed, node.continueOnError { result.toleratedFailure = true }
        return result
    }
}

/// The scheduler's semantics without root, sandboxes or a store: milliseconds each.
@Suite("The scheduler, with a fake executor", .timeLimit(.minutes(5)))
struct ScheduleTests {
    static func plan(_ yaml: String) throws -> PipelinePlan {
        PipelinePlan(try PipelineParser.parse(yaml, file: "pipeline.yaml", directory: "/nonexistent"))
    }

    /// Drives `yaml`'s plan to its end on `executor`; the results by node id, and the order recorded.
    static func run(
        _ yaml: String, _ executor: FakeExecutor, jobs: Int = 2, keepGoing: Bool = false
    ) async throws -> (results: [String: NodeResult], recorded: [String]) {
        var schedule = Schedule(plan: try plan(yaml), jobs: jobs, keepGoing: keepGoing, baseImage: "base")
        var recorded: [String] = []
        await PipelineRunner.drive(&schedule, execute: executor.execute, observer: nil) { recorded.append($0.node) }
        return (schedule.results, recorded)
    }

    @Test("a chain runs in order, each step from its parent's snapshot, every node recorded once")
    func chain() async throws {
        let executor = FakeExecutor()
        let (results, recorded) = try await Self.run(
            "steps:\n  - id: a\n    run: x\n  - id: b\n    run: x\n  - id: c\n    run: x\n", executor)
        #expect(executor.started == ["a", "b", "c"])
        #expect(results["c"]?.parentImage == "image-of-b")
        #expect(recorded.sorted() == ["a", "b", "c"])
    }

    @Test("no more than --jobs nodes run at once")
    func jobsBound() async throws {
        let yaml =
            "steps:\n  - id: root\n    run: x\n"
            + (1...6).map { "  - id: s\($0)\n    from: root\n    run: x\n" }.joined()
        let executor = FakeExecutor()
        let (results, _) = try await Self.run(yaml, executor, jobs: 2)
        #expect(results.values.allSatisfy { $0.status == .passed })
        #expect(executor.mostAtOnce <= 2)
        #expect(executor.started.count == 7)
    }

    @Test("fail-fast stops a running sibling and skips what has not started; --keep-going runs independent branches")
    func failFast() async throws {
        let yaml = """
            steps:
              - id: setup
                run: x
              - id: unit
                run: x
              - id: slow
                from: setup
                run: x
              - id: lint
                from: setup
                run: x
            """
        let stopped = try await Self.run(yaml, FakeExecutor(["unit": .failed], hanging: ["slow"]), jobs: 2)
        #expect(stopped.results["unit"]?.status == .failed)
        #expect(stopped.results["slow"]?.status == .cancelled)
        #expect(stopped.results["slow"]?.reason == PipelineRunner.failFastReason)
        #expect(stopped.results["lint"]?.status == .skipped)
        #expect(stopped.results["lint"]?.reason == PipelineRunner.failFastReason)

        let going = try await Self.run(yaml, FakeExecutor(["unit": .failed]), jobs: 2, keepGoing: true)
        #expect(going.results["slow"]?.status == .passed && going.results["lint"]?.status == .passed)
    }

    @Test(
        "if: success() by default, failure() and always() after a failure, a false if: passes its parent's snapshot on")
    func conditions() async throws {
        let yaml = """
            env: {DEPLOY: "no"}
            steps:
              - id: build
                run: x
              - id: deploy
                if: env.DEPLOY == 'yes'
                run: x
              - id: smoke
                run: x
              - id: test
                needs: [build]
                from: build
                run: x
              - id: after-test
                from: test
                run: x
              - id: notify
                from: test
                if: failure()
                run: x
              - id: cleanup
                from: test
                if: always()
                run: x
              - id: quiet
                from: build
                if: failure()
                run: x
            """
        let (results, _) = try await Self.run(yaml, FakeExecutor(["test": .failed]), keepGoing: true)
        #expect(results["deploy"]?.status == .skipped && results["deploy"]?.resultImage == "image-of-build")
        #expect(results["smoke"]?.status == .passed && results["smoke"]?.parentImage == "image-of-build")
        #expect(results["after-test"]?.status == .skipped)
        #expect(results["after-test"]?.reason == "a step it depends on did not succeed")
        #expect(results["notify"]?.status == .passed)
        #expect(results["cleanup"]?.status == .passed)
        #expect(results["quiet"]?.status == .skipped && results["quiet"]?.resultImage == "image-of-build")
    }

    @Test("continue-on-error lets what follows run; a fork whose variants all failed to start is skipped")
    func toleratedAndForks() async throws {
        let yaml = """
            steps:
              - id: flaky
                continue-on-error: true
                run: x
              - id: next
                run: x
              - id: search
                if: env.NEVER == 'x'
                env: {NEVER: "y"}
                fork: {a: {run: x}, b: {run: x}}
                select: {keep: all}
            """
        let (results, _) = try await Self.run(yaml, FakeExecutor(["flaky": .failed]))
        #expect(results["flaky"]?.toleratedFailure == true)
        #expect(results["next"]?.status == .passed)
        #expect(results["search.a"]?.status == .skipped && results["search.b"]?.status == .skipped)
        #expect(results["search"]?.status == .skipped && results["search"]?.reason == "none of its variants ran")
    }

    @Test("a matrix runs each combination as a branch; what comes from it runs once per combination")
    func matrix() async throws {
        let yaml = """
            steps:
              - id: build
                matrix: {cc: [gcc, clang]}
                run: x
              - id: test
                run: x
            """
        let (results, _) = try await Self.run(yaml, FakeExecutor(["build": .passed]))
        #expect(results["test[cc=gcc]"]?.parentImage == "image-of-build[cc=gcc]")
        #expect(results["test[cc=clang]"]?.parentImage == "image-of-build[cc=clang]")
    }

    @Test("cancelling the run cancels what has not started but still runs always() and cancelled() steps")
    func cancellation() async throws {
        let yaml = """
            steps:
              - id: long
                run: x
              - id: after
                run: x
              - id: cleanup
                if: cancelled()
                run: x
            """
        let executor = FakeExecutor(hanging: ["long"])
        let task = Task { try await Self.run(yaml, executor) }
        while executor.started.isEmpty { try await Task.sleep(for: .milliseconds(5)) }
        task.cancel()
        let (results, _) = try await task.value
        #expect(results["long"]?.status == .cancelled)
        #expect(results["after"]?.status == .cancelled)
        #expect(results["cleanup"]?.status == .passed)
        #expect(executor.started == ["long", "cleanup"])
    }

    @Test("the state machine alone: advance starts what is ready, finish reports fail-fast, unreached settles the rest")
    func stateMachine() throws {
        var schedule = Schedule(
            plan: try Self.plan("steps:\n  - id: a\n    run: x\n  - id: b\n    needs: []\n    from: a\n    run: x\n"),
            jobs: 1, keepGoing: false, baseImage: "base")
        let first = schedule.advance(cancelled: false)
        #expect(first.start.map(\.id) == ["a"] && first.settled.isEmpty)
        let waiting = schedule.advance(cancelled: false)
        #expect(waiting.start.isEmpty, "a runs: b waits for it")
        var failed = NodeResult(node: first.start[0], status: .failed)
        failed.reason = "exited with status 1"
        let stops = schedule.finish(failed)
        #expect(stops, "a failure stops the run")
        let second = schedule.advance(cancelled: false)
        #expect(second.start.isEmpty && second.settled.map(\.node) == ["b"])
        #expect(schedule.isIdle)
        let rest = schedule.unreached(cancelled: false)
        #expect(rest.isEmpty)
    }
}
