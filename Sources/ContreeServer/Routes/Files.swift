import FoundationEssentials
import Glibc
import HTTPTypes
import Hummingbird
import ImageStore
import SystemSupport

extension ServerState {
    /// `POST /v1/files`: the raw body (chunked or not) becomes a blob named by its sha256,
    /// stored once however many namespaces upload it. A sha256 the client claims (`?sha256=`
    /// or `X-Content-SHA256`) must match the body. An upload larger than the token's
    /// `max_upload_bytes`, or past its `upload_quota_bytes`, is refused (413) while it streams.
    func upload(_ call: APICall) async throws -> Response {
        let token = call.token
        let used = try api.uploadedBytes(namespace: call.namespace)
        let room = min(token.maxUploadBytes, token.uploadQuotaBytes - used)
        func tooLarge(_ size: Int64) -> APIError {
            size > token.maxUploadBytes
                ? APIError(
                    .contentTooLarge,
                    "the upload is larger than this token's max_upload_bytes (\(token.maxUploadBytes)); nothing was stored"
                )
                : APIError(
                    .contentTooLarge,
                    "this token's uploads would hold more than its upload_quota_bytes (\(token.uploadQuotaBytes), \(used) in use); remove files with DELETE /v1/files/{uuid}; nothing was stored"
                )
        }
        if let declared = call.request.headers[.contentLength].flatMap({ Int64($0) }), declared > room {
            throw tooLarge(declared)
        }
        let claimed = (call.param("sha256") ?? call.request.headers[HTTPField.Name("X-Content-SHA256")!])?.lowercased()
        if let claimed, claimed.count != 64 || !claimed.allSatisfy(\.isHexDigit) {
            throw APIError(.badRequest, "the claimed sha256 '\(claimed)' is not 64 hex digits")
        }
        let temporary = api.filesPath + "/.upload-" + UUID().uuidString.lowercased()
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SandboxError.system("open(\(temporary))") }
        var placed = false
        defer {
            if !placed { unlink(temporary) }
        }
        var hasher = Digest.Hasher()
        var size: Int64 = 0
        do {
            defer { close(fd) }
            for try await buffer in call.request.body {
                size += Int64(buffer.readableBytes)
                guard size <= room else { throw tooLarge(size) }
                try buffer.withUnsafeReadableBytes { raw in
                    hasher.update(raw)
                    try FileSystem.writeAll(fd: fd, raw, path: temporary)
                }
            }
            guard fsync(fd) == 0 else { throw SandboxError.system("fsync(\(temporary))") }
        }
        let sha256 = hasher.finalize().hex
        if let claimed, claimed != sha256 {
            throw APIError(
                .badRequest,
                "the body's sha256 is \(sha256), not the claimed \(claimed): the upload was damaged or the claim is wrong; nothing was stored"
            )
        }
        // Placing a blob and recording it is one step against a DELETE removing the same blob.
        let row = try api.blobs.withLock { _ in
            let blob = api.blobPath(sha256)
            if FileSystem.exists(blob) {
                unlink(temporary)
            } else {
                try FileSystem.rename(temporary, blob)
            }
            placed = true
            return try api.recordFile(sha256: sha256, size: size, namespace: call.namespace)
        }
        var headers = HTTPFields()
        headers[.location] = "/v1/files/\(sha256)"
        return .json(APIStore.fileJSON(row, full: true), status: .created, headers: headers)
    }

    /// `GET`/`HEAD /v1/files/{sha256}`: 404 when this namespace has not uploaded it.
    func file(_ call: APICall, sha256: String) throws -> Response {
        guard let row = try api.file(sha256: sha256, namespace: call.namespace) else {
            throw APIError.notFound(
                "no file with sha256 \(sha256) was uploaded with this token; upload it with POST /v1/files")
        }
        if call.request.method == .head { return Response(status: .ok) }
        return .json(APIStore.fileJSON(row, full: true))
    }

    /// `DELETE /v1/files/{uuid}` (or `{sha256}`): forgets the namespace's upload; the blob goes
    /// when no namespace holds it any more. Instances already given the file keep their copy.
    func deleteFile(_ call: APICall, _ id: String) throws -> Response {
        let row =
            try (APIStore.isUUID(id.lowercased()) ? api.file(uuid: id, namespace: call.namespace) : nil)
            ?? api.file(sha256: id, namespace: call.namespace)
        guard let row, let sha256 = row["sha256"].string else {
            throw APIError.notFound("no file \(id) was uploaded with this token")
        }
        try api.blobs.withLock { _ in
            let left = try api.database.transaction { tx -> Int64 in
                try tx.query(
                    "DELETE FROM api_files WHERE namespace = ? AND sha256 = ?", [.text(call.namespace), .text(sha256)])
                return try tx.query("SELECT COUNT(*) AS n FROM api_files WHERE sha256 = ?", [.text(sha256)]).first?["n"]
                    .int ?? 0
            }
            if left == 0 { unlink(api.blobPath(sha256)) }
        }
        return Response(status: .noContent)
    }

    /// `GET /v1/files`: the namespace's uploads, newest first.
    func listFiles(_ call: APICall) throws -> Response {
        var sql = "SELECT * FROM api_files WHERE namespace = ?"
        var bindings: [SQLValue] = [.text(call.namespace)]
        try call.windowAndPage(&sql, &bindings)
        let rows = try api.database.query(sql, bindings)
        return .json(.object([("files", .array(rows.map { APIStore.fileJSON($0, full: true) }))]))
    }
}
