import Glibc

extension FileSystem {
    /// Runs `body` holding an `flock` on `path` (created with `mode` if needed): exclusive, or
    /// shared. Waiting for it lends the caller's place in its `BlockingPool` (the holder may
    /// need the pool to finish: a base image built inside a run's preparation).
    public static func withLock<T>(
        _ path: String, exclusive: Bool = true, mode: mode_t = 0o600, _ body: () throws -> T
    ) throws -> T {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, mode)
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        defer { close(fd) }
        try BlockingPool.whileBlocked {
            while flock(fd, exclusive ? LOCK_EX : LOCK_SH) != 0 {
                guard errno == EINTR else { throw SandboxError.system("flock(\(path))") }
            }
        }
        return try body()
    }
}
