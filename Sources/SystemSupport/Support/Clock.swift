import Glibc

/// CLOCK_MONOTONIC in seconds.
package enum Monotonic {
    package static var now: Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// Wall-clock times as UTC text, with the C library alone: Foundation's `DateFormatter` and
/// `ISO8601DateFormatter` open an ICU formatter each (about 1 ms, and most of a cached run's
/// time when made per event).
package enum UTCTime {
    /// `2026-12-05T04:12:44Z` (RFC 3339, whole seconds).
    package static func iso8601(secondsSince1970 seconds: Double) -> String {
        format(seconds, "%Y-%m-%dT%H:%M:%SZ")
    }

    /// `20261205-041244`: sortable, for names.
    package static func compact(secondsSince1970 seconds: Double) -> String {
        format(seconds, "%Y%m%d-%H%M%S")
    }

    /// Now, in seconds since 1970.
    package static var now: Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    private static func format(_ seconds: Double, _ pattern: String) -> String {
        var time = time_t(seconds.rounded(.down))
        var parts = tm()
        gmtime_r(&time, &parts)
        var buffer = [CChar](repeating: 0, count: 32)
        let n = strftime(&buffer, buffer.count, pattern, &parts)
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
