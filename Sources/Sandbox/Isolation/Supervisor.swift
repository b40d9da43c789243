import CSandbox
import Glibc
import SystemSupport

/// Captured output of one stream, or output relayed to a host descriptor.
struct Capture {
    var kept: [UInt8] = []
    var dropped = 0
    let limit: Int
    let onChunk: (@Sendable ([UInt8]) -> Void)?
    /// Where a relayed stream goes (the caller's stdout, a log file).
    let relay: Int32?

    init(_ sink: OutputSink) {
        switch sink {
        case .capture(let limit, let onChunk): (self.limit, self.onChunk, relay) = (limit, onChunk, nil)
        case .fileDescriptor(let fd): (limit, onChunk, relay) = (0, nil, fd)
        case .discard: (limit, onChunk, relay) = (0, nil, nil)
        }
    }

    mutating func add(_ chunk: ArraySlice<UInt8>) {
        if let relay {
            // A reader that went away (a closed pipe) stops the relay, not the run.
            _ = chunk.withUnsafeBytes { try? FileSystem.writeAll(fd: relay, $0, path: "the command's output") }
            return
        }
        let room = max(0, limit - kept.count)
        kept.append(contentsOf: chunk.prefix(room))
        dropped += max(0, chunk.count - room)
        onChunk?(Array(chunk))
    }
}

/// Polls the sandbox: its exit, its report, its output, its stdin, the timeout, cancellation.
struct Supervisor {
    let pidfd: Int32
    var reportFD: Int32?
    let cancelFD: Int32
    var stdoutFD: Int32?
    var stderrFD: Int32?
    var stdinFeed: (fd: Int32, bytes: [UInt8])?
    /// Seconds from the start after which the command is killed, if any.
    let timeout: Double?
    let closer: ContainerLaunch.Closer

    var stdout: Capture
    var stderr: Capture
    var reportBytes: [UInt8] = []
    var timedOut = false
    var cancelled = false
    var exited = false
    var stdinOffset = 0
    /// Measures the run's upper now and then when the run has a layer limit.
    var upperWatch: UpperWatch?
    /// The pty's primary side and the caller's terminal, relayed both ways.
    var terminalPrimary: Int32?
    var terminalInput: Int32?
    let terminalOutput: Int32?

    init(
        pidfd: Int32, reportFD: Int32, cancelFD: Int32, stdoutFD: Int32?, stderrFD: Int32?,
        stdinFeed: (fd: Int32, bytes: [UInt8])?, stdout: OutputSink, stderr: OutputSink, timeout: Double?,
        upperWatch: UpperWatch? = nil, closer: ContainerLaunch.Closer,
        terminal: (primary: Int32, session: TerminalSession)? = nil
    ) {
        self.terminalPrimary = terminal?.primary
        self.terminalInput = terminal?.session.inputFD
        self.terminalOutput = terminal?.session.outputFD
        self.pidfd = pidfd
        self.reportFD = reportFD
        self.cancelFD = cancelFD
        self.stdoutFD = stdoutFD
        self.stderrFD = stderrFD
        self.stdinFeed = stdinFeed
        self.timeout = timeout
        self.upperWatch = upperWatch
        self.closer = closer
        self.stdout = Capture(stdout)
        self.stderr = Capture(stderr)
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

    /// A wait status as an exit code or a signal.
    static func decode(status: Int32) -> (exitCode: Int32?, signal: Int32?) {
        status & 0x7f == 0 ? ((status >> 8) & 0xff, nil) : (nil, status & 0x7f)
    }

    var setupFailure: csb_report? { reports.first { $0.kind == Int32(CSB_REPORT_SETUP_FAILED) } }
    var exitReport: csb_report? { reports.first { $0.kind == Int32(CSB_REPORT_EXITED) } }

    mutating func loop(started: Double) throws {
        let deadline = timeout.map { started + $0 }
        var buffer = [UInt8](repeating: 0, count: 65536)
        var killed = false
        var forceKillAt: Double?
        /// Pid 1 kills and reaps the tree itself (keeping its rusage); SIGKILL if it lingers.
        func stop() {
            killed = true
            _ = csb_pidfd_kill(pidfd, CSB_SIGNAL_STOP)
            forceKillAt = Monotonic.now + 2
        }
        while true {
            if exited && stdoutFD == nil && stderrFD == nil && reportFD == nil && terminalPrimary == nil { return }
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
            add(terminalPrimary, POLLIN, 6)
            if !exited { add(terminalInput, POLLIN, 7) }
            var timeoutMs: Int32 = -1
            let wake = [forceKillAt ?? (killed ? nil : deadline), killed ? nil : upperWatch?.nextCheck].compactMap {
                $0
            }
            if let next = wake.min(), !exited {
                timeoutMs = Int32(max(0, min(Double(Int32.max), (next - Monotonic.now) * 1000).rounded(.up)))
            }
            let rc = poll(&polls, nfds_t(polls.count), timeoutMs)
            if rc < 0 {
                if errno == EINTR { continue }
                throw SandboxError.system("poll(sandbox)")
            }
            if rc == 0 {
                if !killed, !exited, var watch = upperWatch, Monotonic.now >= watch.nextCheck {
                    watch.check()
                    upperWatch = watch
                    if watch.exceeded { stop() }
                    continue
                }
                if let forceAt = forceKillAt, Monotonic.now >= forceAt {
                    _ = csb_pidfd_kill(pidfd, SIGKILL)  // pid 1 did not stop in time
                    forceKillAt = nil
                } else if let deadline, !killed, Monotonic.now >= deadline {
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
                        if roles[i] == 1 {
                            reportFD = nil
                        } else if roles[i] == 2 {
                            stdoutFD = nil
                        } else {
                            stderrFD = nil
                        }
                        continue
                    }
                    switch roles[i] {
                    case 1:
                        // Pid 1 writes at most a setup failure and an exit report.
                        let room = max(0, 4 * MemoryLayout<csb_report>.size - reportBytes.count)
                        reportBytes.append(contentsOf: buffer[0..<min(n, room)])
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
                case 6:
                    // The session's output; EIO once every process holding the pty is gone.
                    let n = buffer.withUnsafeMutableBytes { read(p.fd, $0.baseAddress, $0.count) }
                    if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                    if n <= 0 {
                        closer.close(p.fd)
                        terminalPrimary = nil
                        continue
                    }
                    if let out = terminalOutput {
                        _ = buffer.withUnsafeBytes {
                            try? FileSystem.writeAll(
                                fd: out, UnsafeRawBufferPointer(rebasing: $0[0..<n]), path: "terminal")
                        }
                    }
                case 7:
                    // Keystrokes to the session.
                    let n = buffer.withUnsafeMutableBytes { read(p.fd, $0.baseAddress, $0.count) }
                    if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                    if n <= 0 {
                        terminalInput = nil  // the caller's input ended: send end-of-file
                        if let primary = terminalPrimary {
                            var eof: UInt8 = 4
                            _ = write(primary, &eof, 1)
                        }
                        continue
                    }
                    if let primary = terminalPrimary {
                        _ = buffer.withUnsafeBytes {
                            try? FileSystem.writeAll(
                                fd: primary, UnsafeRawBufferPointer(rebasing: $0[0..<n]), path: "terminal")
                        }
                    }
                default: break
                }
            }
        }
    }
}

/// Keeps a run's change under its layer limit while the run goes: the upper's allocated bytes
/// are summed now and then (no file system quota needs to be configured on the host), and the
/// run is stopped once they pass the limit. A measure costs a walk of the upper, so the next
/// one waits at least twenty times as long as this one took (at most 5% of a core).
struct UpperWatch {
    let path: String
    let limit: Int64
    var nextCheck = Monotonic.now + 1
    var exceeded = false

    init(path: String, limit: Int64) {
        self.path = path
        self.limit = limit
    }

    mutating func check() {
        let started = Monotonic.now
        var total: Int64 = 0
        // The upper changes while it is walked: a sample that trips over that is skipped.
        try? TreeWalker.walk(try DirectoryHandle(path: path)) { entry in
            total += Int64(entry.status.st_blocks) * 512
            return entry.status.isDirectory && total <= limit
        }
        exceeded = total > limit
        nextCheck = Monotonic.now + max(1, 20 * (Monotonic.now - started))
    }
}
