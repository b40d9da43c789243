import FoundationEssentials
import Glibc
import Registry
import Sandbox
import Synchronization

/// Runs instance operations: queues them per token, runs them on the engine, records their
/// events and results, and answers cancels, signals and stdin.
final class OperationManager: Sendable {
    let api: APIStore
    let engine: SandboxEngine
    let slots = Slots()
    let live = Mutex<[String: LiveOperation]>([:])

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
}
