import FoundationEssentials
import Glibc
import ImageStore
import Sandbox
import Synchronization

/// What wakes a stream following an operation: new events, or 15 s of silence.
enum EventWake: Sendable {
    case events
    case keepalive
}

/// The event log of one operation: every event is stored in the database as it happens, and
/// the streams following it live are woken to read it from there. A stream holds at most one
/// pending wake-up and reads the events a page at a time, so a client that does not read
/// costs the server nothing but its connection (the database is the buffer).
final class LiveOperation: Sendable {
    let uuid: String
    let namespace: String
    let control: RunControl
    private let database: Database

    private struct State {
        var nextID: Int64 = 0
        var subscribers: [UInt64: AsyncStream<EventWake>.Continuation] = [:]
        var nextSubscriber: UInt64 = 0
        var finished = false
        var task: Task<Void, Never>?
        /// Per process (spid): its stdin pipe while it is open.
        var stdin: [Int: StdinPipe] = [:]
        /// Per process: bytes streamed as events so far, and dropped past the cap (stdout, stderr).
        var emitted: [Int: [Int]] = [:]
        var dropped: [Int: [Int]] = [:]
        var running = false
        /// Processes started in the instance (spid 2, 3, ...), while they run.
        var nextSpid = 2
        var subprocesses: [Int: RunControl] = [:]
        var subprocessTasks: [Int: Task<Void, Never>] = [:]
        /// What a subprocess inherits: the image's environment and working directory.
        var imageEnv: [String] = []
        var imageCwd = "/"
        var cancelReason: String?
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

    /// Cancels the operation; `reason` becomes its error.
    func cancel(reason: String = "cancelled") {
        state.withLock { s in
            if s.cancelReason == nil { s.cancelReason = reason }
            return s.task
        }?.cancel()
    }
    var cancelReason: String? { state.withLock { $0.cancelReason } }

    var isRunning: Bool { state.withLock { $0.running } }
    func setRunning(_ running: Bool) { state.withLock { $0.running = running } }

    /// Records an event and passes it to the live streams.
    func emit(_ type: String, spid: Int, _ data: JSON) {
        try? record(type, spid: spid, data, alongside: nil)
    }

    /// Records an event in one transaction with `alongside` (the record it must never be seen
    /// without), then passes it to the live streams. - Throws: when the transaction fails
    /// (nothing is recorded or sent then).
    func emit(_ type: String, spid: Int, _ data: JSON, alongside: (Database.Transaction) throws -> Void) throws {
        try withoutActuallyEscaping(alongside) { body in try record(type, spid: spid, data, alongside: body) }
    }

    private func record(
        _ type: String, spid: Int, _ data: JSON, alongside: ((Database.Transaction) throws -> Void)?
    ) throws {
        try state.withLock { s in
            let id = s.nextID
            let body = JSON.object([
                ("id", .int(id)), ("ts", .string(Timestamp.iso(Timestamp.now))), ("spid", .int(spid)),
                ("type", .string(type)), ("data", data),
            ]).serialized()
            let insert = "INSERT INTO api_events(operation, id, spid, type, body) VALUES(?, ?, ?, ?, ?)"
            let values: [SQLValue] = [.text(uuid), .integer(id), .integer(Int64(spid)), .text(type), .text(body)]
            if let alongside {
                try database.transaction { tx in
                    try alongside(tx)
                    _ = try tx.query(insert, values)
                }
            } else {
                _ = try? database.query(insert, values)
            }
            s.nextID += 1
            for subscriber in s.subscribers.values { subscriber.yield(.events) }
        }
    }

    /// A chunk of a process's output (stream 0 stdout, 1 stderr), capped at `limit` bytes per
    /// stream; what is past the cap is counted for the `truncated` event.
    func output(spid: Int, _ stream: Int, _ chunk: [UInt8], limit: Int) {
        let kept = state.withLock { s -> ArraySlice<UInt8> in
            let emitted = s.emitted[spid, default: [0, 0]][stream]
            let kept = chunk.prefix(max(0, limit - emitted))
            s.emitted[spid, default: [0, 0]][stream] += kept.count
            s.dropped[spid, default: [0, 0]][stream] += chunk.count - kept.count
            return kept
        }
        if !kept.isEmpty {
            emit(stream == 0 ? "stdout" : "stderr", spid: spid, StreamValue(Array(kept)).json)
        }
    }

    /// Emits `truncated` for each stream of a process that went past its cap.
    func emitTruncation(spid: Int) {
        let (emitted, dropped) = state.withLock { ($0.emitted[spid] ?? [0, 0], $0.dropped[spid] ?? [0, 0]) }
        for (index, name) in ["stdout", "stderr"].enumerated() where dropped[index] > 0 {
            emit(
                "truncated", spid: spid,
                .object([
                    ("stream", .string(name)), ("bytes_emitted", .int(emitted[index])),
                    ("bytes_dropped", .int(dropped[index])),
                ]))
        }
    }

    // MARK: processes started in the instance

    func setImageDefaults(env: [String], cwd: String) {
        state.withLock {
            $0.imageEnv = env
            $0.imageCwd = cwd
        }
    }
    var imageDefaults: (env: [String], cwd: String) { state.withLock { ($0.imageEnv, $0.imageCwd) } }

    /// The most processes started in one instance that may run at once.
    static let maxSubprocesses = 64

    /// A new spid and the control of its process. - Throws: 429 past `maxSubprocesses`.
    func addSubprocess() throws -> (spid: Int, control: RunControl) {
        try state.withLock { s in
            guard s.subprocesses.count < LiveOperation.maxSubprocesses else {
                throw APIError(
                    .tooManyRequests,
                    "\(LiveOperation.maxSubprocesses) processes already run in this instance; wait for one to end",
                    retryAfter: 1)
            }
            let spid = s.nextSpid
            s.nextSpid += 1
            let control = RunControl()
            s.subprocesses[spid] = control
            return (spid, control)
        }
    }

    func subprocessEnded(_ spid: Int) {
        state.withLock {
            $0.subprocesses[spid] = nil
            $0.subprocessTasks[spid] = nil
        }
    }

    func trackSubprocess(_ spid: Int, _ task: Task<Void, Never>) {
        state.withLock { s in
            if s.subprocesses[spid] != nil { s.subprocessTasks[spid] = task }
        }
    }

    /// Waits until the processes started in the instance have recorded their ends (they end
    /// with the sandbox), so that nothing of theirs follows `completion`.
    func awaitSubprocesses() async {
        while let task = state.withLock({ $0.subprocessTasks.values.first }) {
            await task.value
            state.withLock { s in
                if let key = s.subprocessTasks.first(where: { $0.value == task })?.key { s.subprocessTasks[key] = nil }
            }
        }
    }

    /// The control of a running process: the main one (1) or a started one.
    func processControl(_ spid: Int) -> RunControl? {
        spid == 1 ? control : state.withLock { $0.subprocesses[spid] }
    }

    /// Ends the log: the live streams end after the events they have.
    func finish() {
        let subscribers = state.withLock { s -> [AsyncStream<EventWake>.Continuation] in
            s.finished = true
            defer { s.subscribers = [:] }
            return Array(s.subscribers.values)
        }
        for continuation in subscribers { continuation.finish() }
        closeAllStdin()
    }

    /// Wake-ups for a stream that follows the log until it ends (nil once it has ended): one
    /// after each event (coalesced: at most one waits), and a keepalive after 15 s of silence.
    /// Register before reading what is stored, so that nothing recorded in between is missed.
    func follow() -> AsyncStream<EventWake>? {
        let (stream, continuation) = AsyncStream<EventWake>.makeStream(bufferingPolicy: .bufferingNewest(1))
        let registered = state.withLock { s -> UInt64? in
            guard !s.finished else { return nil }
            s.nextSubscriber += 1
            s.subscribers[s.nextSubscriber] = continuation
            return s.nextSubscriber
        }
        guard let key = registered else { return nil }
        let keepalive = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(15))
                if Task.isCancelled { break }
                continuation.yield(.keepalive)
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

    /// Up to `limit` stored events of an operation after `since`, as SSE frames with their ids.
    static func storedFrames(
        _ database: Database, operation: String, since: Int64, spid: Int?, limit: Int = 256
    ) throws -> [(id: Int64, frame: String)] {
        var sql = "SELECT id, type, body FROM api_events WHERE operation = ? AND id > ?"
        var bindings: [SQLValue] = [.text(operation), .integer(since)]
        if let spid {
            sql += " AND spid = ?"
            bindings.append(.integer(Int64(spid)))
        }
        return try database.query(sql + " ORDER BY id LIMIT \(limit)", bindings).map { row in
            let id = row["id"].int ?? 0
            return (id, frame(id: id, type: row["type"].string ?? "message", body: row["body"].string ?? "{}"))
        }
    }

    // MARK: stdin of the processes

    /// Keeps a process's stdin open for `writeStdin`; `initial` goes first.
    func openStdin(spid: Int, _ fd: Int32, initial: [UInt8]) {
        state.withLock { $0.stdin[spid] = StdinPipe(fd: fd, initial: initial) }
    }

    /// Writes to a process's stdin and closes it when asked. - Throws: 409 when it is closed.
    func writeStdin(spid: Int, _ bytes: [UInt8], close: Bool) async throws {
        guard let pipe = state.withLock({ $0.stdin[spid] }) else {
            throw APIError(
                .conflict,
                "the stdin of process \(spid) is closed: it was started without stdin.close=false, closed by an earlier request, or the process ended"
            )
        }
        try await pipe.write(bytes, close: close, spid: spid)
        if close { _ = state.withLock { $0.stdin.removeValue(forKey: spid) } }
    }

    func closeStdin(spid: Int) {
        state.withLock { $0.stdin.removeValue(forKey: spid) }?.close()
    }

    func closeAllStdin() {
        let pipes = state.withLock { s -> [StdinPipe] in
            defer { s.stdin = [:] }
            return Array(s.stdin.values)
        }
        for pipe in pipes { pipe.close() }
    }
}

extension StreamValue {
    var json: JSON {
        var members: [(String, JSON)] = [("value", .string(value)), ("encoding", .string(encoding))]
        if let truncated { members.append(("truncated", .bool(truncated))) }
        return .object(members)
    }
}
