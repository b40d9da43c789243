import FoundationEssentials
import Glibc
import ImageStore
import Registry
import Sandbox
import Synchronization
import SystemSupport

extension OperationManager {
    func execute(_ plan: SpawnPlan, _ operation: LiveOperation) async {
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
                image = try await BlockingPool.shared.run { try base.resolve(name) }
            case .external(let reference):
                let importer = RegistryImporter(store: api.store, access: registries)
                image = try await BlockingPool.shared.run { try importer.importImage(reference) }
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
        if plan.resume { spec.resume = .required }
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
