import CSandbox
import Glibc
import SystemSupport

/// One run of the container backend, on its dedicated thread.
/// The strings a launch points to, by name; they live as long as this value.
struct LaunchStrings {
    enum Name: Int, CaseIterable {
        case upper, work, root, hostname, cwd, store, initPath
    }
    private let storage: CStringArray

    /// Names not given are empty strings.
    init(_ values: [Name: String]) { storage = CStringArray(Name.allCases.map { values[$0] ?? "" }) }

    subscript(_ name: Name) -> UnsafePointer<CChar>? { storage.pointer[name.rawValue] }
}

struct ContainerLaunch {
    let request: LaunchRequest
    let cancelFD: Int32

    /// fds this launch opened and must close.
    final class Closer {
        var fds: [Int32] = []
        func pipe() throws -> (read: Int32, write: Int32) {
            var p: [Int32] = [-1, -1]
            guard csb_pipe_cloexec(&p) == 0 else { throw SandboxError.system("pipe2") }
            return (add(p[0]), add(p[1]))
        }
        func add(_ fd: Int32) -> Int32 {
            fds.append(fd)
            return fd
        }
        func close(_ fd: Int32) {
            if let i = fds.firstIndex(of: fd) {
                fds.remove(at: i)
                Glibc.close(fd)
            }
        }
        deinit { for fd in fds { Glibc.close(fd) } }
    }

    /// The command's stdio: what the child gets, and what the supervisor keeps to feed or drain.
    static func stdio(
        _ input: InputSource, _ output: OutputSink, _ errors: OutputSink, closer: Closer
    ) throws -> (
        stdinChild: Int32, stdinFeed: (fd: Int32, bytes: [UInt8])?, out: (child: Int32, drain: Int32?),
        err: (child: Int32, drain: Int32?)
    ) {
        func devNull(_ flags: Int32) throws -> Int32 {
            let fd = open("/dev/null", flags | O_CLOEXEC)
            guard fd >= 0 else { throw SandboxError.system("open(/dev/null)") }
            return closer.add(fd)
        }
        var stdinChild: Int32
        var stdinFeed: (fd: Int32, bytes: [UInt8])?
        switch input {
        case .null: stdinChild = try devNull(O_RDONLY)
        case .fileDescriptor(let fd): stdinChild = fd
        case .bytes(let bytes):
            let p = try closer.pipe()
            stdinChild = p.read
            _ = fcntl(p.write, F_SETFL, O_NONBLOCK)
            stdinFeed = (p.write, bytes)
        }
        // Output always goes through a pipe the supervisor drains: handing the command the
        // caller's own descriptor would let it reopen /proc/self/fd/1 (a log file, and what the
        // host wrote to it before) with the access the file's mode gives.
        func outputEnd(_ sink: OutputSink) throws -> (child: Int32, drain: Int32?) {
            switch sink {
            case .discard: return (try devNull(O_WRONLY), nil)
            case .fileDescriptor, .capture:
                let p = try closer.pipe()
                return (p.write, p.read)
            }
        }
        return (stdinChild, stdinFeed, try outputEnd(output), try outputEnd(errors))
    }

    func execute() throws -> CommandOutcome {
        let initProgram = try ContainerBackend.initProgram()
        let userns = try ContainerBackend.userNamespace()
        Trace.mark("user namespace")
        let closer = Closer()

        func pipePair() throws -> (read: Int32, write: Int32) { try closer.pipe() }
        var (stdinChild, stdinFeed, out, err) = try ContainerLaunch.stdio(
            request.stdin, request.stdout, request.stderr, closer: closer)
        // An interactive session: stdio is one pty, relayed to the caller's terminal.
        var terminal: (primary: Int32, secondary: Int32)?
        if let session = request.terminal {
            var primary: Int32 = -1
            var secondary: Int32 = -1
            let rc = csb_openpty(&primary, &secondary, session.outputFD)
            guard rc == 0 else { throw SandboxError(.sandboxSetup, "cannot open a pseudo-terminal", errno: -rc) }
            terminal = (closer.add(primary), closer.add(secondary))
            stdinChild = secondary
            out = (secondary, nil)
            err = (secondary, nil)
        }
        let go = try pipePair()
        let report = try pipePair()

        let directory = request.storeRoot + "/" + request.directory
        for name in ["work", "root"] { try FileSystem.makeDirectory(directory + "/" + name, mode: 0o755) }
        let cgroup = try Cgroup.create(storeRoot: request.storeRoot, id: request.id, limits: request.limits)
        Trace.mark("cgroup created")
        defer { cgroup.remove() }
        // On v1 the child joins the cgroups itself before it execs (no global lock, no grace
        // period); elsewhere the process is moved by pid once it exists.
        let joinFDs = cgroup.selfJoinDescriptors() ?? []
        defer { joinFDs.forEach { close($0) } }
        let joins = UnsafeMutablePointer<Int32>.allocate(capacity: max(1, joinFDs.count))
        defer { joins.deallocate() }
        for (i, fd) in joinFDs.enumerated() { joins[i] = fd }

        // Egress needs a namespace with the NAT helper attached before the sandbox joins it.
        var ownNetwork: SandboxNetwork?
        if request.sharedNetwork == nil && request.network.isEgress {
            ownNetwork = try SandboxNetwork(mode: request.network)
            Trace.mark("network")
        }
        defer { ownNetwork?.close() }
        let network = request.sharedNetwork ?? ownNetwork

        var mounts = request.mounts
        if network?.mode.isEgress == true {
            mounts.append(try SandboxNetwork.resolvConfMount(storeRoot: request.storeRoot))
        }
        let lowers = CStringArray(request.lowers)
        let bindStrings = CStringArray(mounts.flatMap { [$0.source, $0.target] })
        let binds = UnsafeMutablePointer<csb_bind>.allocate(capacity: max(1, mounts.count))
        defer { binds.deallocate() }
        for (i, mount) in mounts.enumerated() {
            binds[i] = csb_bind(
                source: bindStrings.pointer[2 * i], target: bindStrings.pointer[2 * i + 1],
                flags: UInt32(mount.readOnly ? Int32(CSB_BIND_READ_ONLY) : 0)
                    | UInt32(mount.isFile ? Int32(CSB_BIND_FILE) : 0))
        }
        let argv = CStringArray(request.argv)
        let envp = CStringArray(request.environment)
        let paths = CStringArray(request.files.map(\.mapping.sandboxPath))
        let strings = LaunchStrings([
            // The overlay's work directory and the root's mount point live in the run's directory.
            .upper: request.upper, .work: request.directory + "/work", .root: directory + "/root",
            .hostname: request.hostname, .cwd: request.cwd, .store: request.storeRoot, .initPath: initProgram,
        ])
        let files = UnsafeMutablePointer<csb_file_copy>.allocate(capacity: max(1, request.files.count))
        defer { files.deallocate() }
        for (i, file) in request.files.enumerated() {
            files[i] = csb_file_copy(
                source_fd: file.fd, path: paths.pointer[i], mode: file.mapping.mode ?? 0o644, uid: file.mapping.uid,
                gid: file.mapping.gid)
        }
        var launch = csb_launch()
        launch.store = strings[.store]
        launch.init_path = strings[.initPath]
        launch.lowers = UnsafePointer(lowers.pointer)
        launch.lower_count = request.lowers.count
        launch.upper = strings[.upper]
        launch.work = strings[.work]
        launch.root = strings[.root]
        launch.userns_fd = userns
        launch.id_base = ContainerBackend.idBase
        launch.hostname = strings[.hostname]
        launch.loopback_up = network == nil && request.network == .loopback ? 1 : 0
        launch.netns_fd = network?.namespaceFD ?? -1
        launch.binds = UnsafePointer(binds)
        launch.bind_count = mounts.count
        launch.argv = UnsafePointer(argv.pointer)
        launch.envp = UnsafePointer(envp.pointer)
        launch.cwd = strings[.cwd]
        launch.uid = request.uid
        launch.gid = request.gid
        launch.stdin_fd = stdinChild
        launch.stdout_fd = out.child
        launch.stderr_fd = err.child
        launch.files = UnsafePointer(files)
        launch.file_count = request.files.count
        launch.cgroup_fds = UnsafePointer(joins)
        launch.cgroup_fd_count = joinFDs.count
        launch.go_fd = go.read
        launch.report_fd = report.write
        launch.terminal = terminal == nil ? 0 : 1
        launch.file_size_limit = UInt64(max(0, request.limits.layerBytes ?? 0))

        let started = Monotonic.now
        var pidfd: Int32 = -1
        var pid: pid_t = 0
        // The strings and arrays the launch points into live until the clone has copied them.
        let rc = withExtendedLifetime((strings, lowers, argv, envp, paths, bindStrings, network)) {
            csb_launch_start(&launch, &pidfd, &pid)
        }
        guard rc == 0 else {
            throw SandboxError(
                .sandboxSetup,
                joinFDs.isEmpty ? "cannot clone the sandbox" : "cannot clone the sandbox into its cgroup",
                errno: -rc)
        }
        _ = closer.add(pidfd)
        Trace.mark("cloned")
        // The child has its copies; ours would keep pipes from reaching EOF.
        closer.close(go.read)
        closer.close(report.write)
        if case .bytes = request.stdin { closer.close(stdinChild) }
        if out.drain != nil { closer.close(out.child) }
        if err.drain != nil { closer.close(err.child) }
        if let terminal { closer.close(terminal.secondary) }

        do {
            if joinFDs.isEmpty { try cgroup.attach(pid) }
        } catch {
            _ = csb_pidfd_kill(pidfd, SIGKILL)
            var status: Int32 = 0
            var usage = csb_usage()
            _ = csb_wait(pid, &status, &usage)
            // Pid 1 prepares the root while we attach: if it failed first, that is the cause.
            let bytes = (try? FileSystem.readAll(fd: report.read, path: "sandbox report")) ?? []
            if let failure = Supervisor.decode(bytes).first(where: { $0.kind == Int32(CSB_REPORT_SETUP_FAILED) }) {
                throw Supervisor.setupError(failure)
            }
            throw error
        }
        Trace.mark("cgroup attached")
        var byte: UInt8 = 1
        _ = Glibc.write(go.write, &byte, 1)
        let running = RunningContainer(
            pidfd: pidfd, pid: pid, cgroup: cgroup, storeRoot: request.storeRoot, runID: request.id,
            network: request.network,
            fileSizeLimit: launch.file_size_limit)
        request.control?.attach(running)
        defer {
            request.control?.detach()
            running.close()
        }
        // go.write stays open until the run ends: pid 1 reads its hang-up as "the parent died".

        var supervisor = Supervisor(
            pidfd: pidfd, reportFD: report.read, cancelFD: cancelFD, stdoutFD: out.drain, stderrFD: err.drain,
            stdinFeed: stdinFeed, stdout: request.stdout, stderr: request.stderr, timeout: request.timeout,
            upperWatch: request.limits.layerBytes.map {
                UpperWatch(path: request.storeRoot + "/" + request.upper, limit: $0)
            },
            closer: closer, terminal: terminal.map { (primary: $0.primary, session: request.terminal!) })
        try supervisor.loop(started: started)

        var status: Int32 = 0
        var usage = csb_usage()
        let waited = csb_wait(pid, &status, &usage)
        guard waited == 0 else { throw SandboxError(.sandboxSetup, "wait4(sandbox)", errno: -waited) }
        let wall = Monotonic.now - started
        Trace.mark("reaped")

        if let failure = supervisor.setupFailure { throw Supervisor.setupError(failure) }

        let outcome = ContainerLaunch.outcome(
            of: supervisor, status: status, usage: usage, wallSeconds: wall, cgroup: cgroup.metrics())
        Trace.mark("metrics read")
        return outcome
    }

    /// How the sandbox ended and what it used: pid 1's report of the command (or pid 1's own
    /// status when it was killed), the supervisor's verdicts, the cgroup's figures (the
    /// rusage of pid 1's wait where the host has no such controller).
    static func outcome(
        of supervisor: Supervisor, status: Int32, usage: csb_usage, wallSeconds: Double, cgroup cg: CgroupMetrics
    ) -> CommandOutcome {
        var outcome = CommandOutcome()
        let commandStatus: Int32
        if let exited = supervisor.exitReport {
            if Trace.enabled {
                let names = [
                    "go received", "overlay mounted", "proc, dev, masks", "pivoted", "command forked",
                    "command exited", "namespace emptied",
                ]
                withUnsafeBytes(of: exited.stages) { raw in
                    let stages = raw.bindMemory(to: Int64.self)
                    for (i, name) in names.enumerated() where stages[i] > 0 {
                        Trace.mark("  sandbox: \(name)", at: Double(stages[i]) / 1e9)
                    }
                }
            }
            commandStatus = exited.status
            outcome.metrics.processes = exited.tasks
        } else {
            commandStatus = status  // pid 1 itself was killed (timeout, cancel, OOM)
        }
        (outcome.termination.exitCode, outcome.termination.signal) = Supervisor.decode(status: commandStatus)
        outcome.termination.timedOut = supervisor.timedOut
        outcome.termination.cancelled = supervisor.cancelled
        outcome.termination.changeTooLarge = supervisor.upperWatch?.exceeded ?? false
        outcome.termination.oomKilled = cg.oomKills > 0
        outcome.metrics.wallSeconds = wallSeconds
        outcome.metrics.cpuUserSeconds = Double(cg.cpuUserMicros ?? usage.user_us) / 1e6
        outcome.metrics.cpuSystemSeconds = Double(cg.cpuSystemMicros ?? usage.system_us) / 1e6
        outcome.metrics.peakMemoryBytes = cg.peakMemoryBytes ?? usage.max_rss_kb * 1024
        outcome.metrics.bytesRead = cg.bytesRead ?? usage.in_blocks * 512
        outcome.metrics.bytesWritten = cg.bytesWritten ?? usage.out_blocks * 512
        outcome.metrics.peakProcesses = cg.peakTasks.map { max(0, $0 - 1) }
        outcome.stdout = supervisor.stdout.kept
        outcome.stderr = supervisor.stderr.kept
        outcome.stdoutDropped = supervisor.stdout.dropped
        outcome.stderrDropped = supervisor.stderr.dropped
        return outcome
    }
}
