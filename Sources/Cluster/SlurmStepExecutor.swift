import CSandbox
import Foundation
import Glibc
import ImageStore
import Pipeline
import Registry
import RegistryCache
import Sandbox
import Synchronization
import SystemSupport

/// How a run reaches a Slurm cluster.
public struct SlurmConfiguration: Sendable {
    /// The registry repository snapshots move through (`docker://HOST[:PORT]/REPO`).
    public var registry: String
    public var credentials: RegistryCredentials?
    public var allowHTTP: Bool
    /// `--partition`, when not the cluster's default.
    public var partition: String?
    /// More `srun` arguments (`--slurm-arg`), after the ones the step's settings give.
    public var arguments: [String]
    /// contree-pipeline on the nodes (the same path and version on every node), as words:
    /// `sudo -n /usr/local/bin/contree-pipeline` where jobs do not run as root.
    public var command: String
    /// The coordinator's version: a node of another version refuses the step (exit 75).
    public var version: String
    /// How many times a step lost with its node is dispatched in all.
    public var dispatches: Int
    public var srun: String
    public var scancel: String

    public init(
        registry: String, credentials: RegistryCredentials? = nil, allowHTTP: Bool = false, partition: String? = nil,
        arguments: [String] = [], command: String, version: String, dispatches: Int = 3, srun: String = "srun",
        scancel: String = "scancel"
    ) {
        self.registry = registry
        self.credentials = credentials
        self.allowHTTP = allowHTTP
        self.partition = partition
        self.arguments = arguments
        self.command = command
        self.version = version
        self.dispatches = dispatches
        self.srun = srun
        self.scancel = scancel
    }
}

/// Runs each step that missed the cache as one `srun` of `contree-pipeline step --spec -` on
/// a Slurm cluster (measured: 22 ms from the call to the step's start; `sbatch` dependency
/// chains cost seconds per edge, so the DAG stays here). The step's parent and inputs go to
/// the registry first, by digest; the spec (with the secrets) goes on the job's stdin, never in
/// its arguments or environment, which `scontrol show job` prints. The node's stderr is the
/// step's log; its stdout carries `StepFrame`s. The snapshot it leaves is imported from the
/// registry, so that dependents, artifacts and `shell` find it here.
///
/// Cancelling a step runs `scancel` for its job (again every half second until `srun` ends:
/// the job may not be queued yet); `srun` itself is never signalled, since a signalled `srun`
/// SIGKILLs the step before it can clean up. A step whose node is lost (srun: "Node failure")
/// or refuses it (exit 75) is dispatched again without that node: entries are write-once, so
/// a duplicate that finishes later leaves them as they are.
public final class SlurmStepExecutor: StepExecutor {
    let configuration: SlurmConfiguration
    let store: Store
    let repository: RegistryRepository
    /// Every job of the run is named `contree-RANDOM-N` (`squeue --name`, `scancel --name`).
    let jobPrefix: String
    /// Images in the registry (UUID or content tag → `docker://…@sha256:…`: pushed, or a
    /// step's result imported from there), and a lock per content being pushed: steps that
    /// start from one image wait for one push (concurrent pushes of one image make the
    /// registry refuse a manifest whose blob another upload is still writing).
    private let inRegistry = Mutex<[String: String]>([:])
    private let pushing = Mutex<[String: NSLock]>([:])
    private let canceller: JobCanceller
    private let sequence = Mutex(0)

    public init(_ configuration: SlurmConfiguration, store: Store) throws {
        self.configuration = configuration
        self.store = store
        repository = try RegistryRepository(
            configuration.registry, store: store, credentials: configuration.credentials,
            allowHTTP: configuration.allowHTTP, pushing: true)
        jobPrefix = "contree-" + String(UInt32.random(in: .min ... .max), radix: 16)
        canceller = JobCanceller(scancel: configuration.scancel)
    }

    public func run(_ request: StepRequest, log: StepLog) async throws -> StepOutcome {
        if request.hasServices {
            throw PipelineError(
                .failed,
                "step \(request.node) has services, which --executor slurm does not start yet; run this pipeline with --executor local"
            )
        }
        let (parent, inputs) = try await BlockingPool.shared.run { [self] () throws -> (String, String?) in
            do {
                guard let image = try store.image(request.parent) else {
                    throw PipelineError(.failed, "the snapshot step \(request.node) starts from is gone from the store")
                }
                return (try reference(image), try request.stageInputs(store: store).map(reference))
            } catch let error as PipelineError {
                throw error
            } catch {
                throw PipelineError(
                    .infrastructure,
                    "could not send the snapshot of step \(request.node) to \(configuration.registry): \(error); check that the registry is up and reachable from here",
                    cause: error)
            }
        }
        Trace.mark("slurm \(request.node): parent and inputs pushed")
        let credentials = configuration.credentials.map { (user: $0.username, password: $0.password) }
        let spec = try StepFrame.encoder.encode(
            StepSpec(
                request, parent: parent, inputs: inputs, version: configuration.version,
                registry: configuration.registry, allowHTTP: configuration.allowHTTP, credentials: credentials))
        // Nodes this step could not run on, and why: each dispatch again leaves them out.
        var excluded: [String] = []
        var problems: [String] = []
        for _ in 1...max(1, configuration.dispatches) {
            try Task.checkCancellation()
            let number = sequence.withLock { n -> Int in
                n += 1
                return n
            }
            let job = jobPrefix + "-" + String(number)
            let dispatch = try await submit(Array(spec), request: request, job: job, excluding: excluded, log: log)
            Trace.mark("slurm \(request.node): srun ended")
            switch dispatch {
            case .finished(let frame, let host, let jobID):
                return try await outcome(
                    frame, request: request, placement: Placement(executor: "slurm", node: host, jobID: jobID))
            case .lost(let host, let why):
                excluded.append(host)
                problems.append("\(host) was lost (\(why))")
                log.note("node \(host) was lost while running this step (\(why)); dispatching it again without \(host)")
            case .refused(let host, let why):
                excluded.append(host)
                problems.append("\(host): \(why)")
                log.note("node \(host) could not run this step: \(why); dispatching it again without \(host)")
            case .failed(let message):
                throw PipelineError(
                    .infrastructure, (problems.isEmpty ? "" : problems.joined(separator: "; ") + "; then ") + message)
            }
        }
        throw PipelineError(
            .infrastructure,
            "step \(request.node) could not run on \(excluded.joined(separator: ", ")): "
                + problems.joined(separator: "; ") + "; check those nodes (sinfo -R) and run again")
    }

    /// `docker://HOST/REPO@sha256:…` for a local image: a step's result is referred to where
    /// it came from; another image is pushed once per run (the registry skips the blobs it
    /// has; the tag names the image's content).
    private func reference(_ image: ImageRecord) throws -> String {
        if let reference = inRegistry.withLock({ $0[image.uuid] }) { return reference }
        // Images of one content (a copy staged over one parent for each step of a matrix) are
        // one push: locked and remembered by the content's tag, not the image's UUID.
        let tag = "image-" + StepKeyComponents.imageDigest(image).replacingOccurrences(of: "sha256:", with: "")
        let lock = pushing.withLock { locks in
            if let lock = locks[tag] { return lock }
            let lock = NSLock()
            locks[tag] = lock
            return lock
        }
        lock.lock()
        defer { lock.unlock() }
        if let reference = inRegistry.withLock({ $0[tag] }) {
            inRegistry.withLock { $0[image.uuid] = reference }
            return reference
        }
        let reference = configuration.registry + "@" + (try repository.push(image, tag: tag, annotations: [:]))
        inRegistry.withLock {
            $0[image.uuid] = reference
            $0[tag] = reference
        }
        return reference
    }

    enum Dispatch {
        case finished(StepFrame, host: String?, job: String?)
        /// srun says the node failed while the step ran there.
        case lost(host: String, why: String)
        /// The node could not run it and said why (exit 75: its registry, store, version, root).
        case refused(host: String, why: String)
        /// srun could not run it, or the step command died without a word.
        case failed(String)
    }

    /// `srun` arguments for one dispatch of the step.
    func arguments(_ request: StepRequest, job: String, excluding: [String]) -> [String] {
        var argv = [
            configuration.srun, "--job-name=" + job, "--nodes=1", "--ntasks=1",
            "--cpus-per-task=\(max(1, Int((request.limits.cpus ?? 1).rounded(.up))))",
            // Nothing of this machine's environment goes to the job (the spec carries the step's).
            "--export=NONE", "--chdir=/", "--kill-on-bad-exit=1",
        ]
        // The step command's own work (imports, the push) beside the sandbox: 512 MiB more.
        if let bytes = request.limits.memoryBytes { argv.append("--mem=\((bytes + (1 << 20) - 1) >> 20 + 512)M") }
        if let partition = configuration.partition { argv.append("--partition=" + partition) }
        if !excluding.isEmpty { argv.append("--exclude=" + excluding.joined(separator: ",")) }
        if let timeout = request.timeout {
            // contree enforces the timeout; Slurm's minute-granular limit is only an outer bound.
            // Five minutes more for the imports and the push on a cold node.
            argv.append("--time=\(Int((timeout * Double(max(1, request.attempts)) / 60).rounded(.up)) + 5)")
        }
        if request.isolation == .vm { argv.append("--constraint=contree-vm") }
        return argv + configuration.arguments + configuration.command.split(separator: " ").map(String.init) + [
            "step", "--spec", "-",
        ]
    }

    private func submit(
        _ spec: [UInt8], request: StepRequest, job: String, excluding: [String], log: StepLog
    ) async throws -> Dispatch {
        let argv = arguments(request, job: job, excluding: excluding)
        let cancel = CancelFlag()
        // By the job's id once its first frame names it, by its name before that.
        let scancel: @Sendable () -> Void = { [canceller] in canceller.cancel(name: job, id: cancel.jobID) }
        let ended: SrunProcess.Ended
        do {
            ended = try await withTaskCancellationHandler {
                // A thread of its own for each srun (wide runs would take the shared pool's).
                try await SrunProcess.onOwnThread {
                    try SrunProcess.run(argv, stdin: spec, log: log, cancel: cancel, scancel: scancel)
                }
            } onCancel: {
                Trace.mark("slurm: \(job) cancelled")
                cancel.set()
                scancel()
            }
        } catch let error as SandboxError {
            throw PipelineError(
                .infrastructure, "srun could not be started for step \(request.node): \(error)", cause: error)
        }
        if cancel.isSet { throw CancellationError() }
        let started = ended.frames.first { $0.event == .started }
        if let finished = ended.frames.first(where: { $0.event == .finished }) {
            return .finished(finished, host: started?.host, job: started?.job)
        }
        let said = ended.stderrTail.last { $0.hasPrefix(NodeStep.messagePrefix) }
        if ended.status == NodeStep.infrastructureStatus, let said, let host = started?.host {
            return .refused(host: host, why: String(said.dropFirst(NodeStep.messagePrefix.count)))
        }
        let tail = ended.stderrTail.suffix(3).joined(separator: " | ")
        // Only srun's word makes a node lost (a step command that died otherwise, say killed for
        // memory, would die again elsewhere).
        let failedNode = ended.stderrTail.lazy.compactMap { line -> String? in
            guard let range = line.range(of: "Node failure on ") else { return nil }
            return String(line[range.upperBound...].prefix { !$0.isWhitespace })
        }.first
        if let host = failedNode {
            return .lost(host: host, why: "srun exited \(ended.status)" + (tail.isEmpty ? "" : ": " + tail))
        }
        if let host = started?.host {
            return .failed(
                "the step command on \(host) ended without saying how the step went (srun exited \(ended.status)"
                    + (tail.isEmpty ? "" : ": " + tail)
                    + "); its job's log is in the step's log above; `scontrol show job \(started?.job ?? "")` says why Slurm ended it"
            )
        }
        return .failed(
            "srun could not run step \(request.node) (exit \(ended.status))" + (tail.isEmpty ? "" : ": " + tail)
                + "; check the partition and the nodes (sinfo), and that \(configuration.command) exists on every node")
    }

    /// The step's outcome here: its snapshot imported from the registry.
    private func outcome(_ frame: StepFrame, request: StepRequest, placement: Placement) async throws -> StepOutcome {
        guard var record = frame.record else {
            if frame.cancelled == true {
                // Not this run's doing (its own cancel never reads a frame): Slurm's time limit,
                // a preemption, an operator's scancel.
                throw PipelineError(
                    .infrastructure,
                    "Slurm ended the job of step \(request.node) on \(placement.node ?? "its node") (a time limit, a preemption or a scancel); `scontrol show job \(placement.jobID ?? "")` says which"
                )
            }
            throw PipelineError(
                .failed,
                "step \(request.node) did not run on \(placement.node ?? "its node"): \(frame.message ?? "no reason given")"
            )
        }
        record.image = request.parent
        record.resultImage = nil
        if let result = frame.result {
            let registry = configuration.registry
            do {
                let imported = try await BlockingPool.shared.run { [repository] () throws -> RegistryImport in
                    guard result.hasPrefix(registry), result.count > registry.count + 1,
                        let imported = try repository.importImage(
                            reference: String(result.dropFirst(registry.count + 1)))
                    else {
                        throw SandboxError(.notFound, "the node named \(result), which \(registry) does not have")
                    }
                    return imported
                }
                // Its dependents start from it where it is: no push.
                let reference = registry + "@" + imported.manifestDigest
                inRegistry.withLock { $0[imported.image.uuid] = reference }
                record.resultImage = imported.image.uuid
            } catch {
                throw PipelineError(
                    .infrastructure,
                    "step \(request.node) ran on \(placement.node ?? "its node") but its snapshot \(result) could not be fetched: \(error)",
                    cause: error)
            }
        }
        Trace.mark("slurm \(request.node): result imported")
        // Earlier attempts' snapshots stay on the node: only the last one came back.
        let history = frame.history.map { all in
            all.dropLast().map { attempt -> RunRecord in
                var attempt = attempt
                attempt.resultImage = nil
                return attempt
            } + [record]
        }
        return StepOutcome(
            record: record, output: Array((frame.output ?? "").utf8), attempts: frame.attempts ?? 1,
            placement: placement, history: history)
    }
}

/// Set once, by a task's cancellation handler; read by the thread waiting for `srun`. With
/// the job's id once the node named it.
final class CancelFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    private let id = Mutex<String?>(nil)
    func set() { flag.store(true, ordering: .sequentiallyConsistent) }
    var isSet: Bool { flag.load(ordering: .sequentiallyConsistent) }
    var jobID: String? {
        get { id.withLock { $0 } }
        set { id.withLock { $0 = newValue } }
    }
}

/// Runs `scancel` for the jobs asked, on a thread of its own (it must not wait behind
/// anything), as few times as it can: the jobs asked while one runs go together in the next,
/// by id (`scancel 41 42 43`), so that Ctrl-C of a wide run is one or two calls, not one per
/// step (under load each call costs hundreds of milliseconds).
final class JobCanceller: Sendable {
    private struct Pending {
        var ids: Set<String> = []
        var names: Set<String> = []
        var draining = false
    }
    private let pending = Mutex(Pending())
    let scancel: String

    init(scancel: String) { self.scancel = scancel }

    func cancel(name: String, id: String?) {
        let start = pending.withLock { pending -> Bool in
            if let id { pending.ids.insert(id) } else { pending.names.insert(name) }
            defer { pending.draining = true }
            return !pending.draining
        }
        if start { Thread.detachNewThread { self.drain() } }
    }

    private func drain() {
        usleep(2000)  // the other steps of a cancelled run ask within microseconds
        while true {
            let (ids, names) = pending.withLock { pending -> (Set<String>, Set<String>) in
                defer { pending.ids = []; pending.names = [] }
                if pending.ids.isEmpty && pending.names.isEmpty { pending.draining = false }
                return (pending.ids, pending.names)
            }
            if ids.isEmpty && names.isEmpty { return }
            Trace.mark("slurm: scancel \(ids.sorted().joined(separator: " ")) \(names.sorted().joined(separator: " "))")
            if !ids.isEmpty { _ = try? ChildProcess.run([scancel] + ids.sorted()) }
            for name in names.sorted() { _ = try? ChildProcess.run([scancel, "--name=" + name]) }
            Trace.mark("slurm: scancel done")
        }
    }
}

/// One `srun`: the spec on its stdin (a memfd: never a file), its stdout read as frames and
/// its stderr appended to the step's log as it comes.
enum SrunProcess {
    struct Ended {
        var status: Int32
        var frames: [StepFrame]
        /// The last lines of its stderr (the node's last word, or srun's).
        var stderrTail: [String]
    }

    /// `body` on a thread of its own: an srun waits as long as its step runs, and a wide run
    /// has as many at once as it has steps running.
    static func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            Thread.detachNewThread { continuation.resume(with: Result { try body() }) }
        }
    }

    static func run(
        _ argv: [String], stdin: [UInt8], log: StepLog, cancel: CancelFlag, scancel: @escaping () -> Void
    ) throws -> Ended {
        // Cancelled before it started: no job at all.
        if cancel.isSet { return Ended(status: 130, frames: [], stderrTail: []) }
        let memfd = csb_memfd_cloexec("contree-step-spec")
        guard memfd >= 0 else { throw SandboxError.system("memfd_create") }
        let spawned: ChildProcess.Spawned
        do {
            defer { close(memfd) }  // srun has its own copy as stdin
            try FileSystem.writeAll(fd: memfd, stdin, path: "the step spec")
            lseek(memfd, 0, SEEK_SET)
            // In a group of its own: Ctrl-C in a terminal signals the whole foreground group, and
            // a signalled srun kills its step; the coordinator cancels by scancel instead.
            spawned = try ChildProcess.spawn(argv, stdinFD: memfd, captureStdout: true, ownProcessGroup: true)
        }
        var frames: [StepFrame] = []
        var pendingOut: [UInt8] = []
        var pendingErr: [UInt8] = []
        var tail: [String] = []
        // Cancelling runs scancel at once; again every half second until srun ends (the job
        // may not have been queued yet at the first).
        var lastScancel: Double?
        do {
            try ChildProcess.drain(spawned, every: 0.1) {
                guard cancel.isSet else { return }
                if let last = lastScancel, Monotonic.now - last >= 0.5 {
                    lastScancel = Monotonic.now
                    scancel()
                } else if lastScancel == nil {
                    lastScancel = Monotonic.now
                }
            } onChunk: { isStderr, chunk in
                if isStderr {
                    log.append(Array(chunk))
                    pendingErr += chunk
                    while let newline = pendingErr.firstIndex(of: UInt8(ascii: "\n")) {
                        tail.append(String(decoding: pendingErr[..<newline], as: UTF8.self))
                        pendingErr.removeSubrange(...newline)
                        if tail.count > 8 { tail.removeFirst() }
                    }
                    return
                }
                pendingOut += chunk
                while let newline = pendingOut.firstIndex(of: UInt8(ascii: "\n")) {
                    let line = Array(pendingOut[..<newline])
                    pendingOut.removeSubrange(...newline)
                    if let frame = try? StepFrame.decoder.decode(StepFrame.self, from: Data(line)) {
                        frames.append(frame)
                        if frame.event == .started {
                            cancel.jobID = frame.job
                            log.placed(Placement(executor: "slurm", node: frame.host, jobID: frame.job))
                        }
                    } else {
                        log.append(line + [UInt8(ascii: "\n")])
                    }
                }
            }
        } catch {
            // Never leave the job behind: cancel it and wait for srun.
            scancel()
            _ = try? ChildProcess.wait(spawned.pid, argv[0])
            throw error
        }
        if !pendingErr.isEmpty { tail.append(String(decoding: pendingErr, as: UTF8.self)) }
        return Ended(status: try ChildProcess.wait(spawned.pid, argv[0]), frames: frames, stderrTail: tail)
    }
}
