import FoundationEssentials
import Glibc
import Sandbox
import Synchronization

/// The event log of one operation: every event is stored in the database as it happens and
/// handed to the streams following it live.
final class LiveOperation: Sendable {
    let uuid: String
    let namespace: String
    let control: RunControl
    private let database: Database

    private struct State {
        var nextID: Int64 = 0
        var subscribers: [UInt64: (spid: Int?, continuation: AsyncStream<String>.Continuation)] = [:]
        var nextSubscriber: UInt64 = 0
        var finished = false
        var task: Task<Void, Never>?
        /// The write end of the main process's stdin pipe while it is open.
        var stdin: Int32?
        /// Bytes streamed as events so far, and dropped past the cap: stdout, stderr.
        var emitted = [0, 0]
        var dropped = [0, 0]
        var running = false
    }
    private let state: Mutex<State>

    init(uuid: String, namespace: String, database: Database, control: RunControl, firstEventID: Int64 = 0) {
        self.uuid = uuid
        self.namespace = namespace
        self.database = database
        self.control = control
        var initial = State()
        initial.nextID = firstEventID
        state = Mutex(initial)
    }

    func setTask(_ task: Task<Void, Never>) { state.withLock { $0.task = task } }
    func cancel() { state.withLock { $0.task }?.cancel() }

    var isRunning: Bool { state.withLock { $0.running } }
    func setRunning(_ running: Bool) { state.withLock { $0.running = running } }

    /// Records an event and passes it to the live streams.
    func emit(_ type: String, spid: Int, _ data: JSON) {
        state.withLock { s in
            let id = s.nextID
            s.nextID += 1
            let body = JSON.object([
                ("id", .int(id)), ("ts", .string(Timestamp.iso(Timestamp.now))), ("spid", .int(spid)),
                ("type", .string(type)), ("data", data),
            ]).serialized()
            _ = try? database.query(
                "INSERT INTO api_events(operation, id, spid, body) VALUES(?, ?, ?, ?)",
                [.text(uuid), .integer(id), .integer(Int64(spid)), .text(body)])
            let frame = LiveOperation.frame(id: id, type: type, body: body)
            for (_, subscriber) in s.subscribers where subscriber.spid == nil || subscriber.spid == spid {
                subscriber.continuation.yield(frame)
            }
        }
    }

    /// A chunk of the main process's output (stream 0 stdout, 1 stderr), capped at `limit`
    /// bytes per stream; what is past the cap is counted for the `truncated` event.
    func output(_ stream: Int, _ chunk: [UInt8], limit: Int) {
        let kept = state.withLock { s -> ArraySlice<UInt8> in
            let room = max(0, limit - s.emitted[stream])
            let kept = chunk.prefix(room)
            s.emitted[stream] += kept.count
            s.dropped[stream] += chunk.count - kept.count
            return kept
        }
        if !kept.isEmpty {
            emit(stream == 0 ? "stdout" : "stderr", spid: 1, StreamValue(Array(kept)).json)
        }
    }

    /// Bytes emitted and dropped per stream.
    var outputCounts: (emitted: [Int], dropped: [Int]) { state.withLock { ($0.emitted, $0.dropped) } }

    /// Ends the log: the live streams end after the events they have.
    func finish() {
        let subscribers = state.withLock { s -> [AsyncStream<String>.Continuation] in
            s.finished = true
            defer { s.subscribers = [:] }
            return s.subscribers.values.map(\.continuation)
        }
        for continuation in subscribers { continuation.finish() }
        closeStdin()
    }

    /// Streams the events after `since` (matching `spid`); with `follow`, goes on until the log
    /// ends, with a keepalive comment every 15 s of silence.
    func subscribe(since: Int64, spid: Int?, follow: Bool) -> AsyncStream<String> {
        let (stream, continuation) = AsyncStream<String>.makeStream()
        // Register first, then read what is stored, under the lock that orders events: nothing
        // is lost or sent twice.
        let key = state.withLock { s -> UInt64? in
            let frames = (try? LiveOperation.storedFrames(database, operation: uuid, since: since, spid: spid)) ?? []
            for frame in frames { continuation.yield(frame) }
            guard follow && !s.finished else { return nil }
            s.nextSubscriber += 1
            s.subscribers[s.nextSubscriber] = (spid, continuation)
            return s.nextSubscriber
        }
        guard let key else {
            continuation.finish()
            return stream
        }
        let keepalive = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(15))
                if Task.isCancelled { break }
                continuation.yield(": keepalive\n\n")
            }
        }
        continuation.onTermination = { [weak self] _ in
            keepalive.cancel()
            _ = self?.state.withLock { $0.subscribers.removeValue(forKey: key) }
        }
        return stream
    }

    static func frame(id: Int64, type: String, body: String) -> String {
        "id: \(id)\nevent: \(type)\ndata: \(body)\n\n"
    }

    /// The stored events of an operation after `since`, as SSE frames.
    static func storedFrames(_ database: Database, operation: String, since: Int64, spid: Int?) throws -> [String] {
        var sql = "SELECT id, body FROM api_events WHERE operation = ? AND id > ?"
        var bindings: [SQLValue] = [.text(operation), .integer(since)]
        if let spid {
            sql += " AND spid = ?"
            bindings.append(.integer(Int64(spid)))
        }
        return try database.query(sql + " ORDER BY id", bindings).map { row in
            let body = row["body"].string ?? "{}"
            let type = JSON.parse(body)?["type"].flatMap { if case .string(let t) = $0 { t } else { nil } } ?? "message"
            return frame(id: row["id"].int ?? 0, type: type, body: body)
        }
    }

    // MARK: stdin of the main process

    func openStdin(_ fd: Int32) { state.withLock { $0.stdin = fd } }

    /// Writes to the main process's stdin (blocking while the pipe is full) and closes it when
    /// asked. - Throws: 409 when stdin is not open.
    func writeStdin(_ bytes: [UInt8], close: Bool) async throws {
        guard let fd = state.withLock({ $0.stdin }) else {
            throw APIError(
                .conflict,
                "the main process's stdin is closed: it was spawned without stdin.close=false, closed by an earlier request, or the process ended"
            )
        }
        if !bytes.isEmpty {
            try await DedicatedThread.run {
                do {
                    try FileSystem.writeAll(fd: fd, bytes, path: "stdin")
                } catch {
                    throw APIError(.conflict, "the main process no longer reads its stdin (it may have ended)")
                }
            }
        }
        if close { closeStdin() }
    }

    func closeStdin() {
        let fd = state.withLock { s -> Int32? in
            defer { s.stdin = nil }
            return s.stdin
        }
        if let fd { Glibc.close(fd) }
    }
}

extension StreamValue {
    var json: JSON {
        var members: [(String, JSON)] = [("value", .string(value)), ("encoding", .string(encoding))]
        if let truncated { members.append(("truncated", .bool(truncated))) }
        return .object(members)
    }
}
