import Glibc

/// CLOCK_MONOTONIC in seconds.
enum Clock {
    static var monotonic: Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
