import Synchronization

/// Cancels blocking work that runs on a thread of its own (an image import): the work checks
/// it at safe points and registers what would stop a blocked call (a download in flight).
/// Cancelled work undoes what it did and throws `cancelled` with the reason.
public final class Cancellation: Sendable {
    private struct State {
        var reason: String?
        var handlers: [Int: @Sendable () -> Void] = [:]
        var next = 0
    }
    private let state = Mutex(State())

    public init() {}

    /// Cancels (the first reason stays) and runs the registered handlers once.
    public func cancel(_ reason: String) {
        let handlers = state.withLock { state -> [@Sendable () -> Void] in
            guard state.reason == nil else { return [] }
            state.reason = reason
            defer { state.handlers = [:] }
            return Array(state.handlers.values)
        }
        for handler in handlers { handler() }
    }

    public var reason: String? { state.withLock { $0.reason } }

    /// - Throws: `cancelled` with the reason, once cancelled.
    public func check() throws {
        if let reason { throw SandboxError(.cancelled, reason) }
    }

    /// Runs `body` for as long as `work` runs, or at once when already cancelled.
    public func whileRunning<T>(onCancel body: @escaping @Sendable () -> Void, _ work: () throws -> T) rethrows -> T {
        let id = state.withLock { state -> Int? in
            guard state.reason == nil else { return nil }
            state.next += 1
            state.handlers[state.next] = body
            return state.next
        }
        if id == nil { body() }
        defer { if let id { _ = state.withLock { $0.handlers.removeValue(forKey: id) } } }
        return try work()
    }
}
