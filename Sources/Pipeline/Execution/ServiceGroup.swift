import Glibc
import ImageStore
import Sandbox
import Synchronization
import SystemSupport

/// A service as a step executor starts it: rendered on the coordinator.
struct ServiceRequest: Sendable {
    var name: String
    /// The image (UUID) it starts from.
    var image: String
    var command: [String]
    var environment: [String: String]
    var ready: [String]?
    var readyTimeout: Double
    /// Its log (`logs/STEP.SERVICE.log`), written as it runs.
    var logPath: String
}

/// The services of one step, running: each a disposable sandbox in the step's network
/// namespace. `start` returns once every one passed its `ready` check; `stop` kills them all
/// (each with its whole tree) and waits, whatever happened before.
final class ServiceGroup: Sendable {
    let network: SandboxNetwork
    private let running: [Running]

    struct Running: Sendable {
        var request: ServiceRequest
        var control: RunControl
        var task: Task<RunResult, any Error>
        /// Set when the service's run is over (started or not).
        var finished: Flag
    }

    final class Flag: Sendable {
        private let value = Mutex(false)
        func set() { value.withLock { $0 = true } }
        var isSet: Bool { value.withLock { $0 } }
    }

    /// Starts the services and waits until each is ready.
    /// - Throws: `PipelineError` naming the service that failed or was not ready in time, with
    ///   the end of its log; the services started so far are stopped by then.
    static func start(
        _ requests: [ServiceRequest], network: NetworkMode, engine: SandboxEngine, step: String, log: StepLog
    ) async throws -> ServiceGroup {
        let shared = try await BlockingPool.shared.run { try SandboxNetwork(mode: network) }
        var started: [(ServiceRequest, RunControl, Task<RunResult, any Error>, Flag)] = []
        for request in requests {
            let fd = open(request.logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else {
                let group = ServiceGroup(network: shared, running: started)
                await group.stop()
                throw PipelineError(.failed, "cannot write the log of service \(request.name): \(request.logPath)")
            }
            let control = RunControl()
            var spec = RunSpec(
                image: request.image, command: request.command, env: request.environment, hostname: request.name,
                disposable: true, stdout: .fileDescriptor(fd), stderr: .fileDescriptor(fd))
            spec.sharedNetwork = shared
            spec.control = control
            let finished = Flag()
            let task = Task {
                defer {
                    close(fd)
                    finished.set()
                }
                return try await engine.run(spec)
            }
            started.append((request, control, task, finished))
        }
        let group = ServiceGroup(network: shared, running: started)
        do {
            for service in group.running { try await group.waitUntilReady(service, log: log) }
        } catch {
            await group.stop()
            throw error
        }
        return group
    }

    private init(network: SandboxNetwork, running: [(ServiceRequest, RunControl, Task<RunResult, any Error>, Flag)]) {
        self.network = network
        self.running = running.map { Running(request: $0.0, control: $0.1, task: $0.2, finished: $0.3) }
    }

    /// Runs the service's `ready` command in its sandbox until it exits 0.
    private func waitUntilReady(_ service: Running, log: StepLog) async throws {
        let (request, control) = (service.request, service.control)
        // The check's time counts from the service's start (preparing its image does not).
        var started = Monotonic.now
        var deadline = started + request.readyTimeout + ServiceGroup.startAllowance
        var running = false
        var environment = request.environment.map { "\($0.key)=\($0.value)" }
        if request.environment["PATH"] == nil { environment.append("PATH=" + ImageConfig.defaultPath) }
        var attempts = 0
        while true {
            try Task.checkCancellation()
            if control.isRunning {
                if !running {
                    running = true
                    started = Monotonic.now
                    deadline = started + request.readyTimeout
                }
                guard let ready = request.ready else { break }
                attempts += 1
                let left = deadline - Monotonic.now
                if left <= 0 { break }
                let outcome = try? await control.exec(
                    ExecSpec(
                        command: ready, environment: environment, stdout: .discard, stderr: .discard,
                        timeout: max(0.5, left)))
                if outcome?.termination.exitCode == 0 {
                    log.note(
                        "service \(request.name) ready after \((Monotonic.now - started).formatted(digits: 2)) s (\(Plural.count(attempts, "check")))"
                    )
                    return
                }
            } else if service.finished.isSet {
                throw failure(request, "ended before it was ready")
            }
            if Monotonic.now >= deadline { break }
            try await Task.sleep(nanoseconds: attempts == 0 ? 10_000_000 : 100_000_000)
        }
        if request.ready == nil && control.isRunning { return }
        throw failure(
            request, "was not ready within \(request.readyTimeout.formatted(digits: 0)) s (`ready` never exited 0)")
    }

    /// How long a service's sandbox may take to start, before its `ready` time counts.
    static let startAllowance = 120.0

    private func failure(_ request: ServiceRequest, _ what: String) -> PipelineError {
        let text = String(decoding: (try? FileSystem.readFile(request.logPath)) ?? [], as: UTF8.self)
        let tail = text.split(separator: "\n").suffix(10).joined(separator: "\n")
        return PipelineError(
            .failed,
            "service \(request.name) \(what); the end of its log (\(request.logPath)):\n\(tail.isEmpty ? "(empty)" : tail)"
        )
    }

    /// Kills every service (its sandbox and all in it) and waits for them; closes the network.
    func stop() async {
        for service in running {
            service.control.signal(SIGKILL)
            service.task.cancel()
        }
        for service in running { _ = try? await service.task.value }
        network.close()
    }
}
