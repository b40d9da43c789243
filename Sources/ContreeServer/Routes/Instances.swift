import FoundationEssentials
import HTTPTypes
import Hummingbird
import Registry
import Sandbox

extension ServerState {
    /// `POST /v1/instances`: validates everything up front (bad input is a 400 or 404 and
    /// starts nothing), records the operation and starts it.
    func spawn(_ call: APICall) async throws -> Response {
        let body = try await decode(SpawnRequest.self, from: call)
        return try start(try makePlan(body, call: call))
    }

    /// Starts a planned spawn and answers as `POST /v1/instances` does (201, the operation).
    func start(_ plan: SpawnPlan) throws -> Response {
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
        let process = try ProcessFields(
            command: body.command, args: body.args ?? [], truncate: body.truncateOutputAt, uid: body.uid,
            gid: body.gid, cwd: body.cwd, stdin: body.stdin, env: body.env)
        guard let reference = body.image else { throw APIError(.badRequest, "invalid request body: image is required") }
        let image = try resolveSpawnImage(reference, token: call.token)

        let timeout = body.timeout ?? token.maxTimeout
        guard timeout > 0 else { throw APIError(.badRequest, "timeout must be a positive number of seconds") }
        guard timeout <= token.maxTimeout else {
            throw APIError(
                .badRequest,
                "timeout \(timeout) s is beyond this token's limit of \(token.maxTimeout) s (GET /v1/whoami shows the limits)"
            )
        }
        let hostname = body.hostname ?? "linuxkit"
        guard (1...64).contains(hostname.utf8.count),
            hostname.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == ".") })
        else {
            throw APIError(.badRequest, "hostname '\(hostname)' must be 1 to 64 letters, digits, '-' or '.'")
        }

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

        let maxLayer = body.resourcesLimits?.maxLayerBytes ?? token.maxLayerBytes
        guard maxLayer > 0, maxLayer <= token.maxLayerBytes else {
            throw APIError(
                .badRequest, "resources_limits.max_layer_bytes must be from 1 to this token's \(token.maxLayerBytes)")
        }
        return SpawnPlan(
            uuid: UUID().uuidString.lowercased(), token: token, image: image, command: body.command,
            args: body.args ?? [], shell: body.shell ?? false, env: process.env, cwd: process.cwd, files: files,
            fileRequests: fileRequests, timeout: timeout, hostname: hostname, disposable: body.disposable ?? false,
            stdin: process.stdin, stdinText: process.stdinPayload, keepStdinOpen: process.stdinPayload.close == false,
            truncateAt: process.truncate,
            network: body.networking?.enabled == false ? .none : (token.allowEgress ? .egress : .loopback),
            uid: process.uid, gid: process.gid,
            preserveEnv: body.preserveEnv ?? false, preserveCwd: body.preserveCwd ?? false, maxLayerBytes: maxLayer)
    }

    /// A spawn's image: an image of the namespace or a built-in one, by UUID, `tag:NAME` or tag.
    private func resolveSpawnImage(_ reference: String, token: Token) throws -> SpawnPlan.ImageTarget {
        let namespace = token.name
        var ref = reference.trimmingCharacters(in: .whitespaces)
        guard !ref.isEmpty else { throw APIError(.badRequest, "image is empty; send an image UUID or tag:NAME") }
        if APIStore.isUUID(ref.lowercased()) { return .record(try api.visibleImage(ref, namespace: namespace)) }
        // Registry references only: a path on this machine (oci:DIR) is not the API's to read.
        if ref.hasPrefix("docker://") {
            _ = try RegistryReference(parsing: ref)
            try checkImport(ref, token: token)
            return .external(ref)
        }
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

/// What a spawn and an exec share, validated: output cap, user, working directory, stdin, env.
struct ProcessFields {
    var truncate: Int
    var uid: Int
    var gid: Int
    var cwd: String?
    var stdinPayload: StdinPayload
    var stdin: [UInt8]
    var env: [String: String?]

    /// The most bytes a command, its arguments and environment may take together (the kernel
    /// allows 2 MiB for a command line and environment; what is stored with the operation is
    /// bounded too), the most environment variables, and the most stdin a request may carry.
    static let maxCommandLineBytes = 1 << 20
    static let maxEnvironmentEntries = 4096
    static let maxStdinBytes = 16 << 20

    init(
        command: String, args: [String] = [], truncate: Int?, uid: Int?, gid: Int?, cwd: String?,
        stdin: StdinPayload?, env: [String: String?]?
    ) throws {
        let envBytes = (env ?? [:]).reduce(0) { $0 + $1.key.utf8.count + ($1.value?.utf8.count ?? 0) + 2 }
        let commandLine = command.utf8.count + args.reduce(0) { $0 + $1.utf8.count + 1 } + envBytes
        guard commandLine <= ProcessFields.maxCommandLineBytes, (env?.count ?? 0) <= ProcessFields.maxEnvironmentEntries
        else {
            throw APIError(
                .badRequest,
                "command, args and env take \(commandLine) bytes in \(env?.count ?? 0) variables; at most \(ProcessFields.maxCommandLineBytes) bytes and \(ProcessFields.maxEnvironmentEntries) variables: pass large data as a file or on stdin"
            )
        }
        guard !command.trimmingCharacters(in: .whitespaces).isEmpty else {
            throw APIError(.badRequest, "command is empty; send the command to run")
        }
        guard !command.contains("\0") else { throw APIError(.badRequest, "command contains a NUL byte") }
        self.truncate = truncate ?? ServerState.defaultTruncate
        guard (1...ServerState.maxTruncate).contains(self.truncate) else {
            throw APIError(.badRequest, "truncate_output_at must be from 1 to \(ServerState.maxTruncate) bytes")
        }
        self.uid = uid ?? 0
        self.gid = gid ?? 0
        guard (0..<65536).contains(self.uid), (0..<65536).contains(self.gid) else {
            throw APIError(.badRequest, "uid and gid must be from 0 to 65535")
        }
        if let cwd, !cwd.isEmpty { self.cwd = try ServerState.sandboxPath(cwd, field: "cwd") }
        stdinPayload = stdin ?? StdinPayload(value: "", encoding: "ascii", close: true)
        self.stdin = try stdinPayload.bytes()
        guard self.stdin.count <= ProcessFields.maxStdinBytes else {
            throw APIError(
                .contentTooLarge,
                "stdin holds \(self.stdin.count) bytes, more than \(ProcessFields.maxStdinBytes); upload it (POST /v1/files) and map it in with files"
            )
        }
        self.env = [:]
        for (key, value) in env ?? [:] {
            guard !key.isEmpty, !key.contains("="), !key.contains("\0"), !(value?.contains("\0") ?? false) else {
                throw APIError(.badRequest, "env: '\(key)' is not a valid variable name")
            }
            self.env[key] = value
        }
    }

    /// The command's environment: the image's under a shell (the spec), then the request's,
    /// where null unsets.
    static func environment(image: [String], shell: Bool, request: [String: String?]) -> [String: String] {
        var env = shell ? ProcessFields.dictionary(image) : [:]
        for (key, value) in request { env[key] = value }
        return env
    }

    /// `KEY=VALUE` entries as a dictionary.
    static func dictionary(_ entries: [String]) -> [String: String] {
        var result: [String: String] = [:]
        for entry in entries {
            let parts = entry.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            result[String(parts[0])] = parts.count > 1 ? String(parts[1]) : ""
        }
        return result
    }
}
