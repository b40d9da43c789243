import FoundationEssentials
import Glibc
import HTTPTypes
import Hummingbird
import ImageStore
import Sandbox

extension ServerState {
    /// Events an event stream reads from the database at a time.
    static let eventPage = 4

    /// The operation row of this namespace. - Throws: 404 (also for another token's operation).
    func operationRow(_ call: APICall, _ uuid: String) throws -> SQLRow {
        guard APIStore.isUUID(uuid.lowercased()),
            let row = try api.database.query(
                "SELECT * FROM api_operations WHERE uuid = ? AND namespace = ?",
                [.text(uuid.lowercased()), .text(call.namespace)]
            ).first
        else {
            throw APIError.notFound("operation \(uuid) was not found; list operations with GET /v1/operations")
        }
        return row
    }

    static func operationJSON(_ row: SQLRow, full: Bool) -> JSON {
        let status = OperationStatus(row: row["status"].string)
        let created = row["created"].double ?? 0
        let started = row["started"].double
        let ended = row["ended"].double
        let duration = started.map { (ended ?? Timestamp.now) - $0 } ?? 0
        let image = row["image"].string.flatMap { APIStore.isUUID($0) ? $0 : nil }
        var members: [(String, JSON)] = [
            ("uuid", .string(row["uuid"].string ?? "")), ("kind", .string(row["kind"].string ?? "instance")),
            ("status", .string(status.rawValue)), ("error", .optional(row["error"].string)),
            ("created_at", .string(Timestamp.iso(created))), ("duration", .double(max(0, duration))),
            ("image_size", .int(row["image_size"].int ?? 0)), ("consumed_cpu", .double(row["cpu"].double ?? 0)),
            ("consumed_memory", .int(row["memory"].int ?? 0)), ("image_uuid", .optional(image)),
            ("result_image_uuid", .optional(row["result_image"].string)),
        ]
        if full {
            let metadata = row["metadata"].string ?? "{}"
            let result = row["result"].string ?? "null"
            // An instance's metadata carries its process result; an import's does not.
            let merged =
                row["kind"].string == "instance" && metadata.count > 2
                ? String(metadata.dropLast()) + ",\"result\":" + result + "}" : metadata
            members.append(("metadata", .raw(merged)))
            let terminal = status.isTerminal
            members.append(
                (
                    "result",
                    terminal
                        ? .object([
                            ("image", .optional(row["result_image"].string)), ("tag", .optional(row["tag"].string)),
                        ])
                        : .null
                ))
        }
        return .object(members)
    }

    /// `GET /v1/operations`: newest first, filtered by status, kind and time; a JSON array.
    func listOperations(_ call: APICall) throws -> Response {
        var sql = "SELECT * FROM api_operations WHERE namespace = ?"
        var bindings: [SQLValue] = [.text(call.namespace)]
        if let status = call.param("status"), !status.isEmpty {
            guard OperationStatus(rawValue: status.uppercased()) != nil else {
                let valid = OperationStatus.allCases.map(\.rawValue)
                throw APIError(.badRequest, "status=\(status) is not one of \(valid.joined(separator: ", "))")
            }
            sql += " AND status = ?"
            bindings.append(.text(status.uppercased()))
        }
        if let kind = call.param("kind"), !kind.isEmpty {
            guard ["instance", "image_import"].contains(kind) else {
                throw APIError(.badRequest, "kind=\(kind) is not instance or image_import")
            }
            sql += " AND kind = ?"
            bindings.append(.text(kind))
        }
        try call.windowAndPage(&sql, &bindings)
        let rows = try api.database.query(sql, bindings)
        return .json(.array(rows.map { ServerState.operationJSON($0, full: false) }))
    }

    func operation(_ call: APICall, _ uuid: String) throws -> Response {
        .json(ServerState.operationJSON(try operationRow(call, uuid), full: true))
    }

    /// `DELETE /v1/operations/{id}`. - Throws: 409 when it has ended.
    func cancel(_ call: APICall, _ uuid: String) throws -> Response {
        let row = try operationRow(call, uuid)
        try operations.cancel(row["uuid"].string ?? uuid, status: OperationStatus(row: row["status"].string))
        return .json(
            .object([("uuid", .string(row["uuid"].string ?? uuid)), ("status", .string("CANCELLING"))]),
            status: .accepted)
    }

    /// `GET /v1/operations/{id}/events`: Server-Sent Events, resumable with `Last-Event-Id`
    /// or `since`, filtered by `spid`, kept open with `follow` until `completion`.
    func events(_ call: APICall, _ uuid: String) throws -> Response {
        let row = try operationRow(call, uuid)
        let id = row["uuid"].string ?? uuid
        func integer(_ raw: String?, _ name: String) throws -> Int64? {
            guard let raw, !raw.isEmpty else { return nil }
            guard let value = Int64(raw.trimmingCharacters(in: .whitespaces)), value >= -1 else {
                throw APIError(.badRequest, "\(name) must be a non-negative integer, not '\(raw)'")
            }
            return value
        }
        let since =
            try integer(call.request.headers[HTTPField.Name("Last-Event-Id")!], "Last-Event-Id")
            ?? integer(call.param("since"), "since") ?? -1
        let spid = try integer(call.param("spid"), "spid").map(Int.init)
        let follow = call.flag("follow")
        let slot = try streams.open(call.namespace, concurrency: call.token.maxConcurrency)
        // Registered before anything stored is read: an event recorded in between wakes it.
        let wakeups = follow ? operations.liveOperation(id)?.follow() : nil
        let database = api.database
        var headers = HTTPFields()
        headers[.contentType] = "text/event-stream"
        headers[.cacheControl] = "no-cache"
        return Response(
            status: .ok, headers: headers,
            body: ResponseBody { writer in
                defer { slot.close() }
                // The database is the buffer: a page at a time (4 events of at most 64 KiB of
                // output each, so a stream nobody reads holds at most 256 KiB of this server's
                // memory), each write waiting for the client, whatever the operation has logged
                // meanwhile.
                var last = since
                func drain() async throws -> Bool {
                    var wrote = false
                    while true {
                        let page = try LiveOperation.storedFrames(
                            database, operation: id, since: last, spid: spid, limit: Self.eventPage)
                        for (eventID, frame) in page {
                            try await writer.write(ByteBuffer(string: frame))
                            last = eventID
                        }
                        wrote = wrote || !page.isEmpty
                        if page.count < Self.eventPage { return wrote }
                    }
                }
                _ = try await drain()
                if let wakeups {
                    for await wake in wakeups {
                        let wrote = try await drain()
                        if case .keepalive = wake, !wrote {
                            try await writer.write(ByteBuffer(string: ": keepalive\n\n"))
                        }
                    }
                    _ = try await drain()  // what was logged as the log ended
                }
                try await writer.finish(nil)
            })
    }

    private func processNumber(_ spid: String) throws -> Int {
        guard let number = Int(spid), number >= 1 else {
            throw APIError(.badRequest, "spid must be a positive integer, not '\(spid)'")
        }
        return number
    }

    /// `GET /v1/operations/{id}/subprocesses/{spid}`: a process's result (1 is the main one);
    /// while it runs, exit_code and signal are -1.
    func subprocess(_ call: APICall, _ uuid: String, spid: String) throws -> Response {
        let row = try operationRow(call, uuid)
        let number = try processNumber(spid)
        let id = row["uuid"].string ?? uuid
        var result: String?
        if number == 1 {
            result = row["result"].string
        } else {
            guard
                let process = try api.database.query(
                    "SELECT result FROM api_subprocesses WHERE operation = ? AND spid = ?",
                    [.text(id), .integer(Int64(number))]
                ).first
            else {
                throw APIError.notFound("operation \(uuid) has no process \(spid)")
            }
            result = process["result"].string
        }
        if let result { return .json(.raw(result)) }
        return .json(
            OperationManager.instanceResult(
                exitCode: -1, signal: -1, timedOut: false, metrics: RunMetrics(), stdout: [], stdoutTruncated: false,
                stderr: [], stderrTruncated: false))
    }

    /// The live operation behind a running instance. - Throws: `ended` (the spec: 410 for
    /// stdin, 409 for signals and new processes) when it has ended.
    func running(
        _ call: APICall, _ uuid: String, ended: HTTPResponse.Status = .conflict
    ) throws
        -> LiveOperation
    {
        let row = try operationRow(call, uuid)
        let status = OperationStatus(row: row["status"].string)
        guard !status.isTerminal,
            let live = operations.liveOperation(row["uuid"].string ?? uuid)
        else {
            throw APIError(ended, "operation \(uuid) is not a running instance (\(status)); there is no live process")
        }
        return live
    }

    /// `DELETE /v1/operations/{id}/subprocesses/{spid}?signal=`: signals a process's group
    /// (SIGKILL by default; for the main process that ends the operation).
    func kill(_ call: APICall, _ uuid: String, spid: String) throws -> Response {
        let number = try processNumber(spid)
        let signal = try ServerState.requestedSignal(call.param("signal"))
        let live = try running(call, uuid)
        guard let control = live.processControl(number) else {
            throw APIError.notFound("operation \(uuid) has no live process \(spid)")
        }
        control.signal(signal)
        return .noContent()
    }

    /// `POST /v1/operations/{id}/subprocesses/{spid}/stdin`.
    func stdin(_ call: APICall, _ uuid: String, spid: String) async throws -> Response {
        let number = try processNumber(spid)
        let live = try running(call, uuid, ended: .gone)
        let body = try await decode(StdinPayload.self, from: call)
        try await live.writeStdin(spid: number, try body.bytes(), close: body.close ?? true)
        return .noContent()
    }

    /// `POST /v1/operations/{id}/subprocesses`: one more process in the running instance.
    func execSubprocess(_ call: APICall, _ uuid: String) async throws -> Response {
        let live = try running(call, uuid)
        let body = try await decode(ExecRequestBody.self, from: call)
        let spid = try operations.startSubprocess(live, body)
        var headers = HTTPFields()
        headers[.location] = "/v1/operations/\(live.uuid)/subprocesses/\(spid)"
        return .json(.object([("spid", .int(spid))]), status: .created, headers: headers)
    }

    static func parseSignal(_ raw: String?) throws -> Int32 {
        guard var name = raw?.uppercased(), !name.isEmpty else { return SIGKILL }
        if let number = Int32(name), (1...64).contains(number) { return number }
        if name.hasPrefix("SIG") { name.removeFirst(3) }
        let known: [String: Int32] = [
            "HUP": SIGHUP, "INT": SIGINT, "QUIT": SIGQUIT, "KILL": SIGKILL, "TERM": SIGTERM, "USR1": SIGUSR1,
            "USR2": SIGUSR2, "WINCH": SIGWINCH, "ALRM": SIGALRM, "CONT": SIGCONT, "STOP": SIGSTOP,
        ]
        guard let signal = known[name] else {
            throw APIError(.badRequest, "signal '\(raw ?? "")' is not a signal number or name (TERM, INT, KILL, ...)")
        }
        return signal
    }

    /// A signal from the request, refusing SIGSTOP: it cannot be forwarded, so it would freeze
    /// the process that supervises the command (use TSTP to pause a command that allows it).
    static func requestedSignal(_ raw: String?) throws -> Int32 {
        let signal = try parseSignal(raw)
        guard signal != SIGSTOP else {
            throw APIError(
                .badRequest, "SIGSTOP cannot be sent here (it would freeze the supervising process); send TSTP")
        }
        return signal
    }
}
