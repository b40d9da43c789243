import CSandbox
import Glibc
import Synchronization
import SystemSupport

/// A running container sandbox as its `RunControl` sees it: its pid 1 (a pidfd of our own,
/// closed when the run ends) and its cgroup.
final class RunningContainer: RunningSandbox {
    private let pidfd: Mutex<Int32?>
    let pid: pid_t
    let cgroup: Cgroup
    let storeRoot: String
    let runID: String
    let network: NetworkMode
    /// The run's RLIMIT_FSIZE, which a process started in it later gets too (0: none).
    let fileSizeLimit: UInt64

    init(
        pidfd: Int32, pid: pid_t, cgroup: Cgroup, storeRoot: String, runID: String, network: NetworkMode,
        fileSizeLimit: UInt64
    ) {
        self.pid = pid
        self.fileSizeLimit = fileSizeLimit
        self.pidfd = Mutex(fcntl(pidfd, F_DUPFD_CLOEXEC, 3))
        self.cgroup = cgroup
        self.storeRoot = storeRoot
        self.runID = runID
        self.network = network
    }

    func signal(_ signal: Int32) {
        pidfd.withLock { fd in
            if let fd { _ = csb_pidfd_kill(fd, signal == SIGKILL ? CSB_SIGNAL_STOP : signal) }
        }
    }

    func exec(_ spec: ExecSpec) async throws -> CommandOutcome {
        // A copy of the pidfd of its own: the run may end (and close ours) meanwhile.
        guard let target = pidfd.withLock({ fd in fd.map { fcntl($0, F_DUPFD_CLOEXEC, 3) } }), target >= 0 else {
            throw SandboxError(.conflict, "the sandbox has ended, so nothing can be started in it")
        }
        defer { Glibc.close(target) }
        let cancel = csb_eventfd_cloexec()
        guard cancel >= 0 else { throw SandboxError.system("eventfd") }
        let signal = CancelSignal(fd: cancel)
        defer { signal.close() }
        return try await withTaskCancellationHandler {
            try await BlockingPool.shared.run {
                try ContainerExec(target: target, container: self, spec: spec, cancelFD: cancel).execute()
            }
        } onCancel: {
            signal.fire()
        }
    }

    func close() {
        pidfd.withLock { fd in
            if let open = fd { Glibc.close(open) }
            fd = nil
        }
    }
}

/// One command started in a running container sandbox: `contree-init exec` joins the
/// sandbox's namespaces and cgroup and runs it with the sandbox's credentials and filter.
struct ContainerExec {
    let target: Int32
    let container: RunningContainer
    let spec: ExecSpec
    let cancelFD: Int32

    func execute() throws -> CommandOutcome {
        let initProgram = try ContainerBackend.initProgram()
        let userns = try ContainerBackend.userNamespace()
        let closer = ContainerLaunch.Closer()
        let (stdinChild, stdinFeed, out, err) = try ContainerLaunch.stdio(
            spec.stdin, spec.stdout, spec.stderr, closer: closer)
        let go = try closer.pipe()
        let report = try closer.pipe()

        let argv = CStringArray(spec.command)
        let envp = CStringArray(spec.environment)
        let lowers = CStringArray([])
        // An exec joins the sandbox's mounts: no store, layers or root of its own.
        let strings = LaunchStrings([.cwd: spec.cwd, .initPath: initProgram])
        var launch = csb_launch()
        launch.store = strings[.store]
        launch.upper = strings[.upper]
        launch.work = strings[.work]
        launch.root = strings[.root]
        launch.hostname = strings[.hostname]
        launch.cwd = strings[.cwd]
        launch.init_path = strings[.initPath]
        launch.lowers = UnsafePointer(lowers.pointer)
        launch.lower_count = 0
        launch.userns_fd = userns
        launch.id_base = ContainerBackend.idBase
        launch.argv = UnsafePointer(argv.pointer)
        launch.envp = UnsafePointer(envp.pointer)
        launch.uid = spec.uid
        launch.file_size_limit = container.fileSizeLimit
        launch.gid = spec.gid
        launch.stdin_fd = stdinChild
        launch.stdout_fd = out.child
        launch.stderr_fd = err.child
        launch.file_count = 0
        launch.go_fd = go.read
        launch.report_fd = report.write

        let started = Monotonic.now
        var pidfd: Int32 = -1
        var pid: pid_t = 0
        let rc = withExtendedLifetime((strings, lowers, argv, envp)) { csb_exec_start(&launch, target, &pidfd, &pid) }
        guard rc == 0 else { throw SandboxError(.sandboxSetup, "cannot start the exec helper", errno: -rc) }
        _ = closer.add(pidfd)
        closer.close(go.read)
        closer.close(report.write)
        if case .bytes = spec.stdin { closer.close(stdinChild) }
        if out.drain != nil { closer.close(out.child) }
        if err.drain != nil { closer.close(err.child) }
        do {
            try container.cgroup.attach(pid)
        } catch {
            _ = csb_pidfd_kill(pidfd, SIGKILL)
            _ = try? ChildProcess.wait(pid, "contree-init exec")
            throw error
        }
        var byte: UInt8 = 1
        _ = Glibc.write(go.write, &byte, 1)
        let process = ExecProcess(pidfd: pidfd)
        spec.control?.attach(process)
        defer {
            spec.control?.detach()
            process.close()
        }

        // The supervisor of a run serves an exec as well: same report, output and timeout.
        var supervisor = Supervisor(
            pidfd: pidfd, reportFD: report.read, cancelFD: cancelFD, stdoutFD: out.drain, stderrFD: err.drain,
            stdinFeed: stdinFeed, stdout: spec.stdout, stderr: spec.stderr, timeout: spec.timeout, closer: closer)
        try supervisor.loop(started: started)
        var status: Int32 = 0
        var usage = csb_usage()
        let waited = csb_wait(pid, &status, &usage)
        guard waited == 0 else { throw SandboxError(.sandboxSetup, "wait4(exec)", errno: -waited) }
        if let failure = supervisor.setupFailure { throw Supervisor.setupError(failure) }

        var outcome = CommandOutcome()
        let commandStatus = supervisor.exitReport?.status ?? status
        (outcome.termination.exitCode, outcome.termination.signal) = Supervisor.decode(status: commandStatus)
        outcome.termination.timedOut = supervisor.timedOut
        outcome.termination.cancelled = supervisor.cancelled
        outcome.stdout = supervisor.stdout.kept
        outcome.stderr = supervisor.stderr.kept
        outcome.stdoutDropped = supervisor.stdout.dropped
        outcome.stderrDropped = supervisor.stderr.dropped
        outcome.metrics.wallSeconds = Monotonic.now - started
        return outcome
    }
}

/// An exec'd command as its control sees it: signals go to the exec helper, which forwards
/// them to the command's group (SIGKILL: kills the group).
final class ExecProcess: RunningSandbox {
    private let pidfd: Mutex<Int32?>

    init(pidfd: Int32) { self.pidfd = Mutex(fcntl(pidfd, F_DUPFD_CLOEXEC, 3)) }

    func signal(_ signal: Int32) {
        pidfd.withLock { fd in
            if let fd { _ = csb_pidfd_kill(fd, signal == SIGKILL ? CSB_SIGNAL_STOP : signal) }
        }
    }

    func exec(_ spec: ExecSpec) async throws -> CommandOutcome {
        throw SandboxError(.unsupported, "start more commands through the sandbox's control, not an exec's")
    }

    func close() {
        pidfd.withLock { fd in
            if let open = fd { Glibc.close(open) }
            fd = nil
        }
    }
}
