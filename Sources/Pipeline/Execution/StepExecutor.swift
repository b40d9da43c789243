import Foundation
import Glibc
import ImageStore
import Sandbox
import Synchronization
import SystemSupport

/// One step that missed the cache, rendered on the coordinator: everything a machine needs to
/// run it, and nothing of the pipeline file. Its key is already computed (a hit needs no
/// executor at all).
public struct StepRequest: Sendable {
    /// The node's id: names the step in messages.
    public var node: String
    public var key: String
    /// The snapshot the step starts from (an image of the coordinator's store).
    public var parent: String
    public var command: [String]
    /// Everything but secrets (what the key saw).
    public var environment: [String: String]
    /// Added to the environment when the step runs; never in its key, a report or the cache.
    public var secrets: [String: String]
    public var workdir: String
    /// Host files copied in, with their digests; paths relative to `inputRoot`, opened beneath it.
    public var inputs: [ResolvedInput]
    public var inputRoot: String
    public var timeout: Double?
    public var limits: ResourceLimits
    public var network: NetworkMode
    public var isolation: IsolationKind
    /// 1 + the step's `retries`: each attempt starts from `parent` again.
    public var attempts: Int
    /// Which failures are tried again, and the wait before each attempt.
    public var retry = RetryPolicy(max: 0)
    /// Where in the sandbox the step writes its outputs (`$CONTREE_OUTPUT`).
    public var outputPath: String
    /// Dependency caches mounted while the step runs (never in its key).
    public var caches: [Cache] = []
    /// Services started before the step, in its network namespace, and stopped after it.
    var services: [ServiceRequest] = []
    /// `persist: memory`: the processes the command leaves running are kept in its snapshot.
    public var persistMemory = false

    /// Whether services start with the step (they run where the step runs).
    public var hasServices: Bool { !services.isEmpty }

    public struct Cache: Sendable, Codable {
        public var name: String
        public var path: String
        public var sharing: DependencyCaches.Sharing
    }
}

/// What running a step gave: its last attempt's record (exit, metrics, the snapshot it left),
/// what it wrote to `$CONTREE_OUTPUT`, and how many attempts it took.
public struct StepOutcome: Sendable {
    public var record: RunRecord
    public var output: [UInt8]
    public var attempts: Int
    /// Where it ran, when not on this machine.
    public var placement: Placement?
    /// Every attempt's record, the last (`record`) included.
    public var history: [RunRecord]

    public init(
        record: RunRecord, output: [UInt8], attempts: Int, placement: Placement? = nil, history: [RunRecord]? = nil
    ) {
        self.record = record
        self.output = output
        self.attempts = attempts
        self.placement = placement
        self.history = history ?? [record]
    }
}

/// Where a step ran: the executor (`slurm`), the machine, the scheduler's job.
public struct Placement: Sendable, Equatable {
    public var executor: String
    public var node: String?
    public var jobID: String?

    public init(executor: String, node: String? = nil, jobID: String? = nil) {
        self.executor = executor
        self.node = node
        self.jobID = jobID
    }
}

/// Runs steps that missed the cache: this machine's snapshot engine today, other machines
/// next. Output goes to `log` as it comes; cancelling the calling task stops the step.
public protocol StepExecutor: Sendable {
    /// - Throws: `CancellationError` when cancelled, `PipelineError` when the step could not run.
    func run(_ request: StepRequest, log: StepLog) async throws -> StepOutcome
}

/// Runs steps on this machine's snapshot engine, retrying failed attempts from the same parent.
public struct EngineStepExecutor: StepExecutor {
    let engine: SandboxEngine

    public init(engine: SandboxEngine) { self.engine = engine }

    public func run(_ request: StepRequest, log: StepLog) async throws -> StepOutcome {
        // Caches are taken for all attempts, in name order (two steps never wait on each other).
        let caches = DependencyCaches(store: engine.store)
        let uses = try await BlockingPool.shared.run {
            var taken: [DependencyCaches.Use] = []
            do {
                for cache in request.caches.sorted(by: { $0.name < $1.name }) {
                    taken.append(
                        try caches.use(
                            cache.name, sharing: cache.sharing,
                            // Unique per use: flaky-check and --verify run one key several times at once.
                            scratchID: request.key.prefix(16) + "-" + String(getpid()) + "-"
                                + UUID().uuidString.prefix(8).lowercased()
                        ) {
                            log.note(
                                "waiting for cache \(cache.name): another step holds it (sharing: \(cache.sharing.rawValue))"
                            )
                        })
                }
            } catch {
                taken.forEach { $0.release() }
                throw error
            }
            return taken
        }
        defer { uses.forEach { $0.release() } }
        let mounts = zip(request.caches.sorted(by: { $0.name < $1.name }), uses).map {
            BindMount(source: $1.path, target: $0.path)
        }
        // Services start once for all attempts, in a network namespace the step joins.
        let services =
            request.services.isEmpty
            ? nil
            : try await ServiceGroup.start(
                request.services, network: request.network, engine: engine, step: request.node, log: log)
        do {
            let outcome = try await attempts(request, mounts: mounts, network: services?.network, log: log)
            await services?.stop()
            return outcome
        } catch {
            await services?.stop()
            throw error
        }
    }

    private func attempts(
        _ request: StepRequest, mounts: [BindMount], network: SandboxNetwork?, log: StepLog
    ) async throws -> StepOutcome {
        var last: StepOutcome?
        var history: [RunRecord] = []
        for attempt in 1...max(1, request.attempts) {
            try Task.checkCancellation()
            if attempt > 1 {
                let delay = request.retry.delay(before: attempt)
                log.note(
                    "attempt \(attempt) of \(request.attempts)"
                        + (delay > 0 ? " after \(delay.formatted(digits: 1)) s (backoff)" : ""))
                if delay > 0 { try await Task.sleep(for: .milliseconds(Int(delay * 1000))) }
            }
            var spec = RunSpec(
                image: request.parent, command: request.command,
                env: request.environment.merging(request.secrets) { $1 }, cwd: request.workdir,
                files: request.inputs.map {
                    FileMapping(
                        hostPath: $0.hostPath, sandboxPath: $0.sandboxPath, mode: $0.mode,
                        hostPaths: .beneath(request.inputRoot))
                },
                timeout: request.timeout, limits: request.limits, network: request.network, hostname: "contree",
                disposable: false, stdout: .capture(limit: 0, onChunk: { log.append($0) }),
                stderr: .capture(limit: 0, onChunk: { log.append($0) }), isolation: request.isolation,
                outputPath: request.outputPath)
            spec.mounts = mounts
            spec.sharedNetwork = network
            spec.persistMemory = request.persistMemory
            // A VM step goes on from the processes its parent kept (`persist: memory`).
            spec.resume = request.isolation == .vm ? .ifHeld : .never
            let run: RunResult
            do {
                run = try await engine.run(spec)
            } catch let error as SandboxError {
                throw PipelineError(.failed, "step \(request.node) could not run: \(error)", cause: error)
            }
            history.append(run.record)
            last = StepOutcome(record: run.record, output: run.output ?? [], attempts: attempt, history: history)
            if run.record.cancelled { throw CancellationError() }
            if run.record.exitCode == 0 { break }
            log.note(PipelineRunner.describe(run.record))
            if attempt < request.attempts && !request.retry.retries(run.record) {
                log.note(
                    "not tried again: retries.when is \(request.retry.when?.map(\.description).joined(separator: ", ") ?? "")"
                )
                break
            }
        }
        guard let last else { throw CancellationError() }
        return last
    }
}

/// Runs a key at most once at a time: a request whose key is already running (in this run)
/// waits for that run and shares its outcome, as BuildKit and Dagger de-duplicate vertices.
/// Keys name the node (`CONTREE_STEP` is in every step's environment), so two nodes of one
/// pipeline never share one today; a step executed again while it runs does.
final class SharedKeyExecutor: StepExecutor {
    private let inner: any StepExecutor
    private let running = Mutex<[String: (node: String, task: Task<StepOutcome, any Error>)]>([:])

    /// Requests that joined one already running (for the tests).
    let joined = Mutex(0)

    init(_ inner: any StepExecutor) { self.inner = inner }

    /// Runs the request on its own, even while another with its key runs (`flaky-check`'s
    /// reruns of one failed step).
    func runUnshared(_ request: StepRequest, log: StepLog) async throws -> StepOutcome {
        try await inner.run(request, log: log)
    }

    func run(_ request: StepRequest, log: StepLog) async throws -> StepOutcome {
        let (task, first) = running.withLock { running -> (Task<StepOutcome, any Error>, String?) in
            if let (node, task) = running[request.key] {
                joined.withLock { $0 += 1 }
                return (task, node)
            }
            let task = Task { [inner] in try await inner.run(request, log: log) }
            running[request.key] = (request.node, task)
            return (task, nil)
        }
        let owner = first == nil
        if let first { log.note("\(first) is running with the same key: this step shares its result") }
        defer { if owner { running.withLock { _ = $0.removeValue(forKey: request.key) } } }
        return try await withTaskCancellationHandler {
            try await task.value
        } onCancel: {
            if owner { task.cancel() }
        }
    }
}
