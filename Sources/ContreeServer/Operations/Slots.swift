import Synchronization

/// A counting semaphore per namespace: at most `limit` holders; the others wait in order.
/// Waiting is cancellable.
final class Slots: Sendable {
    private struct Waiter {
        let id: UInt64
        let continuation: CheckedContinuation<Void, any Error>
    }
    private struct State {
        var held: [String: Int] = [:]
        var waiting: [String: [Waiter]] = [:]
        var nextID: UInt64 = 0
        /// Waiters cancelled before they were queued.
        var cancelled: Set<UInt64> = []
    }
    private let state = Mutex(State())

    /// Waits for a slot of `namespace`.
    /// - Throws: `CancellationError` when the task is cancelled while waiting.
    func acquire(_ namespace: String, limit: Int) async throws {
        let id = state.withLock { s -> UInt64 in
            s.nextID += 1
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let granted = state.withLock { s -> Bool? in
                    if s.cancelled.remove(id) != nil { return nil }
                    if s.held[namespace, default: 0] < limit && (s.waiting[namespace] ?? []).isEmpty {
                        s.held[namespace, default: 0] += 1
                        return true
                    }
                    s.waiting[namespace, default: []].append(Waiter(id: id, continuation: continuation))
                    return false
                }
                switch granted {
                case .none: continuation.resume(throwing: CancellationError())
                case .some(true): continuation.resume()
                case .some(false): break
                }
            }
        } onCancel: {
            let waiter = state.withLock { s -> Waiter? in
                guard let index = s.waiting[namespace]?.firstIndex(where: { $0.id == id }) else {
                    s.cancelled.insert(id)
                    return nil
                }
                return s.waiting[namespace]?.remove(at: index)
            }
            waiter?.continuation.resume(throwing: CancellationError())
        }
    }

    /// Gives a slot back, handing it to the first waiter.
    func release(_ namespace: String) {
        let next = state.withLock { s -> Waiter? in
            if var queue = s.waiting[namespace], !queue.isEmpty {
                let first = queue.removeFirst()
                s.waiting[namespace] = queue
                return first  // the slot passes on; `held` stays
            }
            s.held[namespace, default: 1] -= 1
            return nil
        }
        next?.continuation.resume()
    }

    func held(_ namespace: String) -> Int { state.withLock { $0.held[namespace, default: 0] } }
}

/// Counts the event streams each namespace holds open: one token cannot hold the server's
/// connections and threads with streams it never reads. A token allowed more instances at once
/// than `perNamespace` may follow as many streams as it may run instances (a client follows
/// each of its runs).
final class StreamSlots: Sendable {
    let perNamespace: Int
    private let open = Mutex<[String: Int]>([:])

    init(perNamespace: Int) {
        self.perNamespace = perNamespace
    }

    /// One stream of a namespace, released by `close` (once).
    final class Slot: Sendable {
        private let release: Mutex<(@Sendable () -> Void)?>
        init(_ release: @escaping @Sendable () -> Void) { self.release = Mutex(release) }
        func close() { release.withLock { $0.take() }?() }
        deinit { close() }
    }

    /// - Throws: 429 when the namespace already holds `max(perNamespace, concurrency)` streams.
    func open(_ namespace: String, concurrency: Int = 0) throws -> Slot {
        let limit = max(perNamespace, concurrency)
        try open.withLock { counts in
            guard counts[namespace, default: 0] < limit else {
                throw APIError(
                    .tooManyRequests,
                    "this token already holds \(limit) open event streams; close one (or read it to its end) first",
                    retryAfter: 1)
            }
            counts[namespace, default: 0] += 1
        }
        return Slot { [weak self] in
            self?.open.withLock { counts in
                counts[namespace, default: 1] -= 1
                if counts[namespace] == 0 { counts[namespace] = nil }
            }
        }
    }
}
