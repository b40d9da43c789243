import FoundationEssentials
import HTTPTypes
import Hummingbird
import Sandbox

extension ServerState {
    /// `POST /v1/instances`: validates everything up front (bad input is a 400 or 404 and
    /// starts nothing), records the operation and starts it.
    func spawn(_ call: APICall) async throws -> Response {
        let body = try await decode(SpawnRequest.self, from: call)
        let plan = try makePlan(body, call: call)
        try operations.spawn(plan)
        var headers = HTTPFields()
        headers[.location] = "/v1/operations/\(plan.uuid)"
        var members: [(String, JSON)] = [("uuid", .string(plan.uuid))]
        if case .object(let metadata) = plan.metadata(image: plan.imageLabel) { members += metadata }
        members.append(("result", .null))
        return .json(.object(members), status: .created, headers: headers)
    }

    func makePlan(_ body: SpawnRequest, call: APICall) throws -> SpawnPlan {
        let token = call.token
        guard !body.command.trimmingCharacters(in: .whitespaces).isEmpty else {
            throw APIError(.badRequest, "command is empty; send the command to run")
        }
        let image = try resolveSpawnImage(body.image, namespace: call.namespace)

        let timeout = body.timeout ?? token.maxTimeout
        guard timeout > 0 else { throw APIError(.badRequest, "timeout must be a positive number of seconds") }
        guard timeout <= token.maxTimeout else {
            throw APIError(
                .badRequest,
                "timeout \(timeout) s is beyond this token's limit of \(token.maxTimeout) s (GET /v1/whoami shows the limits)")
        }
        let truncate = body.truncateOutputAt ?? ServerState.defaultTruncate
        guard (1...ServerState.maxTruncate).contains(truncate) else {
            throw APIError(.badRequest, "truncate_output_at must be from 1 to \(ServerState.maxTruncate) bytes")
        }
        let uid = body.uid ?? 0
        let gid = body.gid ?? 0
        guard (0..<65536).contains(uid), (0..<65536).contains(gid) else {
            throw APIError(.badRequest, "uid and gid must be from 0 to 65535")
        }
        let hostname = body.hostname ?? "linuxkit"
        guard (1...64).contains(hostname.utf8.count),
            hostname.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == ".") })
        else {
            throw APIError(.badRequest, "hostname '\(hostname)' must be 1 to 64 letters, digits, '-' or '.'")
        }
        var cwd: String?
        if let raw = body.cwd, !raw.isEmpty { cwd = try ServerState.sandboxPath(raw, field: "cwd") }

        var files: [FileMapping] = []
        var fileRequests: [(path: String, uuid: String, mode: String)] = []
        for (path, mapping) in (body.files ?? [:]).sorted(by: { $0.key < $1.key }) {
            let target = try ServerState.sandboxPath(path, field: "files")
            guard target != "/" else { throw APIError(.badRequest, "files: '/' is not a file path") }
            guard let row = try api.file(uuid: mapping.uuid, namespace: call.namespace),
                let sha = row["sha256"].string
            else {
                throw APIError.notFound(
                    "files[\(path)]: no uploaded file has uuid \(mapping.uuid) for this token; upload it with POST /v1/files"
                )
            }
            let fileUID = mapping.uid ?? 0
            let fileGID = mapping.gid ?? 0
            guard (0..<65536).contains(fileUID), (0..<65536).contains(fileGID) else {
                throw APIError(.badRequest, "files[\(path)]: uid and gid must be from 0 to 65535")
            }
            let mode = mapping.mode?.bits ?? 0o644
            files.append(
                FileMapping(
                    hostPath: api.blobPath(sha), sandboxPath: target, mode: mode, uid: UInt32(fileUID),
                    gid: UInt32(fileGID)))
            fileRequests.append((target, mapping.uuid, "0" + String(mode, radix: 8)))
        }

        let stdinPayload = body.stdin ?? StdinPayload(value: "", encoding: "ascii", close: true)
        let stdin = try stdinPayload.bytes()
        let maxLayer = body.resourcesLimits?.maxLayerBytes ?? token.maxLayerBytes
        guard maxLayer > 0, maxLayer <= token.maxLayerBytes else {
            throw APIError(
                .badRequest, "resources_limits.max_layer_bytes must be from 1 to this token's \(token.maxLayerBytes)")
        }
        var env: [String: String?] = [:]
        for (key, value) in body.env ?? [:] {
            guard !key.isEmpty, !key.contains("="), !key.contains("\0"), !(value?.contains("\0") ?? false) else {
                throw APIError(.badRequest, "env: '\(key)' is not a valid variable name")
            }
            env[key] = value
        }
        let shell = body.shell ?? false
        if !shell, body.command.contains("\0") { throw APIError(.badRequest, "command contains a NUL byte") }
        return SpawnPlan(
            uuid: UUID().uuidString.lowercased(), token: token, image: image, command: body.command,
            args: body.args ?? [], shell: shell, env: env, cwd: cwd, files: files, fileRequests: fileRequests,
            timeout: timeout, hostname: hostname, disposable: body.disposable ?? false, stdin: stdin,
            stdinText: stdinPayload, keepStdinOpen: stdinPayload.close == false, truncateAt: truncate,
            network: body.networking?.enabled == false ? .none : .loopback, uid: uid, gid: gid,
            preserveEnv: body.preserveEnv ?? false, preserveCwd: body.preserveCwd ?? false, maxLayerBytes: maxLayer)
    }

    /// A spawn's image: an image of the namespace or a built-in one, by UUID, `tag:NAME` or tag.
    private func resolveSpawnImage(_ reference: String, namespace: String) throws -> SpawnPlan.ImageTarget {
        var ref = reference.trimmingCharacters(in: .whitespaces)
        guard !ref.isEmpty else { throw APIError(.badRequest, "image is empty; send an image UUID or tag:NAME") }
        if APIStore.isUUID(ref.lowercased()) { return .record(try api.visibleImage(ref, namespace: namespace)) }
        if ref.hasPrefix("tag:") { ref.removeFirst(4) }
        if let row = try api.database.query(
            "SELECT image FROM api_tags WHERE namespace = ? AND tag = ?", [.text(namespace), .text(ref)]
        ).first, let uuid = row["image"].string, let record = try api.store.image(uuid) {
            return .record(record)
        }
        if let builtin = APIStore.builtinName(ref) {
            if let record = try api.store.findImage(builtin), record.origin.hasPrefix("builtin:") {
                return .record(record)
            }
            return .builtin(builtin)
        }
        throw APIError.notFound(
            "image '\(reference)' was not found: no image of this token has this tag, and it is not a built-in image (busybox, debian:bookworm)"
        )
    }

    /// An absolute path inside the sandbox, normalized. - Throws: 400 for a relative path or
    /// one that climbs with `..`.
    static func sandboxPath(_ raw: String, field: String) throws -> String {
        guard raw.hasPrefix("/") else { throw APIError(.badRequest, "\(field): '\(raw)' must be an absolute path") }
        let parts = raw.split(separator: "/").filter { $0 != "." }
        guard !parts.contains("..") else {
            throw APIError(.badRequest, "\(field): '\(raw)' contains '..'; paths may not climb out of their directory")
        }
        guard !raw.contains("\0") else { throw APIError(.badRequest, "\(field): the path contains a NUL byte") }
        return "/" + parts.joined(separator: "/")
    }
}
