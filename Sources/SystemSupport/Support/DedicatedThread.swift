import Glibc

/// Runs blocking work (waiting on a child, polling pipes) on a thread of its own, so that the
/// cooperative thread pool (two threads on this machine kind) never blocks.
public enum DedicatedThread {
    private final class Box: @unchecked Sendable {
        // Written once by the thread before it resumes the continuation; never shared after.
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    /// Runs `body` on a new pthread and returns its result.
    public static func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, Error>) in
            let box = Box {
                do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: error) }
            }
            let context = Unmanaged.passRetained(box).toOpaque()
            var attributes = pthread_attr_t()
            pthread_attr_init(&attributes)
            // Tree walks recurse once per directory level: 16 MiB (reserved, not committed) covers
            // the deepest tree a path within PATH_MAX can name, in a debug build too.
            pthread_attr_setstacksize(&attributes, 16 << 20)
            pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
            var thread = pthread_t()
            let rc = pthread_create(
                &thread, &attributes,
                { raw in
                    let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
                    box.body()
                    return nil
                }, context)
            pthread_attr_destroy(&attributes)
            if rc != 0 {
                Unmanaged<Box>.fromOpaque(context).release()
                continuation.resume(throwing: SandboxError.system("pthread_create", rc))
            }
        }
    }
}
