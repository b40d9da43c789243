import CSandbox
import Glibc

/// Ordinary host programs (tar, cp, debootstrap) run with posix_spawn. Blocking: call from a
/// dedicated thread or synchronous code, never from the cooperative pool's hot path.
public enum ChildProcess {
    public struct Output: Sendable {
        public var status: Int32
        public var stdout: [UInt8]
        public var stderr: [UInt8]
        public var succeeded: Bool { status == 0 }
        public var stderrText: String { String(decoding: stderr, as: UTF8.self) }
    }

    /// Runs `argv` to completion, capturing stdout and stderr (stderr lines also go to
    /// `onLine`, as do stdout lines, when it is given).
    /// - Parameter stdinFD: the child's stdin (default /dev/null).
    public static func run(
        _ argv: [String], environment: [String]? = nil, stdinFD: Int32? = nil,
        onLine: ((String) -> Void)? = nil
    ) throws -> Output {
        let spawned = try spawn(argv, environment: environment, stdinFD: stdinFD, captureStdout: true)
        var out: [UInt8] = []
        var err: [UInt8] = []
        var pending: [Bool: [UInt8]] = [:]
        try drain(spawned) { isStderr, chunk in
            if isStderr { err.append(contentsOf: chunk) } else { out.append(contentsOf: chunk) }
            guard let onLine else { return }
            var line = pending[isStderr, default: []] + chunk
            while let newline = line.firstIndex(of: UInt8(ascii: "\n")) {
                onLine(String(decoding: line[..<newline], as: UTF8.self))
                line.removeSubrange(...newline)
            }
            pending[isStderr] = line
        }
        return Output(status: try wait(spawned.pid, argv[0]), stdout: out, stderr: err)
    }

    /// Reads a started child's captured stdout and stderr until both end, handing each chunk
    /// to `onChunk` (true: stderr) as it comes, and calling `tick` at least every `interval`
    /// seconds meanwhile (a caller's own deadlines). Closes the streams; the caller waits.
    public static func drain(
        _ spawned: Spawned, every interval: Double? = nil, tick: () -> Void = {},
        onChunk: (_ isStderr: Bool, _ chunk: ArraySlice<UInt8>) -> Void
    ) throws {
        var fds = [spawned.stdout ?? -1, spawned.stderr]
        defer { for fd in fds where fd >= 0 { close(fd) } }
        var buffer = [UInt8](repeating: 0, count: 65536)
        let timeout = interval.map { Int32(($0 * 1000).rounded(.up)) } ?? -1
        while fds.contains(where: { $0 >= 0 }) {
            tick()
            var polls = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let rc = poll(&polls, nfds_t(polls.count), timeout)
            if rc < 0 && errno == EINTR { continue }
            guard rc >= 0 else { throw SandboxError.system("poll(child \(spawned.pid))") }
            for i in polls.indices where polls[i].fd >= 0 && polls[i].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(polls[i].fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 {
                    close(fds[i])
                    fds[i] = -1
                    continue
                }
                onChunk(i == 1, buffer[0..<n])
            }
        }
    }

    /// A started child: its pid and the read ends of its captured streams (the caller closes
    /// them and waits).
    public struct Spawned: Sendable {
        public var pid: pid_t
        public var stdout: Int32?
        public var stderr: Int32
    }

    /// Starts `argv` with stdout (when `captureStdout`) and stderr on pipes.
    /// - Parameter stdoutFD: where stdout goes when it is not captured.
    /// - Parameter ownProcessGroup: start it in a process group of its own, so that a signal a
    ///   terminal sends to this process's group (Ctrl-C) does not reach it.
    /// - Parameter directory: its working directory (this process's when nil).
    public static func spawn(
        _ argv: [String], environment: [String]? = nil, stdinFD: Int32? = nil, captureStdout: Bool,
        stdoutFD: Int32? = nil, ownProcessGroup: Bool = false, directory: String? = nil
    ) throws -> Spawned {
        var outPipe: [Int32] = [-1, -1]
        var errPipe: [Int32] = [-1, -1]
        guard csb_pipe_cloexec(&errPipe) == 0 else { throw SandboxError.system("pipe2") }
        if captureStdout {
            guard csb_pipe_cloexec(&outPipe) == 0 else {
                close(errPipe[0])
                close(errPipe[1])
                throw SandboxError.system("pipe2")
            }
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let stdinFD {
            posix_spawn_file_actions_adddup2(&actions, stdinFD, 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        if captureStdout {
            posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        } else if let stdoutFD {
            posix_spawn_file_actions_adddup2(&actions, stdoutFD, 1)
        }
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        if let directory { _ = csb_spawn_add_chdir(&actions, directory) }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var defaults = sigset_t()
        sigfillset(&defaults)
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setsigmask(&attributes, &none)
        var flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK
        if ownProcessGroup {
            posix_spawnattr_setpgroup(&attributes, 0)
            flags |= POSIX_SPAWN_SETPGROUP
        }
        posix_spawnattr_setflags(&attributes, Int16(flags))

        let env = environment ?? hostEnvironment()
        var pid = pid_t()
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = env.map { strdup($0) } + [nil]
        defer {
            cArgs.forEach { free($0) }
            cEnv.forEach { free($0) }
        }
        let rc = posix_spawnp(&pid, argv[0], &actions, &attributes, cArgs, cEnv)
        close(errPipe[1])
        if captureStdout { close(outPipe[1]) }
        guard rc == 0 else {
            close(errPipe[0])
            if captureStdout { close(outPipe[0]) }
            throw SandboxError(
                .childProcess,
                "cannot start \(argv[0]); is it installed? (`scripts/setup` installs what the project needs)",
                errno: rc)
        }
        return Spawned(pid: pid, stdout: captureStdout ? outPipe[0] : nil, stderr: errPipe[0])
    }

    /// A process's start time in clock ticks since boot (`/proc/PID/stat` field 22); nil when it
    /// is gone or a zombie. With the pid, it names a process: a pid the kernel handed on is not
    /// the same process.
    public static func startTicks(of pid: pid_t) -> UInt64? {
        guard pid > 0, let bytes = try? FileSystem.readFile("/proc/\(pid)/stat") else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // fields[0] is the state (field 3); the start time is field 22.
        guard fields.count > 19, fields[0] != "Z" else { return nil }
        return UInt64(fields[19])
    }

    /// Waits for a child; returns its exit status (128+N when killed by signal N).
    public static func wait(_ pid: pid_t, _ name: String) throws -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            guard errno == EINTR else { throw SandboxError.system("waitpid(\(name))") }
        }
        if status & 0x7f == 0 { return (status >> 8) & 0xff }
        return 128 + (status & 0x7f)
    }

    /// The absolute path of `name` as the host's PATH finds it (an executable file), or nil.
    public static func lookup(_ name: String) -> String? {
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
        for directory in path.split(separator: ":") where directory.hasPrefix("/") {
            let candidate = directory + "/" + name
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    public static func hostEnvironment() -> [String] {
        var result: [String] = []
        var p = environ
        while let entry = p.pointee {
            result.append(String(cString: entry))
            p += 1
        }
        return result
    }
}
