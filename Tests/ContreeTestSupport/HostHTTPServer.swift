import Glibc
import SystemSupport

/// `python3 -m http.server` serving a directory on the host's loopback (a free port), for
/// egress tests and the benchmark: what a sandbox reaches through `$CONTREE_HOST`. Stopped
/// (killed and reaped) by `stop()` or when released.
public final class HostHTTPServer: @unchecked Sendable {
    public let port: Int
    private let pid: pid_t
    private let output: Int32
    private var stopped = false

    /// - Throws: when python3 cannot start or does not listen within 10 s.
    public init(serving directory: String) throws {
        // Port 0 picks a free one; the server names it on its first line of output.
        // Its request log (stderr) goes nowhere; stdout stays open until it ends.
        let child = try ChildProcess.spawn(
            [
                "sh", "-c", "exec python3 -u -m http.server --bind 127.0.0.1 --directory \"$0\" 0 2>/dev/null",
                directory,
            ],
            captureStdout: true)
        pid = child.pid
        output = child.stdout!
        close(child.stderr)
        var seen: [UInt8] = []
        var found: Int?
        let deadline = Monotonic.now + 10
        while found == nil && Monotonic.now < deadline {
            var poller = pollfd(fd: child.stdout!, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 200) >= 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 256)
            let n = poller.revents != 0 ? read(child.stdout!, &chunk, chunk.count) : 0
            if n < 0 || (n == 0 && poller.revents != 0) { break }
            seen += chunk[0..<n]
            // "Serving HTTP on 127.0.0.1 port 41237 (http://127.0.0.1:41237/) ..."
            let text = String(decoding: seen, as: UTF8.self)
            if let range = text.range(of: " port ") {
                found = Int(text[range.upperBound...].prefix { $0.isNumber })
            }
        }
        guard let found else {
            kill(pid, SIGKILL)
            _ = try? ChildProcess.wait(pid, "python3")
            close(output)
            throw LoopbackHTTP.Failure("python3 -m http.server did not start: \(String(decoding: seen, as: UTF8.self))")
        }
        port = found
    }

    public func stop() {
        guard !stopped else { return }
        stopped = true
        kill(pid, SIGKILL)
        _ = try? ChildProcess.wait(pid, "python3")
        close(output)
    }

    deinit { stop() }
}

/// The processes whose parent is `pid`, with their command names (/proc/PID/comm).
public func childProcesses(of pid: pid_t) -> [(pid: pid_t, name: String)] {
    let entries = (try? FileSystem.list("/proc")) ?? []
    return entries.compactMap { entry -> (pid: pid_t, name: String)? in
        guard let child = pid_t(entry),
            let stat = try? FileSystem.readFile("/proc/\(entry)/stat")
        else { return nil }
        // "PID (comm) STATE PPID ...": comm may hold spaces and parentheses; the last ')' ends it.
        let text = String(decoding: stat, as: UTF8.self)
        guard let open = text.firstIndex(of: "("), let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 1, pid_t(fields[1]) == pid else { return nil }
        return (child, String(text[text.index(after: open)..<close]))
    }
}

/// Whether a process with this pid exists and is not a zombie.
public func isAlive(_ pid: pid_t) -> Bool {
    guard let stat = try? FileSystem.readFile("/proc/\(pid)/stat") else { return false }
    let text = String(decoding: stat, as: UTF8.self)
    guard let close = text.lastIndex(of: ")") else { return false }
    return !text[text.index(after: close)...].hasPrefix(" Z")
}
