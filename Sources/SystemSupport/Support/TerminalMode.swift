import CSandbox

/// Raw mode for the caller's terminal around an interactive session.
public struct TerminalMode: Sendable {
    private let fd: Int32
    private let saved: [UInt8]

    /// Puts `fd` in raw mode; nil when it is not a terminal.
    public static func makeRaw(_ fd: Int32) -> TerminalMode? {
        var saved = [UInt8](repeating: 0, count: 256)
        guard csb_terminal_raw(fd, &saved, saved.count) == 0 else { return nil }
        return TerminalMode(fd: fd, saved: saved)
    }

    /// Puts the terminal back as it was.
    public func restore() {
        _ = saved.withUnsafeBytes { csb_terminal_restore(fd, $0.baseAddress) }
    }
}
