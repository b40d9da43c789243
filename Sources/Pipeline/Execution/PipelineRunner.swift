import Foundation
import Sandbox
import Synchronization

/// How a run behaves.
public struct RunOptions: Sendable {
    /// Nodes running at once (default: the number of cores).
    public var jobs: Int
    /// Run every independent branch after a failure instead of stopping.
    public var keepGoing: Bool
    /// Steps to execute even on a cache hit, with everything that depends on them.
    public var forceSteps: [String]
    public var noCache: Bool
    /// Fail instead of executing any step (reproducibility checks in CI).
    public var failOnCacheMiss: Bool
    /// The run's directory (default `.contree/runs/<run id>`, next to the pipeline file).
    public var outDir: String?
    /// Where to write JUnit XML, if anywhere.
    public var junitPath: String?
    /// The host environment secrets are read from.
    public var environment: [String: String]
    /// Read secret files and local image paths wherever they are (`--allow-host-paths`); by
    /// default they must lie beneath the pipeline's directory, as inputs always do.
    public var allowHostPaths: Bool
    /// Shared caches asked, in order, for the steps the store's cache lacks (`--cache-from`).
    public var cacheFrom: [any SharedStepCache]
    /// Where the run's passed steps and scores are published at its end (`--cache-to`).
    public var cacheTo: (any SharedStepCache)?
    /// A passing step whose `artifacts:` pattern matched nothing fails (`--strict-artifacts`);
    /// otherwise the summary warns.
    public var strictArtifacts: Bool

    public init(
        jobs: Int = ProcessInfo.processInfo.activeProcessorCount, keepGoing: Bool = false, forceSteps: [String] = [],
        noCache: Bool = false, failOnCacheMiss: Bool = false, outDir: String? = nil, junitPath: String? = nil,
        environment: [String: String] = ProcessInfo.processInfo.environment, cacheFrom: [any SharedStepCache] = [],
        cacheTo: (any SharedStepCache)? = nil, allowHostPaths: Bool = false, strictArtifacts: Bool = false
    ) {
        self.strictArtifacts = strictArtifacts
        self.allowHostPaths = allowHostPaths
        self.cacheFrom = cacheFrom
        self.cacheTo = cacheTo
        self.jobs = max(1, jobs)
        self.keepGoing = keepGoing
        self.forceSteps = forceSteps
        self.noCache = noCache
        self.failOnCacheMiss = failOnCacheMiss
        self.outDir = outDir
        self.junitPath = junitPath
        self.environment = environment
    }
}

/// What a run tells its observers as it goes.
public enum RunEvent: Sendable {
    case started(runID: String, plan: PipelinePlan, outDir: String)
    case nodeStarted(String)
    case nodeFinished(NodeResult)
    case finished(RunReport)
}

/// Something that shows a run: the terminal view, plain lines, CI log groups.
public protocol RunObserver: Sendable {
    func handle(_ event: RunEvent)
}

/// Runs a planned pipeline on the snapshot engine: a DAG scheduler with bounded parallelism
/// that reuses cached steps by key, executes the rest, and writes the run's reports.
public final class PipelineRunner: Sendable {
    public let plan: PipelinePlan
    public let engine: SandboxEngine
    public let cache: StepCache
    public let options: RunOptions
    let observer: (any RunObserver)?
    public let runID: String
    public let outDir: String
    /// The score keys this run used, with their text (published by `--cache-to`).
    let scoresUsed = Mutex<[String: String]>([:])

    static let outputPath = "/.contree/output"
    static let defaultShell = ["sh", "-e"]
    static let defaultWorkdir = "/workspace"

    public init(
        plan: PipelinePlan, engine: SandboxEngine, options: RunOptions = RunOptions(),
        observer: (any RunObserver)? = nil
    ) throws {
        self.plan = plan
        self.engine = engine
        self.cache = try StepCache(store: engine.store)
        self.options = options
        self.observer = observer
        let id = PipelineRunner.newRunID()
        self.runID = id
        self.outDir =
            options.outDir
            ?? URL(fileURLWithPath: plan.definition.directory).appendingPathComponent(".contree/runs/\(id)").path
    }

    /// `20261126-170501-3f2a9c`: sortable, short, unique enough.
    static func newRunID() -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.timeZone = TimeZone(identifier: "UTC")
        let suffix = UUID().uuidString.lowercased().prefix(6)
        return formatter.string(from: Date()) + "-" + suffix
    }

    // MARK: Preflight

    /// Checks what can only be checked on this host before anything runs (see `Preflight`),
    /// then resolves the base image (building or importing it on first use).
    func preflight(_ cancellation: Cancellation? = nil) throws -> (image: ImageRecord, secrets: [String: String]) {
        let definition = plan.definition
        let (secrets, problems) = Preflight(
            definition, environment: options.environment, allowHostPaths: options.allowHostPaths,
            isolations: Set(engine.availableBackends)
        ).check()
        if !problems.isEmpty { throw PipelineValidationError(problems) }
        let hostPaths = definition.hostPaths(allowingAnywhere: options.allowHostPaths)
        do {
            let image = try definition.imageReference(hostPaths: hostPaths)
            return (try engine.baseImages.resolve(image, cancellation: cancellation), secrets)
        } catch let error as SandboxError where error.code == .cancelled {
            throw CancellationError()
        } catch let error as SandboxError {
            throw PipelineValidationError([PipelineError(.invalid, error.description, at: definition.image.location)])
        }
    }

    // MARK: The run

    /// Runs the pipeline to its end (or until the calling task is cancelled) and writes the
    /// reports. Throws only for invalid input (nothing ran) or a failure to write reports.
    public func run() async throws -> RunReport {
        let started = Date()  // building a base image on first use is part of the run
        // Building or importing a base image takes a while and blocks: never on the cooperative
        // pool; cancelling the run stops an import (which removes what it made).
        let cancellation = Cancellation()
        let (baseImage, secrets) = try await withTaskCancellationHandler {
            try await DedicatedThread.run { try self.preflight(cancellation) }
        } onCancel: {
            cancellation.cancel("the run was cancelled while its image was imported; nothing was imported")
        }
        let secretKey = secrets.isEmpty ? [] : try engine.store.secretKey()
        if options.outDir == nil {
            // .contree/runs/<id> comes from the repository's directory: a `.contree` symlink
            // committed there must not send the reports elsewhere.
            var tree = DirectoryTree(root: plan.definition.directory)
            do {
                _ = try tree.directory(
                    [".contree", "runs", RawPath(runID), "logs"], member: ".contree/runs",
                    source: plan.definition.directory)
            } catch let error as SandboxError {
                let symlink = error.code == .pathEscapes || error.errno == ELOOP || error.errno == ENOTDIR
                throw PipelineValidationError([
                    PipelineError(
                        .invalid,
                        "the run's reports go to .contree/runs/ beside the pipeline, in \(plan.definition.directory), which cannot be written: \(error.description); "
                            + (symlink
                                ? "a symlink there is refused: remove it, or give --out DIR"
                                : "give --out DIR (a writable directory) for the reports")
                    )
                ])
            }
        } else {
            do {
                try FileSystem.makeDirectories(outDir + "/logs")
            } catch let error as SandboxError {
                throw PipelineValidationError([
                    PipelineError(
                        .invalid, "--out \(outDir) cannot be written: \(error.description); give a writable directory")
                ])
            }
        }
        try cache.beginRun(
            id: runID, pipeline: plan.definition.name, file: plan.definition.absolutePath, started: started,
            outDir: outDir)
        observer?.handle(.started(runID: runID, plan: plan, outDir: outDir))

        var forced = Set<String>()
        if !options.forceSteps.isEmpty {
            forced = plan.dependents(of: Set(plan.nodes.filter { options.forceSteps.contains($0.step) }.map(\.id)))
        }
        let context = ExecutionContext(
            runner: self, baseImage: baseImage, secrets: secrets, forced: forced, secretKey: secretKey)
        let results = await schedule(context)

        let ordered = plan.nodes.compactMap { results[$0.id] }
        let cancelled = Task.isCancelled || ordered.contains { $0.status == .cancelled }
        let failed = ordered.contains(where: \.failsPipeline)
        let status: RunReport.Status = failed ? .failed : cancelled ? .cancelled : .passed
        // Whatever passed is worth sharing, even when a later step failed or fail-fast stopped
        // the others; not after Ctrl-C (the user asked to stop).
        var export: CacheExport?
        if let destination = options.cacheTo {
            let interrupted =
                Task.isCancelled
                || ordered.contains { $0.status == .cancelled && $0.reason != PipelineRunner.failFastReason }
            if interrupted {
                export = CacheExport(
                    destination: destination.location,
                    error: "the run was cancelled; nothing was pushed (a run that ends by itself pushes what passed)")
            } else {
                export = await publish(ordered, to: destination)
            }
        }
        var report = RunReport(
            runID: runID, pipeline: plan.definition.name, file: plan.definition.file, status: status, started: started,
            ended: Date(), outDir: outDir, nodes: ordered, edges: RunReport.edges(of: plan), jobs: options.jobs)
        report.cacheExport = export
        try? cache.finishRun(id: runID, status: status.rawValue)
        try ReportWriter(report: report, plan: plan).write(junitPath: options.junitPath)
        observer?.handle(.finished(report))
        return report
    }

    /// Starts nodes as their dependencies end, `jobs` at a time.
    private func schedule(_ context: ExecutionContext) async -> [String: NodeResult] {
        var results: [String: NodeResult] = [:]
        var pending = plan.nodes
        var stopping = false
        let registry = TaskRegistry()
        let preparer = StepPreparer(plan: plan)
        await withTaskGroup(of: NodeResult.self) { group in
            var running = 0
            func decide() {
                var index = 0
                while index < pending.count {
                    let node = pending[index]
                    guard node.dependencies.allSatisfy({ results[$0] != nil }) else {
                        index += 1
                        continue
                    }
                    let cancelled = Task.isCancelled
                    let scope = NodeScope(
                        node: node, plan: plan, results: results, env: preparer.environment(node, results: results),
                        pipelineName: plan.definition.name, cancelled: cancelled)
                    // Steps whose condition asks about failures (cleanup, reports) still run
                    // after a failure or a cancellation, and are not cancelled themselves.
                    let exempt = node.reactsToFailure
                    var verdict: NodeResult?
                    if cancelled && !exempt {
                        verdict = NodeResult(node: node, status: .cancelled, reason: "the run was cancelled")
                    } else if stopping && !exempt {
                        verdict = NodeResult(node: node, status: .skipped, reason: PipelineRunner.failFastReason)
                    } else if node.kind == .select {
                        // A selection runs once its variants ended, unless none of them ran.
                        let variants = node.variantNodes.compactMap { results[$0] }
                        if variants.allSatisfy({ $0.status == .skipped || $0.status == .cancelled }) {
                            let status: NodeStatus =
                                variants.contains { $0.status == .cancelled } ? .cancelled : .skipped
                            verdict = NodeResult(node: node, status: status, reason: "none of its variants ran")
                        }
                    } else if !PipelineRunner.conditionHolds(node, in: scope) {
                        if node.condition == nil {
                            verdict = NodeResult(
                                node: node, status: .skipped, reason: "a step it depends on did not succeed")
                        } else {
                            var skipped = NodeResult(
                                node: node, status: .skipped,
                                reason:
                                    "its condition is false: \(plan.definition.step(node.step)?.conditionText ?? "")")
                            if scope.status("success") {
                                let start = startingPoint(node, results: results, base: context.baseImage.uuid)
                                skipped.parentImage = start.image
                                skipped.resultImage = start.image
                            }
                            verdict = skipped
                        }
                    }
                    if let verdict {
                        pending.remove(at: index)
                        results[node.id] = verdict
                        record(verdict)
                        observer?.handle(.nodeFinished(verdict))
                        index = 0  // a decision may unblock earlier nodes
                        continue
                    }
                    guard running < options.jobs else { return }
                    pending.remove(at: index)
                    running += 1
                    let snapshot = results
                    observer?.handle(.nodeStarted(node.id))
                    // Registered before it can run, so that a fail-fast right after reaches it.
                    let inner = Task { await self.execute(node, results: snapshot, context: context) }
                    registry.add(node.id, inner, exempt: exempt)
                    group.addTask {
                        var result: NodeResult
                        if exempt {
                            result = await inner.value
                        } else {
                            result = await withTaskCancellationHandler {
                                await inner.value
                            } onCancel: {
                                inner.cancel()
                            }
                        }
                        if result.status == .cancelled && registry.stoppedByFailFast(node.id) {
                            result.reason = PipelineRunner.failFastReason
                        }
                        registry.remove(node.id)
                        return result
                    }
                }
            }
            decide()
            while running > 0 {
                guard let result = await group.next() else { break }
                running -= 1
                results[result.node] = result
                record(result)
                observer?.handle(.nodeFinished(result))
                if result.failsPipeline && !options.keepGoing && !stopping {
                    stopping = true
                    registry.failFast()  // running siblings stop, their sandboxes die
                }
                decide()
            }
        }
        for node in pending where results[node.id] == nil {
            let verdict = NodeResult(
                node: node, status: Task.isCancelled ? .cancelled : .skipped, reason: "not reached")
            results[node.id] = verdict
            record(verdict)
        }
        return results
    }

    /// The snapshot a node starts from: its parent's or, when the parent left none (cancelled,
    /// killed, or failed before it ran), the nearest one along the chain of `from` steps, down
    /// to the pipeline's image. `from` names the node whose snapshot it is (nil: the image).
    func startingPoint(
        _ node: PlanNode, results: [String: NodeResult], base: String
    ) -> (
        image: String, from: String?
    ) {
        var parent = node.parent
        while case .node(let id) = parent {
            if let image = results[id]?.resultImage { return (image, id) }
            parent = plan.node(id)?.parent ?? .image
        }
        return (base, nil)
    }

    static let failFastReason =
        "stopped because another step failed (fail-fast; --keep-going runs independent branches)"

    /// A condition that asks nothing about other steps' status also needs them to succeed
    /// (`if: x` means `success() && x`), as in GitHub Actions.
    static func conditionHolds(_ node: PlanNode, in scope: NodeScope) -> Bool {
        guard let condition = node.condition else { return scope.status("success") }
        let asksStatus = condition.calls.contains { ["success", "failure", "always", "cancelled"].contains($0.0) }
        return (asksStatus || scope.status("success")) && condition.evaluate(in: scope).isTruthy
    }

    func record(_ result: NodeResult) {
        try? cache.recordStep(
            runID: runID, pipeline: plan.definition.name, file: plan.definition.absolutePath,
            row: PipelineStepRow(
                node: result.node, step: result.step, status: result.status.rawValue, cached: result.cached,
                key: result.key, components: result.components, parentImage: result.parentImage,
                resultImage: result.resultImage, outputs: result.outputs))
    }
}

/// Running node tasks by id, so fail-fast can cancel exactly those (but not the steps that run
/// after failures on purpose).
final class TaskRegistry: Sendable {
    private struct State {
        var tasks: [String: (task: Task<NodeResult, Never>, exempt: Bool)] = [:]
        var stopped: Set<String> = []
    }
    private let state = Mutex(State())

    func add(_ id: String, _ task: Task<NodeResult, Never>, exempt: Bool) {
        state.withLock { $0.tasks[id] = (task, exempt) }
    }

    func remove(_ id: String) { _ = state.withLock { $0.tasks.removeValue(forKey: id) } }

    func failFast() {
        state.withLock { state in
            for (id, entry) in state.tasks where !entry.exempt {
                state.stopped.insert(id)
                entry.task.cancel()
            }
        }
    }

    func stoppedByFailFast(_ id: String) -> Bool { state.withLock { $0.stopped.contains(id) } }
}
