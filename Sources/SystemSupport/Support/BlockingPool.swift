import Glibc

/// Threads for blocking work (waiting on a child, polling pipes, hashing and copying files), so
/// that the cooperative thread pool (two threads on this machine kind) never blocks.
///
/// Threads are reused (an idle one waits `idleSeconds`, 10 s by default, for more work before it
/// ends) and bounded: at most `limit` jobs run at once; more wait in order. Work that blocks until
/// other work of the same pool has run (a base image built inside the preparation of a run) says
/// so with `whileBlocked`, which lends its place to the queue until it returns: nesting never
/// deadlocks.
public final class BlockingPool: @unchecked Sendable {
    /// Supervision and preparation of sandboxes, imports, the server's file work. Large: a
    /// running sandbox holds a thread for its lifetime, and a bound reached would queue runs.
    public static let shared = BlockingPool(limit: 256)
    /// Disk-bound leaf work (hashing a step's inputs, copying artifacts): a few at a time, so
    /// that a wide fan-out does not thrash the disk. Jobs here never wait on other pool work.
    public static let files = BlockingPool(limit: max(2, 2 * Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))

    private struct Job {
        /// Runs the work and returns how to hand its result back, which the thread does once
        /// it is free again: the caller's next job then finds it idle instead of starting one.
        let body: () -> () -> Void
        /// Called instead of `body` if no thread can be started for it.
        let fail: (any Error) -> Void
    }

    /// A thread of the pool: while idle it waits on `wake` for a job handed to it.
    private final class Worker {
        let wake = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
        var job: Job?

        init(job: Job?) {
            self.job = job
            var attributes = pthread_condattr_t()
            pthread_condattr_init(&attributes)
            pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
            pthread_cond_init(wake, &attributes)
            pthread_condattr_destroy(&attributes)
        }

        deinit {
            pthread_cond_destroy(wake)
            wake.deallocate()
        }
    }

    // All guarded by `mutex`. `running` counts jobs handed to a thread and not yet finished.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private var queue: [Job] = []
    private var idle: [Worker] = []
    private var running = 0
    private var lent = 0
    private var started = 0
    public let limit: Int
    /// How long an idle thread waits for another job before it ends.
    let idleSeconds: Int

    public init(limit: Int, idleSeconds: Int = 10) {
        precondition(limit > 0 && idleSeconds > 0)
        self.limit = limit
        self.idleSeconds = idleSeconds
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` on a thread of the pool and returns its result.
    public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, Error>) in
            submit(
                Job(
                    body: {
                        let result = Result { try body() }
                        return { continuation.resume(with: result) }
                    }, fail: { continuation.resume(throwing: $0) }))
        }
    }

    /// Runs `body`, which blocks until other work of the current thread's pool has run, with
    /// its place lent to the queue. Outside a pool thread it just runs `body`.
    public static func whileBlocked<T>(_ body: () throws -> T) rethrows -> T {
        guard let raw = pthread_getspecific(currentKey) else { return try body() }
        let pool = Unmanaged<BlockingPool>.fromOpaque(raw).takeUnretainedValue()
        pool.locked {
            pool.lent += 1
            pool.dispatchLocked()
        }
        defer { pool.locked { pool.lent -= 1 } }
        return try body()
    }

    private var capacity: Int { limit + lent }

    /// Threads this pool has started since it was made.
    package var threadsStarted: Int { locked { started } }

    private func locked<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    private func submit(_ job: Job) {
        locked {
            queue.append(job)
            dispatchLocked()
        }
    }

    /// Hands queued jobs to idle threads, or to new ones, while there is room.
    /// A job no thread can be started for waits for a running one to finish, or fails if
    /// none runs.
    private func dispatchLocked() {
        while !queue.isEmpty, running < capacity {
            let job = queue.removeFirst()
            if let worker = idle.popLast() {
                worker.job = job
                pthread_cond_signal(worker.wake)
            } else {
                do { try startThread(Worker(job: job)) } catch {
                    if running > 0 {
                        queue.insert(job, at: 0)
                    } else {
                        job.fail(error)
                    }
                    return
                }
            }
            running += 1
        }
    }

    private func startThread(_ worker: Worker) throws {
        let context = Unmanaged.passRetained(Start(pool: self, worker: worker)).toOpaque()
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
                let start = Unmanaged<Start>.fromOpaque(raw!).takeRetainedValue()
                pthread_setspecific(BlockingPool.currentKey, Unmanaged.passUnretained(start.pool).toOpaque())
                start.pool.work(start.worker)
                return nil
            }, context)
        pthread_attr_destroy(&attributes)
        if rc == 0 { started += 1 }
        if rc != 0 {
            Unmanaged<Start>.fromOpaque(context).release()
            throw SandboxError.system("pthread_create", rc)
        }
    }

    private final class Start {
        let pool: BlockingPool
        let worker: Worker
        init(pool: BlockingPool, worker: Worker) {
            self.pool = pool
            self.worker = worker
        }
    }

    /// A thread's life: run the job it was handed, then the queue's while there is room;
    /// idle, wait up to `idleSeconds` to be handed another, then end. A job's result goes back
    /// only once the thread counts as free (idle or on its next job).
    private func work(_ worker: Worker) {
        pthread_mutex_lock(mutex)
        var next = worker.job
        worker.job = nil
        pthread_mutex_unlock(mutex)
        while next != nil {
            next = perform(&next, worker)
            if next == nil { next = waitForJob(worker) }
        }
    }

    /// Runs the job in `slot` (emptying it) and hands its result back. Returns the queue's next
    /// job for this thread, or nil once the thread counts as idle. What the job captured and
    /// returned is released when this returns, before the thread waits: an idle thread held a
    /// finished job's result for up to 10 s (a test's registry outlived its test, and the
    /// process that ended meanwhile).
    private func perform(_ slot: inout Job?, _ worker: Worker) -> Job? {
        guard let job = slot else { return nil }
        slot = nil
        let finish = job.body()
        pthread_mutex_lock(mutex)
        running -= 1
        if !queue.isEmpty, running < capacity {
            let following = queue.removeFirst()
            running += 1
            pthread_mutex_unlock(mutex)
            finish()
            return following
        }
        idle.append(worker)
        pthread_mutex_unlock(mutex)
        finish()
        return nil
    }

    /// Waits, idle, up to `idleSeconds` for a job handed to this thread; nil when none came (the
    /// thread then ends).
    private func waitForJob(_ worker: Worker) -> Job? {
        pthread_mutex_lock(mutex)
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        deadline.tv_sec += idleSeconds
        while worker.job == nil {
            if pthread_cond_timedwait(worker.wake, mutex, &deadline) == ETIMEDOUT { break }
        }
        let next = worker.job
        worker.job = nil
        if next == nil { idle.removeAll { $0 === worker } }
        pthread_mutex_unlock(mutex)
        return next
    }

    /// The pool of the calling thread, if it is a pool thread.
    private static let currentKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()
}
