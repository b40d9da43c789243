import Glibc

/// Reports the progress of long work: a rewritten status line on a terminal, plain
/// timestamped lines otherwise.
public final class ProgressReporter: Sendable {
    private let fd: Int32
    private let isTerminal: Bool

    public init(fd: Int32 = 2) {
        self.fd = fd
        self.isTerminal = isatty(fd) == 1
    }

    /// Reports one step of `task`, `elapsed` seconds in.
    public func report(_ task: String, _ message: String, elapsed: Double) {
        let text: String
        if isTerminal {
            let line = "[\(task) \(Int(elapsed))s] \(message)"
            text = "\r\u{1B}[2K" + String(line.prefix(max(20, terminalWidth - 1)))
        } else {
            text = "\(Self.timestamp()) [\(task)] \(message)\n"
        }
        _ = text.withCString { write(fd, $0, strlen($0)) }
    }

    /// Ends a task's progress with a final line.
    public func finish(_ task: String, _ message: String) {
        let text = (isTerminal ? "\r\u{1B}[2K" : "\(Self.timestamp()) ") + "[\(task)] \(message)\n"
        _ = text.withCString { write(fd, $0, strlen($0)) }
    }

    private var terminalWidth: Int {
        var size = winsize()
        return ioctl(fd, UInt(TIOCGWINSZ), &size) == 0 && size.ws_col > 0 ? Int(size.ws_col) : 100
    }

    static func timestamp() -> String {
        var t = time(nil)
        var parts = tm()
        gmtime_r(&t, &parts)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return
            "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))Z"
    }
}
