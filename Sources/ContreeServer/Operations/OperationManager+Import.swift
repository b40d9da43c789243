import FoundationEssentials
import Glibc
import ImageStore
import Registry
import Sandbox
import Synchronization
import SystemSupport

extension OperationManager {
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
            let work = Task { try await BlockingPool.shared.run { try importer.importImage(url) } }
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
}
