import FoundationEssentials
import Glibc
import Registry
import Sandbox
import Synchronization

/// A validated `POST /v1/instances`.
struct SpawnPlan: Sendable {
    enum ImageTarget: Sendable {
        case record(ImageRecord)
        /// A built-in base image not built yet: built when the operation starts.
        case builtin(String)
        /// An image outside the store (`docker://…`, `oci:…`): imported when the operation
        /// starts, and then part of the namespace.
        case external(String)
    }
    var uuid: String
    var token: Token
    var image: ImageTarget
    var command: String
    var args: [String]
    var shell: Bool
    var env: [String: String?]
    var cwd: String?
    var files: [FileMapping]
    var fileRequests: [(path: String, uuid: String, mode: String)]
    var timeout: Int
    var hostname: String
    var disposable: Bool
    var stdin: [UInt8]
    var stdinText: StdinPayload
    var keepStdinOpen: Bool
    var truncateAt: Int
    var network: NetworkMode
    var uid: Int
    var gid: Int
    var preserveEnv: Bool
    var preserveCwd: Bool
    var maxLayerBytes: Int64

    var argv: [String] { shell ? ["/bin/sh", "-c", command] : [command] + args }

    /// `metadata` of the operation, without `result`: every field the clients require.
    func metadata(image: String) -> JSON {
        let envJSON = JSON.object(env.sorted { $0.key < $1.key }.map { ($0.key, JSON.optional($0.value)) })
        let filesJSON = JSON.object(
            fileRequests.map { ($0.path, JSON.object([("uuid", .string($0.uuid)), ("mode", .string($0.mode))])) })
        var stdinMembers: [(String, JSON)] = [
            ("value", .string(stdinText.value)), ("encoding", .string(stdinText.encoding ?? "ascii")),
        ]
        stdinMembers.append(("close", .bool(!keepStdinOpen)))
        return .object([
            ("command", .string(command)), ("image", .string(image)), ("args", .array(args.map(JSON.string))),
            ("shell", .bool(shell)), ("env", envJSON), ("cwd", .string(cwd ?? "")), ("timeout", .int(timeout)),
            ("hostname", .string(hostname)), ("files", filesJSON), ("stdin", .object(stdinMembers)),
            ("disposable", .bool(disposable)), ("truncate_output_at", .int(truncateAt)), ("uid", .int(uid)),
            ("gid", .int(gid)), ("preserve_env", .bool(preserveEnv)), ("preserve_cwd", .bool(preserveCwd)),
            ("networking", .object([("enabled", .bool(network == .loopback))])),
            ("resources_limits", .object([("max_layer_bytes", .int(maxLayerBytes))])),
        ])
    }

    var imageLabel: String {
        switch image {
        case .record(let record): record.uuid
        case .builtin(let name): "tag:" + name
        case .external(let reference): reference
        }
    }
}

/// Runs instance operations: queues them per token, runs them on the engine, records their
/// events and results, and answers cancels, signals and stdin.
final class OperationManager: Sendable {
    let api: APIStore
    let engine: SandboxEngine
    private let slots = Slots()
    private let live = Mutex<[String: LiveOperation]>([:])

    /// The slot key that serializes builds of built-in images (not a namespace name: those
    /// are letters, digits, '-', '_' and '.').
    static let buildSlot = "/builtin-build"

    /// Where instances run: containers, or VMs (`serve --isolation vm`).
    let isolation: IsolationKind

    /// The registries imports may reach: the operator's allowlist.
    let registries: RegistryAccess

    init(api: APIStore, engine: SandboxEngine, isolation: IsolationKind = .container, registries: RegistryAccess) {
        self.api = api
        self.engine = engine
        self.isolation = isolation
        self.registries = registries
    }

    /// Operations left unfinished by a previous `serve` failed with it: record that, and end
    /// their event logs.
    func recover() throws {
        let rows = try api.database.query(
            "SELECT uuid, namespace FROM api_operations WHERE status NOT IN (\(OperationStatus.terminalSQL))")
        for row in rows {
            guard let uuid = row["uuid"].string, let namespace = row["namespace"].string else { continue }
            let next =
                (try api.database.query(
                    "SELECT MAX(id) AS m FROM api_events WHERE operation = ?", [.text(uuid)]
                ).first?["m"].int ?? -1) + 1
            let error = "the server (contree-pipeline serve) stopped while this operation ran; run it again"
            let now = Timestamp.now
            try api.database.query(
                "UPDATE api_operations SET status = ?, error = ?, ended = ? WHERE uuid = ?",
                [.text(OperationStatus.failed.rawValue), .text(error), .real(now), .text(uuid)])
            let log = LiveOperation(
                uuid: uuid, namespace: namespace, database: api.database, control: RunControl(), firstEventID: next)
            log.emit(
                "shutdown", spid: 0,
                .object([("stopped_at", .string(Timestamp.iso(now))), ("reason", .string("signal"))]))
            log.emit(
                "completion", spid: 0,
                .object([
                    ("status", .string(OperationStatus.failed.rawValue)), ("result_image_uuid", .null),
                    ("error", .string(error)),
                    ("duration_ms", .int(0)), ("image_size_bytes", .int(0)),
                ]))
        }
    }

    func liveOperation(_ uuid: String) -> LiveOperation? { live.withLock { $0[uuid] } }

    /// Number of running (slot-holding) instances of a namespace.
    func running(_ namespace: String) -> Int { slots.held(namespace) }

    /// Records the operation as PENDING and starts it.
    func spawn(_ plan: SpawnPlan) throws {
        let namespace = plan.token.name
        let control = RunControl()
        let operation = LiveOperation(uuid: plan.uuid, namespace: namespace, database: api.database, control: control)
        try api.database.query(
            """
            INSERT INTO api_operations(uuid, namespace, kind, status, created, image, metadata)
            VALUES(?, ?, 'instance', ?, ?, ?, ?)
            """,
            [
                .text(plan.uuid), .text(namespace), .text(OperationStatus.pending.rawValue), .real(Timestamp.now),
                .text(plan.imageLabel),
                .text(plan.metadata(image: plan.imageLabel).serialized()),
            ])
        live.withLock { $0[plan.uuid] = operation }
        let task = Task { [self] in
            await execute(plan, operation)
            live.withLock { _ = $0.removeValue(forKey: plan.uuid) }
        }
        operation.setTask(task)
    }

    /// Records an `image_import` operation and starts it.
    func startImport(
        url: String, tag: String?, timeout: Int, credentials: RegistryCredentials?, token: Token
    ) throws -> String {
        let uuid = UUID().uuidString.lowercased()
        let namespace = token.name
        let metadata = JSON.object([
            ("registry", .object([("url", .string(url))])), ("tag", .optional(tag)), ("timeout", .int(timeout)),
        ])
        try api.database.query(
            """
            INSERT INTO api_operations(uuid, namespace, kind, status, created, metadata)
            VALUES(?, ?, 'image_import', ?, ?, ?)
            """,
            [
                .text(uuid), .text(namespace), .text(OperationStatus.pending.rawValue), .real(Timestamp.now),
                .text(metadata.serialized()),
            ])
        let operation = LiveOperation(uuid: uuid, namespace: namespace, database: api.database, control: RunControl())
        live.withLock { $0[uuid] = operation }
        let task = Task { [self] in
            defer { live.withLock { _ = $0.removeValue(forKey: uuid) } }
            let created = Timestamp.now
            do {
                try await slots.acquire(namespace, limit: token.maxConcurrency)
            } catch {
                complete(
                    operation, status: .cancelled, error: operation.cancelReason ?? "cancelled", resultImage: nil,
                    duration: 0, imageSize: 0
                ) { tx in try self.endImport(tx, uuid, .cancelled, operation.cancelReason, nil) }
                return
            }
            defer { slots.release(namespace) }
            setStatus(uuid, .executing, started: true)
            // A cancel or the timeout stops the downloads and unpacking; the import removes
            // what it made before the operation ends.
            let cancellation = Cancellation()
            let importer = RegistryImporter(
                store: api.store, credentials: credentials, access: registries, cancellation: cancellation)
            let work = Task { try await DedicatedThread.run { try importer.importImage(url) } }
            let deadline = Task {
                try await Task.sleep(for: .seconds(timeout))
                operation.cancel(reason: "the import did not finish within its timeout of \(timeout) s")
            }
            defer { deadline.cancel() }
            let outcome = await withTaskCancellationHandler {
                await work.result
            } onCancel: {
                cancellation.cancel(operation.cancelReason ?? "cancelled")
            }
            let duration = Timestamp.now - created
            // An import that finished as the cancel came is a success all the same.
            if case .failure = outcome, Task.isCancelled || operation.cancelReason != nil {
                let reason = operation.cancelReason ?? "cancelled"
                complete(
                    operation, status: .cancelled, error: reason, resultImage: nil, duration: duration, imageSize: 0
                ) {
                    tx in try self.endImport(tx, uuid, .cancelled, reason, nil)
                }
                return
            }
            switch outcome {
            case .success(let image):
                complete(
                    operation, status: .success, error: nil, resultImage: image.uuid, duration: duration,
                    imageSize: image.size
                ) { tx in
                    try self.api.adopt(image.uuid, namespace: namespace, operation: uuid, tx: tx)
                    if let tag {
                        _ = try tx.query(
                            "INSERT OR REPLACE INTO api_tags(namespace, tag, image, updated) VALUES(?, ?, ?, ?)",
                            [.text(namespace), .text(tag), .text(image.uuid), .real(Timestamp.now)])
                    }
                    try self.endImport(tx, uuid, .success, nil, image, size: image.size)
                    _ = try tx.query("UPDATE api_operations SET tag = ? WHERE uuid = ?", [tag.sql, .text(uuid)])
                }
            case .failure(let error):
                let message = APIError.from(error).message
                complete(
                    operation, status: .failed, error: message, resultImage: nil, duration: duration, imageSize: 0
                ) {
                    tx in try self.endImport(tx, uuid, .failed, message, nil)
                }
            }
        }
        operation.setTask(task)
        return uuid
    }

    private func endImport(
        _ tx: Database.Transaction, _ uuid: String, _ status: OperationStatus, _ error: String?, _ image: ImageRecord?,
        size: Int64 = 0
    ) throws {
        _ = try tx.query(
            "UPDATE api_operations SET status = ?, error = ?, ended = ?, result_image = ?, image_size = ? WHERE uuid = ?",
            [.text(status.rawValue), error.sql, .real(Timestamp.now), (image?.uuid).sql, .integer(size), .text(uuid)])
    }

    /// Cancels every live operation and waits (up to 10 s) until each has recorded its end.
    func shutdown(reason: String) async {
        let operations = live.withLock { Array($0.values) }
        for operation in operations { operation.cancel(reason: reason) }
        let deadline = ContinuousClock.now + .seconds(10)
        while !live.withLock({ $0.isEmpty }) && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    /// Cancels a PENDING or running operation. - Throws: 409 when it has ended.
    func cancel(_ uuid: String, status: OperationStatus) throws {
        guard !status.isTerminal, let operation = liveOperation(uuid) else {
            throw APIError(.conflict, "operation \(uuid) has already ended (\(status)); there is nothing to cancel")
        }
        operation.cancel()
    }

    func setStatus(_ uuid: String, _ status: OperationStatus, started: Bool = false) {
        _ = try? api.database.query(
            started
                ? "UPDATE api_operations SET status = ?, started = ? WHERE uuid = ?"
                : "UPDATE api_operations SET status = ? WHERE uuid = ?",
            started
                ? [.text(status.rawValue), .real(Timestamp.now), .text(uuid)] : [.text(status.rawValue), .text(uuid)])
    }

    private func execute(_ plan: SpawnPlan, _ operation: LiveOperation) async {
        let namespace = plan.token.name
        let created = Timestamp.now
        do {
            try await slots.acquire(namespace, limit: plan.token.maxConcurrency)
        } catch {
            finishWithoutRun(
                plan, operation, status: .cancelled, error: operation.cancelReason ?? "cancelled before it started",
                created: created)
            return
        }
        defer { slots.release(namespace) }
        setStatus(plan.uuid, .assigned)

        // stdin: all of it now, or a pipe that POST .../subprocesses/1/stdin writes to.
        var input = InputSource.null
        var pipeRead: Int32 = -1
        if plan.keepStdinOpen {
            if let pipe = try? FileSystem.makePipe() {
                pipeRead = pipe.read
                input = .fileDescriptor(pipe.read)
                operation.openStdin(spid: 1, pipe.write, initial: plan.stdin)
                if !plan.stdin.isEmpty { Task { try? await operation.writeStdin(spid: 1, [], close: false) } }
            }
        } else if !plan.stdin.isEmpty {
            input = .bytes(plan.stdin)
        }
        defer {
            operation.closeStdin(spid: 1)
            if pipeRead >= 0 { close(pipeRead) }
        }

        let image: ImageRecord
        do {
            switch plan.image {
            case .record(let record): image = record
            case .builtin(let name):
                // One build at a time for the whole server (debootstrap is heavy).
                let base = api.baseImages
                try await slots.acquire(OperationManager.buildSlot, limit: 1)
                defer { slots.release(OperationManager.buildSlot) }
                image = try await DedicatedThread.run { try base.resolve(name) }
            case .external(let reference):
                let importer = RegistryImporter(store: api.store, access: registries)
                image = try await DedicatedThread.run { try importer.importImage(reference) }
                try api.database.transaction { tx in
                    try api.adopt(image.uuid, namespace: namespace, operation: nil, tx: tx)
                }
            }
        } catch {
            finishWithoutRun(
                plan, operation, status: .failed, error: "\(APIError.from(error).message)", created: created)
            return
        }

        operation.emit(
            "init", spid: 0,
            .object([
                ("started_at", .string(Timestamp.iso(Timestamp.now))), ("runtime_path", .string("contree-init")),
                ("verbose", .bool(false)), ("init_pid", .int(1)), ("hostname", .string(plan.hostname)),
                ("image", .string(image.uuid)),
            ]))

        operation.setImageDefaults(env: image.config.env, cwd: plan.cwd ?? image.config.workingDir)
        let env = ProcessFields.environment(image: image.config.env, shell: plan.shell, request: plan.env)
        var resultConfig: ImageConfig?
        if plan.preserveEnv || plan.preserveCwd {
            var config = image.config
            if plan.preserveEnv {
                var merged: [String: String] = [:]
                var order: [String] = []
                for entry in image.config.env {
                    let parts = entry.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                    let key = String(parts[0])
                    order.append(key)
                    merged[key] = parts.count > 1 ? String(parts[1]) : ""
                }
                for (key, value) in plan.env.sorted(by: { $0.key < $1.key }) {
                    if let value, !value.isEmpty {
                        if merged[key] == nil { order.append(key) }
                        merged[key] = value
                    } else {
                        merged[key] = nil
                    }
                }
                config.env = order.compactMap { key in merged[key].map { "\(key)=\($0)" } }
            }
            if plan.preserveCwd { config.workingDir = plan.cwd ?? image.config.workingDir }
            resultConfig = config
        }

        operation.control.whenStarted { [self] in
            setStatus(plan.uuid, .executing, started: true)
            operation.setRunning(true)
            operation.emit(
                "spawn", spid: 1,
                .object([
                    ("pid", .int(2)), ("command", .string(plan.command)), ("args", .array(plan.args.map(JSON.string))),
                    ("shell", .bool(plan.shell)), ("cwd", .string(plan.cwd ?? image.config.workingDir)),
                    ("uid", .int(plan.uid)), ("gid", .int(plan.gid)), ("timeout", .int(plan.timeout)),
                    ("truncate_at", .int(plan.truncateAt)),
                ]))
        }
        let limit = plan.truncateAt
        var spec = RunSpec(
            image: image.uuid, command: plan.argv, env: env, cwd: plan.cwd, files: plan.files,
            timeout: Double(plan.timeout), network: plan.network, hostname: plan.hostname, disposable: plan.disposable,
            stdin: input,
            stdout: .capture(limit: limit, onChunk: { operation.output(spid: 1, 0, $0, limit: limit) }),
            stderr: .capture(limit: limit, onChunk: { operation.output(spid: 1, 1, $0, limit: limit) }))
        spec.inheritImageEnv = false
        // The token's limits (the tokens file, or its defaults); no file grows past the layer
        // limit while the run goes, and a larger change is not kept.
        spec.limits = ResourceLimits(
            memoryBytes: plan.token.memoryBytes, cpus: plan.token.cpus, pids: plan.token.pids,
            layerBytes: plan.maxLayerBytes)
        spec.isolation = isolation
        spec.resultConfig = resultConfig
        spec.control = operation.control
        spec.user = (UInt32(plan.uid), UInt32(plan.gid))
        let result: RunResult
        do {
            result = try await engine.run(spec)
        } catch {
            operation.setRunning(false)
            await operation.awaitSubprocesses()
            finishWithoutRun(
                plan, operation, status: Task.isCancelled ? .cancelled : .failed,
                error: Task.isCancelled ? operation.cancelReason ?? "cancelled" : APIError.from(error).message,
                created: created, image: image.uuid)
            return
        }
        operation.setRunning(false)
        await operation.awaitSubprocesses()
        finish(plan, operation, result: result, image: image, created: created)
    }

    /// Ends an operation that never ran its command.
    private func finishWithoutRun(
        _ plan: SpawnPlan, _ operation: LiveOperation, status: OperationStatus, error: String, created: Double,
        image: String? = nil
    ) {
        let now = Timestamp.now
        operation.emit(
            "shutdown", spid: 0,
            .object([("stopped_at", .string(Timestamp.iso(now))), ("reason", .string("spawn_failed"))]))
        complete(
            operation, status: status, error: error, resultImage: nil, duration: 0, imageSize: 0
        ) { tx in
            _ = try tx.query(
                "UPDATE api_operations SET status = ?, error = ?, ended = ?, image = COALESCE(?, image) WHERE uuid = ?",
                [.text(status.rawValue), .text(error), .real(now), image.sql, .text(plan.uuid)])
        }
    }

    /// Writes the operation's final record and its `completion` event in one transaction, so
    /// neither is ever seen without the other; ends the log. If that fails, records FAILED.
    func complete(
        _ operation: LiveOperation, status: OperationStatus, error: String?, resultImage: String?, duration: Double,
        imageSize: Int64, record: (Database.Transaction) throws -> Void
    ) {
        func data(_ status: OperationStatus, _ error: String?, _ image: String?) -> JSON {
            .object([
                ("status", .string(status.rawValue)), ("result_image_uuid", .optional(image)),
                ("error", .optional(error)),
                ("duration_ms", .int(Int64(duration * 1000))), ("image_size_bytes", .int(image == nil ? 0 : imageSize)),
            ])
        }
        do {
            try operation.emit("completion", spid: 0, data(status, error, resultImage), alongside: record)
        } catch {
            let message = "the operation's result could not be recorded (\(error)); run it again"
            try? operation.emit("completion", spid: 0, data(.failed, message, nil)) { tx in
                _ = try tx.query(
                    "UPDATE api_operations SET status = ?, error = ?, ended = ? WHERE uuid = ?",
                    [
                        .text(OperationStatus.failed.rawValue), .text(message), .real(Timestamp.now),
                        .text(operation.uuid),
                    ])
            }
        }
        operation.finish()
    }

    private func finish(
        _ plan: SpawnPlan, _ operation: LiveOperation, result: RunResult, image: ImageRecord, created: Double
    ) {
        let record = result.record
        let metrics = record.metrics
        operation.emitTruncation(spid: 1)
        let exitCode = record.exitCode.map(Int.init) ?? -1
        let signal = record.signal.map(Int.init) ?? (record.timedOut || record.cancelled ? Int(SIGKILL) : 0)
        operation.emit(
            "exit", spid: 1,
            .object([
                ("pid", .int(2)), ("code", .int(exitCode)), ("signal", .int(signal)), ("core_dump", .bool(false)),
                ("timed_out", .bool(record.timedOut)), ("duration_ms", .int(Int64(metrics.wallSeconds * 1000))),
                ("resources", OperationManager.eventResources(metrics)),
            ]))
        let now = Timestamp.now
        operation.emit(
            "shutdown", spid: 0,
            .object([
                ("stopped_at", .string(Timestamp.iso(now))),
                ("reason", .string(record.timedOut ? "timeout" : record.cancelled ? "signal" : "job_complete")),
            ]))

        var status = OperationStatus.success
        var error: String?
        var resultImage = record.resultImage
        if record.cancelled {
            status = .cancelled
            error = operation.cancelReason ?? "cancelled"
        } else if record.timedOut {
            // Like a non-zero exit, a timeout is the command's outcome (state.timed_out, the
            // exit event): the operation succeeded, and nothing of the run is kept.
            resultImage = nil
        } else if let discarded = record.discarded {
            status = .failed
            error = discarded
            resultImage = nil
        }
        if status != .success { resultImage = nil }
        let instanceResult = OperationManager.instanceResult(
            exitCode: exitCode, signal: signal, timedOut: record.timedOut, metrics: metrics,
            stdout: result.stdout, stdoutTruncated: result.stdoutDropped > 0, stderr: result.stderr,
            stderrTruncated: result.stderrDropped > 0)
        var imageSize: Int64 = 0
        if let resultImage, let resultRecord = try? api.store.image(resultImage) { imageSize = resultRecord.size }
        let namespace = plan.token.name
        let duration = now - created
        complete(
            operation, status: status, error: error, resultImage: resultImage, duration: duration, imageSize: imageSize
        ) { tx in
            if let resultImage {
                try api.adopt(resultImage, namespace: namespace, operation: plan.uuid, tx: tx)
            }
            _ = try tx.query(
                """
                UPDATE api_operations SET status = ?, error = ?, ended = ?, image = ?, result_image = ?, metadata = ?,
                    result = ?, cpu = ?, memory = ?, image_size = ? WHERE uuid = ?
                """,
                [
                    .text(status.rawValue), error.sql, .real(now), .text(image.uuid), resultImage.sql,
                    .text(plan.metadata(image: image.uuid).serialized()), .text(instanceResult.serialized()),
                    .real(metrics.cpuUserSeconds + metrics.cpuSystemSeconds), .integer(metrics.peakMemoryBytes),
                    .integer(imageSize), .text(plan.uuid),
                ])
        }
    }

    /// Starts one more process in a running instance (`POST .../subprocesses`); returns its spid.
    func startSubprocess(_ operation: LiveOperation, _ body: ExecRequestBody) throws -> Int {
        guard operation.isRunning, operation.control.isRunning else {
            throw APIError(
                .tooEarly, "the instance is not running yet (or has just ended); retry shortly", retryAfter: 1)
        }
        let process = try ProcessFields(
            command: body.command, args: body.args ?? [], truncate: body.truncateOutputAt, uid: body.uid,
            gid: body.gid, cwd: body.cwd, stdin: body.stdin, env: body.env)
        let (truncate, uid, gid, stdinPayload, stdin) = (
            process.truncate, process.uid, process.gid, process.stdinPayload, process.stdin
        )
        let defaults = operation.imageDefaults
        let cwd = process.cwd ?? defaults.cwd
        let shell = body.shell ?? false
        let args = body.args ?? []
        var env = ProcessFields.environment(image: defaults.env, shell: shell, request: process.env)
        if env["PATH"] == nil { env["PATH"] = ImageConfig.defaultPath }

        let (spid, control) = try operation.addSubprocess()
        let request = JSON.object([
            ("command", .string(body.command)), ("args", .array(args.map(JSON.string))), ("shell", .bool(shell)),
            ("cwd", .string(cwd)), ("uid", .int(uid)), ("gid", .int(gid)), ("truncate_output_at", .int(truncate)),
        ])
        try api.database.query(
            "INSERT INTO api_subprocesses(operation, spid, request) VALUES(?, ?, ?)",
            [.text(operation.uuid), .integer(Int64(spid)), .text(request.serialized())])
        var input = InputSource.null
        var pipeRead: Int32 = -1
        if stdinPayload.close == false {
            let pipe = try FileSystem.makePipe()
            pipeRead = pipe.read
            input = .fileDescriptor(pipe.read)
            operation.openStdin(spid: spid, pipe.write, initial: stdin)
            if !stdin.isEmpty { Task { try? await operation.writeStdin(spid: spid, [], close: false) } }
        } else if !stdin.isEmpty {
            input = .bytes(stdin)
        }
        operation.emit(
            "spawn", spid: spid,
            .object([
                ("pid", .int(0)), ("command", .string(body.command)), ("args", .array(args.map(JSON.string))),
                ("shell", .bool(shell)), ("cwd", .string(cwd)), ("uid", .int(uid)), ("gid", .int(gid)),
                ("timeout", .int(0)), ("truncate_at", .int(truncate)),
            ]))
        let spec = ExecSpec(
            command: shell ? ["/bin/sh", "-c", body.command] : [body.command] + args,
            environment: env.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }, cwd: cwd,
            uid: UInt32(uid), gid: UInt32(gid), stdin: input,
            stdout: .capture(limit: truncate, onChunk: { operation.output(spid: spid, 0, $0, limit: truncate) }),
            stderr: .capture(limit: truncate, onChunk: { operation.output(spid: spid, 1, $0, limit: truncate) }))
        var controlled = spec
        controlled.control = control
        let task = Task {
            defer {
                operation.closeStdin(spid: spid)
                if pipeRead >= 0 { close(pipeRead) }
                operation.subprocessEnded(spid)
            }
            let outcome: ExecOutcome
            do {
                outcome = try await operation.control.exec(controlled)
            } catch {
                var failed = ExecOutcome()
                failed.exitCode = nil
                failed.stderr = Array("contree: \(APIError.from(error).message)\n".utf8)
                outcome = failed
            }
            operation.emitTruncation(spid: spid)
            let exitCode = outcome.exitCode.map(Int.init) ?? -1
            let signal = outcome.signal.map(Int.init) ?? 0
            var metrics = RunMetrics()
            metrics.wallSeconds = outcome.wallSeconds
            let result = OperationManager.instanceResult(
                exitCode: exitCode, signal: signal, timedOut: outcome.timedOut, metrics: metrics,
                stdout: outcome.stdout, stdoutTruncated: outcome.stdoutDropped > 0, stderr: outcome.stderr,
                stderrTruncated: outcome.stderrDropped > 0)
            // The result is recorded with the exit event: a GET after `exit` sees it.
            try? operation.emit(
                "exit", spid: spid,
                .object([
                    ("pid", .int(0)), ("code", .int(exitCode)), ("signal", .int(signal)), ("core_dump", .bool(false)),
                    ("timed_out", .bool(outcome.timedOut)), ("duration_ms", .int(Int64(outcome.wallSeconds * 1000))),
                    ("resources", OperationManager.eventResources(metrics)),
                ])
            ) { tx in
                _ = try tx.query(
                    "UPDATE api_subprocesses SET result = ? WHERE operation = ? AND spid = ?",
                    [.text(result.serialized()), .text(operation.uuid), .integer(Int64(spid))])
            }
        }
        operation.trackSubprocess(spid, task)
        return spid
    }

    static func eventResources(_ m: RunMetrics) -> JSON {
        .object([
            ("user_time_us", .int(Int64(m.cpuUserSeconds * 1e6))),
            ("sys_time_us", .int(Int64(m.cpuSystemSeconds * 1e6))),
            ("max_rss_kb", .int(m.peakMemoryBytes / 1024)), ("shared_memory", .int(0)), ("unshared_memory", .int(0)),
            ("swaps", .int(0)), ("minor_faults", .int(0)), ("major_faults", .int(0)),
            ("voluntary_ctx_switches", .int(0)), ("involuntary_ctx_switches", .int(0)),
            ("block_input_ops", .int(m.bytesRead / 512)), ("block_output_ops", .int(m.bytesWritten / 512)),
            ("ipc_msgs_sent", .int(0)), ("ipc_msgs_received", .int(0)), ("signals_received", .int(0)),
        ])
    }

    /// `InstanceResult`: all 16 resource keys and 7 state keys the SDK requires.
    static func instanceResult(
        exitCode: Int, signal: Int, timedOut: Bool, metrics m: RunMetrics, stdout: [UInt8], stdoutTruncated: Bool,
        stderr: [UInt8], stderrTruncated: Bool
    ) -> JSON {
        .object([
            (
                "resources",
                .object([
                    ("block_input", .int(m.bytesRead / 512)), ("block_output", .int(m.bytesWritten / 512)),
                    ("cost", .double(0)), ("elapsed_time", .double(m.wallSeconds)),
                    ("involuntary_switches", .int(0)), ("max_rss", .int(m.peakMemoryBytes / 1024)),
                    ("monotonic_time", .double(m.wallSeconds)), ("page_faults", .int(0)), ("page_faults_io", .int(0)),
                    ("shared_memory", .int(0)), ("signals", .int(signal == 0 ? 0 : 1)), ("swaps", .int(0)),
                    ("system_cpu_time", .double(m.cpuSystemSeconds)), ("unshared_memory", .int(0)),
                    ("user_cpu_time", .double(m.cpuUserSeconds)), ("voluntary_switches", .int(0)),
                ])
            ),
            (
                "state",
                .object([
                    ("continued", .bool(false)), ("core_dump", .bool(false)), ("exit_code", .int(exitCode)),
                    ("pid", .int(2)), ("signal", .int(signal)), ("stopped", .bool(false)),
                    ("timed_out", .bool(timedOut)),
                ])
            ),
            ("stdout", StreamValue(stdout, truncated: stdoutTruncated).json),
            ("stderr", StreamValue(stderr, truncated: stderrTruncated).json),
        ])
    }
}
