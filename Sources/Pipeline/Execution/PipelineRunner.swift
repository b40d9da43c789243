import Foundation
import ImageFormats
import ImageStore
import Sandbox
import Synchronization
import SystemSupport

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
    /// `--verify`: cached steps run again, each in a fork of its recorded parent, and their new
    /// snapshot is compared with the cached one. nil: no verification; empty: every cached
    /// step; otherwise the steps (or nodes) named.
    public var verify: Set<String>? = nil
    /// The binary's version (traces name it).
    public var version = "unknown"
    /// `--publish NAMESPACE`: at the end, every step's snapshot is handed to `publisher` with
    /// the tag `run/RUN/STEP` (which writes it into that `serve` namespace).
    public var publishNamespace: String? = nil
    public var publisher: (@Sendable (_ namespace: String, _ tags: [(tag: String, image: String)]) throws -> Void)? =
        nil

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
    /// A step's executor placed it: the machine (and job) it runs on.
    case nodePlaced(String, Placement)
    case nodeFinished(NodeResult)
    /// A dynamic matrix expanded: the plan from now on.
    case planExpanded(PipelinePlan)
    case finished(RunReport)
}

/// Something that shows a run: the terminal view, plain lines, CI log groups.
public protocol RunObserver: Sendable {
    func handle(_ event: RunEvent)
}

/// Runs a planned pipeline on the snapshot engine: a DAG scheduler with bounded parallelism
/// that reuses cached steps by key, executes the rest, and writes the run's reports.
public final class PipelineRunner: Sendable {
    /// The plan as it stands: it grows as dynamic matrices expand.
    public var plan: PipelinePlan { current.withLock { $0 } }
    private let current: Mutex<PipelinePlan>
    public let engine: SandboxEngine
    public let cache: StepCache
    public let options: RunOptions
    let observer: (any RunObserver)?
    public let runID: String
    public let outDir: String
    /// What runs the steps that miss the cache.
    let steps: SharedKeyExecutor
    /// The score keys this run used, with their text (published by `--cache-to`).
    let scoresUsed = Mutex<[String: String]>([:])
    /// The run's own notes (`RunReport.notes`).
    let notes = Mutex<[String]>([])
    /// Nodes `--from` forces (its steps' nodes and what depends on them), for the plan as it
    /// stands: an expanded dynamic matrix brings new ones.
    let forced = Mutex<Set<String>>([])

    func forceNodes(of plan: PipelinePlan) {
        guard !options.forceSteps.isEmpty else { return }
        let nodes = plan.dependents(of: Set(plan.nodes.filter { options.forceSteps.contains($0.step) }.map(\.id)))
        forced.withLock { $0 = nodes }
    }

    static let outputPath = "/.contree/output"
    static let defaultShell = ["sh", "-e"]
    static let defaultWorkdir = "/workspace"

    public convenience init(
        plan: PipelinePlan, engine: SandboxEngine, options: RunOptions = RunOptions(),
        observer: (any RunObserver)? = nil
    ) throws {
        try self.init(
            plan: plan, engine: engine, steps: EngineStepExecutor(engine: engine), options: options, observer: observer)
    }

    /// A runner whose missed steps run on `steps` (another machine's engine, a cluster).
    public init(
        plan: PipelinePlan, engine: SandboxEngine, steps: any StepExecutor, options: RunOptions = RunOptions(),
        observer: (any RunObserver)? = nil
    ) throws {
        self.current = Mutex(plan)
        self.engine = engine
        self.steps = SharedKeyExecutor(steps)
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
        let suffix = UUID().uuidString.lowercased().prefix(6)
        return UTCTime.compact(secondsSince1970: UTCTime.now) + "-" + suffix
    }

    // MARK: Preflight

    /// Checks what can only be checked on this host before anything runs (see `Preflight`),
    /// then resolves the base image (building or importing it on first use).
    func preflight(
        _ cancellation: Cancellation? = nil
    ) throws -> (
        image: ImageRecord, stepImages: [String: ImageRecord], secrets: [String: String]
    ) {
        let definition = plan.definition
        let (secrets, problems) = Preflight(
            definition, environment: options.environment, allowHostPaths: options.allowHostPaths,
            isolations: Set(engine.availableBackends)
        ).check()
        if !problems.isEmpty { throw PipelineValidationError(problems) }
        let hostPaths = definition.hostPaths(allowingAnywhere: options.allowHostPaths)
        // Steps' own images, only those a node of this plan starts from, each resolved once.
        var references = [definition.image]
        for node in plan.nodes {
            for image in [node.image] + node.services.map(\.definition.image) {
                if let image, !references.contains(where: { $0.value == image.value }) { references.append(image) }
            }
        }
        var resolved: [String: ImageRecord] = [:]
        for reference in references {
            do {
                let image = try definition.imageReference(reference, hostPaths: hostPaths)
                resolved[reference.value] = try engine.baseImages.resolve(image, cancellation: cancellation)
            } catch let error as SandboxError where error.code == .cancelled {
                throw CancellationError()
            } catch let error as SandboxError {
                throw PipelineValidationError([
                    PipelineError(.invalid, error.description, at: reference.location, cause: error)
                ])
            }
        }
        let base = resolved[definition.image.value]!
        resolved[definition.image.value] = nil
        return (base, resolved, secrets)
    }

    // MARK: The run

    /// Runs the pipeline to its end (or until the calling task is cancelled) and writes the
    /// reports. Throws only for invalid input (nothing ran) or a failure to write reports.
    public func run() async throws -> RunReport {
        let started = Date()  // building a base image on first use is part of the run
        // Building or importing a base image takes a while and blocks: never on the cooperative
        // pool; cancelling the run stops an import (which removes what it made).
        let cancellation = Cancellation()
        let (baseImage, stepImages, secrets) = try await withTaskCancellationHandler {
            try await BlockingPool.shared.run { try self.preflight(cancellation) }
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

        forceNodes(of: plan)
        let context = ExecutionContext(
            runner: self, baseImage: baseImage, stepImages: stepImages, secrets: secrets, secretKey: secretKey)
        await restoreDependencyCaches()
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
                var published = await publish(ordered, to: destination)
                published.caches = await publishDependencyCaches(to: destination, export: &published)
                export = published
            }
        }
        var report = RunReport(
            runID: runID, pipeline: plan.definition.name, file: plan.definition.file, status: status, started: started,
            ended: Date(), outDir: outDir, nodes: ordered, edges: RunReport.edges(of: plan), jobs: options.jobs)
        report.cacheExport = export
        report.notes = notes.withLock { $0 }
        if let namespace = options.publishNamespace, let publisher = options.publisher {
            report.published = publish(ordered, namespace: namespace, with: publisher)
        }
        // Ctrl-C means stop now: no waiting on a collector.
        if !Task.isCancelled { report.trace = await exportTrace(report) }
        report.notes = notes.withLock { $0 }
        try? cache.finishRun(id: runID, status: status.rawValue)
        try ReportWriter(report: report, plan: plan).write(junitPath: options.junitPath)
        observer?.handle(.finished(report))
        return report
    }

    /// Runs the plan's nodes (see `drive`; `execute` runs each, its steps on `steps`).
    private func schedule(_ context: ExecutionContext) async -> [String: NodeResult] {
        var schedule = Schedule(
            plan: plan, jobs: options.jobs, keepGoing: options.keepGoing, baseImage: context.baseImage.uuid)
        schedule.stepImages = context.stepImages.mapValues(\.uuid)
        await PipelineRunner.drive(
            &schedule, execute: { node, results in await self.execute(node, results: results, context: context) },
            observer: observer, record: record,
            expanded: { plan in
                self.current.withLock { $0 = plan }
                self.forceNodes(of: plan)
            })
        notes.withLock { $0 += schedule.notes }
        return schedule.results
    }

    /// Carries out a schedule's decisions: starts nodes with `execute` (handed the node and
    /// the results it may read) as their dependencies end, `jobs` at a time; on fail-fast
    /// cancels the running nodes that do not react to failures; reports each node to `record`
    /// and the observer as it ends.
    static func drive(
        _ schedule: inout Schedule,
        execute: @escaping @Sendable (PlanNode, ResultTable) async -> NodeResult,
        observer: (any RunObserver)?, record: (NodeResult) -> Void,
        expanded: (PipelinePlan) -> Void = { _ in }
    ) async {
        let registry = TaskRegistry()
        await withTaskGroup(of: NodeResult.self) { group in
            func apply() {
                let expansions = schedule.plan.expansions.count
                let (start, settled) = schedule.advance(cancelled: Task.isCancelled)
                if schedule.plan.expansions.count != expansions {
                    expanded(schedule.plan)
                    observer?.handle(.planExpanded(schedule.plan))
                }
                if schedule.failFastRequested {
                    schedule.failFastRequested = false
                    registry.failFast()
                }
                for verdict in settled {
                    record(verdict)
                    observer?.handle(.nodeFinished(verdict))
                }
                for node in start {
                    let snapshot = schedule.table
                    let exempt = node.reactsToFailure
                    observer?.handle(.nodeStarted(node.id))
                    // Registered before it can run, so that a fail-fast right after reaches it.
                    let inner = Task { await execute(node, snapshot) }
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
            apply()
            while !schedule.isIdle {
                guard let result = await group.next() else { break }
                record(result)
                observer?.handle(.nodeFinished(result))
                if schedule.finish(result) {
                    registry.failFast()  // running siblings stop, their sandboxes die
                }
                apply()
            }
        }
        for verdict in schedule.unreached(cancelled: Task.isCancelled) { record(verdict) }
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

    /// The tag of a node's snapshot under `--publish`: `run/RUN/STEP`, the node's matrix values
    /// written as tags allow (`test[os=debian]` -> `run/RUN/test@os:debian`).
    /// `_` (which tags do not allow) is written `+`; any other character but letters, digits,
    /// `.`, `,` and `-` (one a tag cannot hold, or one the mapping uses), or a tag
    /// past 200 characters, makes the name lossy, and a digest of the node id is added so that
    /// two nodes never share a tag.
    public static func publishedTag(runID: String, node: String) -> String {
        var lossy = false
        let mapped = node.map { c -> String in
            switch c {
            case "[": return "@"
            case "]": return ""
            case "=": return ":"
            case "_": return "+"
            default:
                if c.isASCII && (c.isLetter || c.isNumber || ".,-".contains(c)) { return String(c) }
                lossy = true
                return "-"
            }
        }.joined()
        guard lossy || mapped.count > 200 else { return "run/\(runID)/\(mapped)" }
        let digest = Digest.sha256(Array(node.utf8)).hex.prefix(12)
        return "run/\(runID)/\(mapped.prefix(180))-\(digest)"
    }

    private func publish(
        _ results: [NodeResult], namespace: String,
        with publisher: (String, [(tag: String, image: String)]) throws -> Void
    ) -> RunReport.Publication {
        let tagged = results.compactMap { result in
            result.resultImage.map { (result.node, PipelineRunner.publishedTag(runID: runID, node: result.node), $0) }
        }
        do {
            try publisher(namespace, tagged.map { ($0.1, $0.2) })
            return RunReport.Publication(
                namespace: namespace, tags: Dictionary(tagged.map { ($0.0, $0.1) }, uniquingKeysWith: { $1 }))
        } catch {
            return RunReport.Publication(namespace: namespace, tags: [:], error: "\(error)")
        }
    }

    func record(_ result: NodeResult) {
        try? cache.recordStep(
            runID: runID, pipeline: plan.definition.name, file: plan.definition.absolutePath,
            row: PipelineStepRow(
                node: result.node, step: result.step, status: result.status.rawValue, cached: result.cached,
                key: result.key, components: result.components, parentImage: result.parentImage,
                resultImage: result.resultImage, outputs: result.outputs,
                wallSeconds: result.cached ? nil : result.metrics?.wallSeconds,
                peakMemoryBytes: result.cached ? nil : result.metrics?.peakMemoryBytes))
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
