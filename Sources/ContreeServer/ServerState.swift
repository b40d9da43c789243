import FoundationEssentials
import Hummingbird
import Registry
import Sandbox
import SystemSupport

/// What the handlers share: the tokens, the store's API tables, the operations.
final class ServerState: Sendable {
    let tokens: TokenFile
    let api: APIStore
    let operations: OperationManager
    /// `GET /metrics`, when `serve --metrics` asked for it.
    let metrics: MetricsEndpoint?
    /// Event streams open per namespace.
    let streams = StreamSlots(perNamespace: 32)
    /// Largest accepted JSON body (a spawn's stdin travels in it).
    static let maxJSONBody = 64 << 20
    /// Largest output cap a spawn may ask for.
    static let maxTruncate = 10 << 20
    static let defaultTruncate = 1 << 20

    init(
        tokens: TokenFile, engine: SandboxEngine, isolation: IsolationKind = .container,
        registries: RegistryAccess = .allowlistClosed, metrics: MetricsOptions? = nil
    ) throws {
        self.tokens = tokens
        self.api = try APIStore(store: engine.store, baseImages: engine.baseImages)
        self.metrics = metrics.map { [api] in
            MetricsEndpoint(options: $0, api: api, namespaces: Array(Set(tokens.tokens.map(\.name))).sorted())
        }
        self.operations = OperationManager(api: api, engine: engine, isolation: isolation, registries: registries)
    }

    /// Refuses an import (or a spawn naming a registry image) the token may not make, or from a
    /// registry the operator did not allow: 403 before any operation exists.
    func checkImport(_ reference: String, token: Token) throws {
        guard token.canImport else {
            throw APIError(
                .forbidden,
                "this token may not import images (whoami: permissions.import is false); its operator grants it with import=1 in the tokens file"
            )
        }
        do {
            try operations.registries.check(try RegistryReference(parsing: reference))
        } catch let error as SandboxError {
            throw APIError(.forbidden, error.message)
        }
    }

    /// Decodes a JSON body. - Throws: 400 naming the bad field.
    func decode<T: Decodable>(_ type: T.Type, from call: APICall) async throws -> T {
        var request = call.request
        let buffer: ByteBuffer
        do {
            buffer = try await request.collectBody(upTo: ServerState.maxJSONBody)
        } catch {
            throw APIError(.contentTooLarge, "the request body is larger than \(ServerState.maxJSONBody) bytes")
        }
        let bytes = Array(buffer.readableBytesView)
        guard !bytes.isEmpty else { throw APIError(.badRequest, "the request body is empty; send a JSON object") }
        if let key = JSONDuplicateKeys.first(in: bytes) {
            throw APIError(.badRequest, "the request body names '\(key)' twice; send each key once")
        }
        do {
            return try JSONDecoder().decode(T.self, from: Data(bytes))
        } catch let error as DecodingError {
            throw APIError(.badRequest, APIError.describe(error))
        }
    }

    func whoami(_ call: APICall) throws -> Response {
        let token = call.token
        let rows = try api.database.query(
            "SELECT status, COUNT(*) AS n FROM api_operations WHERE namespace = ? GROUP BY status",
            [.text(token.name)])
        let stats = JSON.object(rows.map { ($0["status"].string ?? "", .int($0["n"].int ?? 0)) })
        let permissions = ["import", "spawn", "spawn_disposable", "list", "cancel", "set_image_tag", "upload"]
        // Imports are accepted when the token may import and the operator allowed a registry.
        let imports = token.canImport && !operations.registries.isClosed
        return .json(
            .object([
                ("token_uuid", .string(token.uuid)), ("token_expiration", .null), ("name", .string(token.name)),
                ("permissions", .object(permissions.map { ($0, .bool($0 != "import" || imports)) })),
                (
                    "limits",
                    .object([
                        ("instance_max_concurrency", .int(token.maxConcurrency)),
                        ("instance_max_timeout", .int(token.maxTimeout)),
                        ("instance_max_layer_bytes", .int(token.maxLayerBytes)),
                        ("instance_max_truncate_output_at", .int(ServerState.maxTruncate)),
                        ("instance_memory_bytes", .int(token.memoryBytes)), ("instance_cpus", .double(token.cpus)),
                        ("instance_pids", .int(Int64(token.pids))),
                        ("files_max_upload_bytes", .int(token.maxUploadBytes)),
                        ("files_quota_bytes", .int(token.uploadQuotaBytes)),
                        ("images_import_max_concurrency", .int(0)), ("images_import_max_timeout", .int(0)),
                    ])
                ),
                ("operations_stat", stats),
            ]))
    }
}
