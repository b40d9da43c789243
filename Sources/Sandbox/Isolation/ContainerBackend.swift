import CSandbox
import Glibc
import Synchronization

/// The container backend: Linux namespaces (user, mount, pid, net, uts, ipc, cgroup), an
/// overlayfs root over an idmapped view of the store, pivot_root, a masked /proc, a minimal
/// /dev, no /sys, capabilities dropped, no_new_privs and a seccomp deny list. The fork-to-exec
/// path is C (`CSandbox`); this type prepares it and supervises the run.
public struct ContainerBackend: IsolationBackend {
    public let kind = IsolationKind.container
    /// Host uid/gid that the sandbox's root maps to, and how many ids are mapped.
    public static let idBase: UInt32 = 100_000
    public static let idCount: UInt32 = 65_536

    public init() {}

    /// Prepares the host for a first sandbox, once per process: starts paying the cgroup
    /// migration's grace period in the background (see `Cgroup.prime`). Call it as early as
    /// possible; `SandboxEngine` calls it too.
    public static func warmUp() {
        warmedUp.withLock { done in
            guard !done else { return }
            done = true
            Cgroup.prime()
        }
    }

    private static let warmedUp = Mutex(false)

    /// The contree-init program: `$CONTREE_INIT`, or next to the running binary (SwiftPM puts
    /// every product of the package in one directory).
    static func initProgram() throws -> String {
        if let explicit = getenv("CONTREE_INIT"), explicit.pointee != 0 { return String(cString: explicit) }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        if n > 0 {
            let exe = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let candidate = String(exe[..<(exe.lastIndex(of: "/") ?? exe.endIndex)]) + "/contree-init"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        throw SandboxError(
            .unsupported,
            "contree-init was not found next to this program; build the package (`swift build`) or set CONTREE_INIT")
    }

    public func run(_ request: LaunchRequest) async throws -> LaunchOutcome {
        let cancel = csb_eventfd_cloexec()
        guard cancel >= 0 else { throw SandboxError.system("eventfd") }
        let signal = CancelSignal(fd: cancel)
        defer { signal.close() }
        return try await withTaskCancellationHandler {
            try await DedicatedThread.run { try ContainerLaunch(request: request, cancelFD: cancel).execute() }
        } onCancel: {
            signal.fire()
        }
    }

    /// The user namespace every sandbox of this process joins (0 -> idBase). Sandboxes are kept
    /// apart by their other namespaces; sharing one mapping is what lets them share layers.
    static func userNamespace() throws -> Int32 {
        try sharedUserNamespace.withLock { fd in
            if let fd { return fd }
            guard geteuid() == 0 else {
                throw SandboxError(
                    .sandboxSetup, "the container backend needs root (it creates namespaces and mounts); run it as root")
            }
            let created = csb_userns_create(idBase, idCount)
            guard created >= 0 else {
                throw SandboxError(
                    .sandboxSetup,
                    "cannot create the sandbox's user namespace; check that user namespaces are enabled (sysctl user.max_user_namespaces)",
                    errno: -created)
            }
            fd = created
            return created
        }
    }

    private static let sharedUserNamespace = Mutex<Int32?>(nil)
}

/// Fires an eventfd once; closes it when the run is over.
private final class CancelSignal: Sendable {
    private let state: Mutex<Int32>
    init(fd: Int32) { state = Mutex(fd) }
    func fire() {
        state.withLock { fd in
            guard fd >= 0 else { return }
            var one: UInt64 = 1
            _ = Glibc.write(fd, &one, 8)
        }
    }
    func close() {
        state.withLock { fd in
            if fd >= 0 { _ = Glibc.close(fd) }
            fd = -1
        }
    }
}

/// NUL-terminated C strings that live as long as this object.
final class CStringArray {
    let pointer: UnsafeMutablePointer<UnsafePointer<CChar>?>
    let count: Int

    init(_ strings: [String]) {
        count = strings.count
        pointer = .allocate(capacity: strings.count + 1)
        for (i, s) in strings.enumerated() { pointer[i] = UnsafePointer(strdup(s)) }
        pointer[strings.count] = nil
    }

    deinit {
        for i in 0..<count { free(UnsafeMutableRawPointer(mutating: pointer[i])) }
        pointer.deallocate()
    }
}

/// One run of the container backend, on its dedicated thread.
private struct ContainerLaunch {
    let request: LaunchRequest
    let cancelFD: Int32

    /// fds this launch opened and must close.
    final class Closer {
        var fds: [Int32] = []
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

    func execute() throws -> LaunchOutcome {
        let initProgram = try ContainerBackend.initProgram()
        let userns = try ContainerBackend.userNamespace()
        Trace.mark("user namespace")
        let closer = Closer()

        func pipePair() throws -> (read: Int32, write: Int32) {
            var p: [Int32] = [-1, -1]
            guard csb_pipe_cloexec(&p) == 0 else { throw SandboxError.system("pipe2") }
            return (closer.add(p[0]), closer.add(p[1]))
        }
        func devNull(_ flags: Int32) throws -> Int32 {
            let fd = open("/dev/null", flags | O_CLOEXEC)
            guard fd >= 0 else { throw SandboxError.system("open(/dev/null)") }
            return closer.add(fd)
        }

        // stdio: what the child gets, and what we keep to feed or drain.
        var stdinChild: Int32
        var stdinFeed: (fd: Int32, bytes: [UInt8])?
        switch request.stdin {
        case .null: stdinChild = try devNull(O_RDONLY)
        case .fileDescriptor(let fd): stdinChild = fd
        case .bytes(let bytes):
            let p = try pipePair()
            stdinChild = p.read
            _ = fcntl(p.write, F_SETFL, O_NONBLOCK)
            stdinFeed = (p.write, bytes)
        }
        func outputEnd(_ sink: OutputSink) throws -> (child: Int32, drain: Int32?) {
            switch sink {
            case .fileDescriptor(let fd): return (fd, nil)
            case .discard: return (try devNull(O_WRONLY), nil)
            case .capture:
                let p = try pipePair()
                return (p.write, p.read)
            }
        }
        let out = try outputEnd(request.stdout)
        let err = try outputEnd(request.stderr)
        let go = try pipePair()
        let report = try pipePair()

        let cgroup = try Cgroup.create(storeRoot: request.storeRoot, id: request.id, limits: request.limits)
        Trace.mark("cgroup created")
        defer { cgroup.remove() }

        let lowers = CStringArray(request.lowers)
        let argv = CStringArray(request.argv)
        let envp = CStringArray(request.environment)
        let paths = CStringArray(request.files.map(\.mapping.sandboxPath))
        let strings = CStringArray([request.upper, request.work, request.rootMount, request.hostname, request.cwd, request.storeRoot, initProgram])
        let files = UnsafeMutablePointer<csb_file_copy>.allocate(capacity: max(1, request.files.count))
        defer { files.deallocate() }
        for (i, file) in request.files.enumerated() {
            files[i] = csb_file_copy(
                source_fd: file.fd, path: paths.pointer[i], mode: file.mapping.mode ?? 0o644, uid: file.mapping.uid,
                gid: file.mapping.gid)
        }
        var launch = csb_launch()
        launch.store = strings.pointer[5]
        launch.init_path = strings.pointer[6]
        launch.lowers = UnsafePointer(lowers.pointer)
        launch.lower_count = request.lowers.count
        launch.upper = strings.pointer[0]
        launch.work = strings.pointer[1]
        launch.root = strings.pointer[2]
        launch.userns_fd = userns
        launch.id_base = ContainerBackend.idBase
        launch.hostname = strings.pointer[3]
        launch.loopback_up = request.network == .loopback ? 1 : 0
        launch.argv = UnsafePointer(argv.pointer)
        launch.envp = UnsafePointer(envp.pointer)
        launch.cwd = strings.pointer[4]
        launch.uid = request.uid
        launch.gid = request.gid
        launch.stdin_fd = stdinChild
        launch.stdout_fd = out.child
        launch.stderr_fd = err.child
        launch.files = UnsafePointer(files)
        launch.file_count = request.files.count
        launch.go_fd = go.read
        launch.report_fd = report.write

        let started = Clock.monotonic
        var pidfd: Int32 = -1
        var pid: pid_t = 0
        let rc = csb_launch_start(&launch, &pidfd, &pid)
        guard rc == 0 else { throw SandboxError(.sandboxSetup, "cannot clone the sandbox", errno: -rc) }
        _ = closer.add(pidfd)
        Trace.mark("cloned")
        // The child has its copies; ours would keep pipes from reaching EOF.
        closer.close(go.read)
        closer.close(report.write)
        if case .bytes = request.stdin { closer.close(stdinChild) }
        if out.drain != nil { closer.close(out.child) }
        if err.drain != nil { closer.close(err.child) }

        do {
            try cgroup.attach(pid)
        } catch {
            _ = csb_pidfd_kill(pidfd, SIGKILL)
            var status: Int32 = 0
            var usage = [Int64](repeating: 0, count: 6)
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
        closer.close(go.write)

        var supervisor = Supervisor(
            pidfd: pidfd, reportFD: report.read, cancelFD: cancelFD, stdoutFD: out.drain, stderrFD: err.drain,
            stdinFeed: stdinFeed, request: request, closer: closer)
        try supervisor.loop(started: started)

        var status: Int32 = 0
        var usage = [Int64](repeating: 0, count: 6)
        let waited = csb_wait(pid, &status, &usage)
        guard waited == 0 else { throw SandboxError(.sandboxSetup, "wait4(sandbox)", errno: -waited) }
        let wall = Clock.monotonic - started
        Trace.mark("reaped")

        if let failure = supervisor.setupFailure { throw Supervisor.setupError(failure) }

        var outcome = LaunchOutcome()
        let commandStatus: Int32
        if let exited = supervisor.exitReport {
            if Trace.enabled {
                let names = ["go received", "overlay mounted", "proc, dev, masks", "pivoted", "command forked",
                             "command exited", "namespace emptied"]
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
        if commandStatus & 0x7f == 0 {
            outcome.exitCode = (commandStatus >> 8) & 0xff
        } else {
            outcome.signal = commandStatus & 0x7f
        }
        outcome.timedOut = supervisor.timedOut
        outcome.cancelled = supervisor.cancelled
        let cg = cgroup.metrics()
        outcome.oomKilled = cg.oomKills > 0
        outcome.metrics.wallSeconds = wall
        outcome.metrics.cpuUserSeconds = Double(cg.cpuUserMicros ?? usage[0]) / 1e6
        outcome.metrics.cpuSystemSeconds = Double(cg.cpuSystemMicros ?? usage[1]) / 1e6
        outcome.metrics.peakMemoryBytes = cg.peakMemoryBytes ?? usage[2] * 1024
        outcome.metrics.bytesRead = cg.bytesRead ?? usage[3] * 512
        outcome.metrics.bytesWritten = cg.bytesWritten ?? usage[4] * 512
        outcome.metrics.peakProcesses = cg.peakTasks.map { max(0, $0 - 1) }
        outcome.stdout = supervisor.stdout.kept
        outcome.stderr = supervisor.stderr.kept
        outcome.stdoutDropped = supervisor.stdout.dropped
        outcome.stderrDropped = supervisor.stderr.dropped
        Trace.mark("metrics read")
        return outcome
    }
}

/// Captured output of one stream.
struct Capture {
    var kept: [UInt8] = []
    var dropped = 0
    let limit: Int
    let onChunk: (@Sendable ([UInt8]) -> Void)?

    init(_ sink: OutputSink) {
        if case .capture(let limit, let onChunk) = sink {
            self.limit = limit
            self.onChunk = onChunk
        } else {
            self.limit = 0
            self.onChunk = nil
        }
    }

    mutating func add(_ chunk: ArraySlice<UInt8>) {
        let room = max(0, limit - kept.count)
        kept.append(contentsOf: chunk.prefix(room))
        dropped += max(0, chunk.count - room)
        onChunk?(Array(chunk))
    }
}

/// Polls the sandbox: its exit, its report, its output, its stdin, the timeout, cancellation.
private struct Supervisor {
    let pidfd: Int32
    var reportFD: Int32?
    let cancelFD: Int32
    var stdoutFD: Int32?
    var stderrFD: Int32?
    var stdinFeed: (fd: Int32, bytes: [UInt8])?
    let request: LaunchRequest
    let closer: ContainerLaunch.Closer

    var stdout: Capture
    var stderr: Capture
    var reportBytes: [UInt8] = []
    var timedOut = false
    var cancelled = false
    var exited = false
    var stdinOffset = 0

    init(
        pidfd: Int32, reportFD: Int32, cancelFD: Int32, stdoutFD: Int32?, stderrFD: Int32?,
        stdinFeed: (fd: Int32, bytes: [UInt8])?, request: LaunchRequest, closer: ContainerLaunch.Closer
    ) {
        self.pidfd = pidfd
        self.reportFD = reportFD
        self.cancelFD = cancelFD
        self.stdoutFD = stdoutFD
        self.stderrFD = stderrFD
        self.stdinFeed = stdinFeed
        self.request = request
        self.closer = closer
        self.stdout = Capture(request.stdout)
        self.stderr = Capture(request.stderr)
        if stdinFeed?.bytes.isEmpty == true {
            closer.close(stdinFeed!.fd)
            self.stdinFeed = nil
        }
    }

    var reports: [csb_report] { Supervisor.decode(reportBytes) }

    static func decode(_ bytes: [UInt8]) -> [csb_report] {
        let size = MemoryLayout<csb_report>.size
        return stride(from: 0, to: bytes.count - size + 1, by: size).map { offset in
            bytes[offset..<(offset + size)].withUnsafeBytes { $0.loadUnaligned(as: csb_report.self) }
        }
    }

    static func setupError(_ failure: csb_report) -> SandboxError {
        let detail = withUnsafeBytes(of: failure.detail) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        return SandboxError(
            .sandboxSetup, "cannot start the sandbox: \(detail)", errno: failure.err == 0 ? nil : failure.err)
    }

    var setupFailure: csb_report? { reports.first { $0.kind == Int32(CSB_REPORT_SETUP_FAILED) } }
    var exitReport: csb_report? { reports.first { $0.kind == Int32(CSB_REPORT_EXITED) } }

    mutating func loop(started: Double) throws {
        let deadline = request.timeout.map { started + $0 }
        var buffer = [UInt8](repeating: 0, count: 65536)
        var killed = false
        var forceKillAt: Double?
        /// Pid 1 kills and reaps the tree itself (keeping its rusage); SIGKILL if it lingers.
        func stop() {
            killed = true
            _ = csb_pidfd_kill(pidfd, CSB_SIGNAL_STOP)
            forceKillAt = Clock.monotonic + 2
        }
        while true {
            if exited && stdoutFD == nil && stderrFD == nil && reportFD == nil { return }
            var polls: [pollfd] = []
            var roles: [Int] = []  // 0 pidfd, 1 report, 2 stdout, 3 stderr, 4 stdin, 5 cancel
            func add(_ fd: Int32?, _ events: Int32, _ role: Int) {
                guard let fd else { return }
                polls.append(pollfd(fd: fd, events: Int16(events), revents: 0))
                roles.append(role)
            }
            if !exited { add(pidfd, POLLIN, 0) }
            add(reportFD, POLLIN, 1)
            add(stdoutFD, POLLIN, 2)
            add(stderrFD, POLLIN, 3)
            if !exited { add(stdinFeed?.fd, POLLOUT, 4) }
            if !killed { add(cancelFD, POLLIN, 5) }
            var timeoutMs: Int32 = -1
            if let next = forceKillAt ?? (killed ? nil : deadline), !exited {
                timeoutMs = Int32(max(0, min(Double(Int32.max), (next - Clock.monotonic) * 1000).rounded(.up)))
            }
            let rc = poll(&polls, nfds_t(polls.count), timeoutMs)
            if rc < 0 {
                if errno == EINTR { continue }
                throw SandboxError.system("poll(sandbox)")
            }
            if rc == 0 {
                if let forceAt = forceKillAt, Clock.monotonic >= forceAt {
                    _ = csb_pidfd_kill(pidfd, SIGKILL)  // pid 1 did not stop in time
                    forceKillAt = nil
                } else if let deadline, !killed, Clock.monotonic >= deadline {
                    timedOut = true
                    stop()
                }
                continue
            }
            for (i, p) in polls.enumerated() where p.revents != 0 {
                switch roles[i] {
                case 0:
                    exited = true
                    if let feed = stdinFeed {
                        closer.close(feed.fd)
                        stdinFeed = nil
                    }
                case 1, 2, 3:
                    let n = buffer.withUnsafeMutableBytes { read(p.fd, $0.baseAddress, $0.count) }
                    if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                    if n <= 0 {
                        closer.close(p.fd)
                        if roles[i] == 1 { reportFD = nil } else if roles[i] == 2 { stdoutFD = nil } else { stderrFD = nil }
                        continue
                    }
                    switch roles[i] {
                    case 1: reportBytes.append(contentsOf: buffer[0..<n])
                    case 2: stdout.add(buffer[0..<n])
                    default: stderr.add(buffer[0..<n])
                    }
                case 4:
                    guard let feed = stdinFeed else { continue }
                    let n = feed.bytes.withUnsafeBytes {
                        write(feed.fd, $0.baseAddress! + stdinOffset, $0.count - stdinOffset)
                    }
                    if n > 0 { stdinOffset += n }
                    if (n < 0 && errno != EAGAIN && errno != EINTR) || stdinOffset >= feed.bytes.count {
                        closer.close(feed.fd)
                        stdinFeed = nil
                    }
                case 5:
                    cancelled = true
                    stop()
                default: break
                }
            }
        }
    }
}

/// CLOCK_MONOTONIC in seconds.
enum Clock {
    static var monotonic: Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
