import Crypto
import FoundationEssentials
import Glibc
import HTTPTypes
import Hummingbird
import Sandbox

extension ServerState {
    /// `POST /v1/files`: the raw body (chunked or not) becomes a blob named by its sha256,
    /// stored once however many namespaces upload it. A sha256 the client claims (`?sha256=`
    /// or `X-Content-SHA256`) must match the body.
    func upload(_ call: APICall) async throws -> Response {
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
        var hasher = SHA256()
        var size: Int64 = 0
        do {
            defer { close(fd) }
            for try await buffer in call.request.body {
                try buffer.withUnsafeReadableBytes { raw in
                    hasher.update(bufferPointer: raw)
                    try FileSystem.writeAll(fd: fd, raw, path: temporary)
                }
                size += Int64(buffer.readableBytes)
            }
            guard fsync(fd) == 0 else { throw SandboxError.system("fsync(\(temporary))") }
        }
        let sha256 = hasher.finalize().map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
        if let claimed, claimed != sha256 {
            throw APIError(
                .badRequest,
                "the body's sha256 is \(sha256), not the claimed \(claimed): the upload was damaged or the claim is wrong; nothing was stored"
            )
        }
        let blob = api.blobPath(sha256)
        if FileSystem.exists(blob) {
            unlink(temporary)
        } else {
            try FileSystem.rename(temporary, blob)
        }
        placed = true
        let row = try api.recordFile(sha256: sha256, size: size, namespace: call.namespace)
        var headers = HTTPFields()
        headers[.location] = "/v1/files/\(sha256)"
        return .json(APIStore.fileJSON(row, full: true), status: .created, headers: headers)
    }

    /// `GET`/`HEAD /v1/files/{sha256}`: 404 when this namespace has not uploaded it.
    func file(_ call: APICall, sha256: String) throws -> Response {
        guard let row = try api.file(sha256: sha256, namespace: call.namespace) else {
            throw APIError.notFound("no file with sha256 \(sha256) was uploaded with this token; upload it with POST /v1/files")
        }
        if call.request.method == .head { return Response(status: .ok) }
        return .json(APIStore.fileJSON(row, full: true))
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
