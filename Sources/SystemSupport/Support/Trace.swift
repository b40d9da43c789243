import Glibc

/// Phase timings on stderr when CONTREE_TRACE is set: where a run's milliseconds go.
public enum Trace {
    package static let enabled = getenv("CONTREE_TRACE") != nil
    nonisolated(unsafe) static var start = Monotonic.now

    public static func mark(_ phase: @autoclosure () -> String, at time: Double? = nil) {
        guard enabled else { return }
        let line = "[trace] \(milliseconds(((time ?? Monotonic.now) - start) * 1000)) ms  \(phase())\n"
        _ = line.withCString { write(2, $0, strlen($0)) }
    }

    private static func milliseconds(_ value: Double) -> Swift.String {
        let tenths = Int((value * 10).rounded())
        return "\(tenths / 10).\(tenths % 10)"
    }
}
