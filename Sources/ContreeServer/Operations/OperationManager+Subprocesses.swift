import FoundationEssentials
import Glibc
import ImageStore
import Registry
import Sandbox
import Synchronization
import SystemSupport

extension OperationManager {
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
            let outcome: CommandOutcome
            do {
                outcome = try await operation.control.exec(controlled)
            } catch {
                var failed = CommandOutcome()
                failed.stderr = Array("contree: \(APIError.from(error).message)\n".utf8)
                outcome = failed
            }
            operation.emitTruncation(spid: spid)
            let exitCode = outcome.termination.exitCode.map(Int.init) ?? -1
            let signal = outcome.termination.signal.map(Int.init) ?? 0
            let metrics = outcome.metrics  // a command started in a sandbox measures its wall time
            let result = OperationManager.instanceResult(
                exitCode: exitCode, signal: signal, timedOut: outcome.termination.timedOut, metrics: metrics,
                stdout: outcome.stdout, stdoutTruncated: outcome.stdoutDropped > 0, stderr: outcome.stderr,
                stderrTruncated: outcome.stderrDropped > 0)
            // The result is recorded with the exit event: a GET after `exit` sees it.
            try? operation.emit(
                "exit", spid: spid,
                .object([
                    ("pid", .int(0)), ("code", .int(exitCode)), ("signal", .int(signal)), ("core_dump", .bool(false)),
                    ("timed_out", .bool(outcome.termination.timedOut)),
                    ("duration_ms", .int(Int64(outcome.metrics.wallSeconds * 1000))),
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
}
