import FoundationEssentials
import HTTPTypes
import Hummingbird
import ImageStore
import SystemSupport

/// One request, authenticated: its token, path segments after `/v1`, and query.
struct APICall: Sendable {
    let request: Request
    let token: Token
    /// Percent-decoded segments after `/v1`; `trailingSlash` tells `/inspect/` from `/inspect`.
    let segments: [String]
    let trailingSlash: Bool
    let query: [String: String]
    /// Every `key=value` pair in order (for repeated parameters).
    let pairs: [(String, String)]

    var namespace: String { token.name }

    func param(_ name: String) -> String? { query[name] }
    func params(_ name: String) -> [String] { pairs.filter { $0.0 == name }.map(\.1) }

    /// An integer query parameter within bounds. - Throws: 400 naming it.
    func intParam(_ name: String, default value: Int, range: ClosedRange<Int>) throws -> Int {
        guard let raw = query[name], !raw.isEmpty else { return value }
        guard let number = Int(raw), range.contains(number) else {
            throw APIError(
                .badRequest, "\(name)=\(raw) must be an integer from \(range.lowerBound) to \(range.upperBound)")
        }
        return number
    }

    /// `?flag`, `?flag=1`, `?flag=true` are on; absent, `0`, `false` are off.
    func flag(_ name: String) -> Bool {
        guard let raw = query[name] else { return false }
        return !["0", "false", "no"].contains(raw.lowercased())
    }

    /// Appends the `since`/`until` window on `created`, newest first, and `limit`/`offset`.
    func windowAndPage(_ sql: inout String, _ bindings: inout [SQLValue]) throws {
        let limit = try intParam("limit", default: 100, range: 1...1000)
        let offset = try intParam("offset", default: 0, range: 0...Int(Int32.max))
        if let since = try timeFilter("since") {
            sql += " AND created >= ?"
            bindings.append(.real(since))
        }
        if let until = try timeFilter("until") {
            sql += " AND created <= ?"
            bindings.append(.real(until))
        }
        sql += " ORDER BY created DESC LIMIT ? OFFSET ?"
        bindings += [.integer(Int64(limit)), .integer(Int64(offset))]
    }

    func timeFilter(_ name: String) throws -> Double? {
        guard let raw = query[name], !raw.isEmpty else { return nil }
        return try Timestamp.parseFilter(raw, name: name)
    }
}

/// The ConTree `/v1` API: authenticates each request with a bearer token, dispatches it, and
/// answers every error in the spec's shape.
struct APIResponder: HTTPResponder {
    typealias Context = BasicRequestContext
    let server: ServerState

    func respond(to request: Request, context: Context) async throws -> Response {
        do {
            return try await dispatch(request)
        } catch {
            let failure = APIError.from(error)
            if failure.status == .internalServerError {
                context.logger.error("\(request.method) \(request.uri.path): \(failure.message)")
            }
            return try failure.response(from: request, context: context)
        }
    }

    private func dispatch(_ request: Request) async throws -> Response {
        let path = request.uri.path
        if path == "/metrics", let metrics = server.metrics {
            guard request.method == .get || request.method == .head else {
                throw APIError(.methodNotAllowed, "/metrics answers GET")
            }
            return try await BlockingPool.shared.run { try metrics.respond(request) }
        }
        let extensionPrefix = "/x-contree"
        let isExtension = path.hasPrefix(extensionPrefix + "/")
        guard path == "/v1" || path.hasPrefix("/v1/") || isExtension else {
            throw APIError(.notFound, "no such endpoint \(path): the API lives under /v1 (extensions under /x-contree)")
        }
        let token = try authenticate(request)
        let rest = path.dropFirst(isExtension ? extensionPrefix.count : 3)
        let segments = rest.split(separator: "/").map { String($0).removingPercentEncoding ?? String($0) }
        let call = APICall(
            request: request, token: token, segments: segments, trailingSlash: rest.hasSuffix("/") && rest.count > 1,
            query: Dictionary(APIResponder.parseQuery(request.uri.query), uniquingKeysWith: { _, last in last }),
            pairs: APIResponder.parseQuery(request.uri.query))
        let method = request.method
        let s = segments
        if isExtension {
            // Memory snapshots (docs/serve.md): outside the spec's paths, so clients never meet them.
            switch (s.first ?? "", s.count) {
            case ("instances", 3) where s[2] == "snapshot" && method == .post:
                return try await server.snapshotInstance(call, s[1])
            case ("images", 3) where s[2] == "resume" && method == .post:
                return try await server.resumeImage(call, s[1])
            default:
                throw APIError(
                    .notFound,
                    "no such extension endpoint \(path): POST /x-contree/instances/{id}/snapshot or /x-contree/images/{uuid}/resume"
                )
            }
        }
        switch (s.first ?? "", s.count) {
        case ("whoami", 1) where method == .get: return try server.whoami(call)
        case ("images", 1) where method == .get: return try server.listImages(call)
        case ("images", 2) where s[1] == "import" && method == .post: return try await server.importImage(call)
        case ("images", 3) where s[2] == "tag" && method == .patch: return try await server.setTag(call, image: s[1])
        case ("images", 3) where s[2] == "tag" && method == .delete: return try server.removeTag(call, image: s[1])
        case ("files", 1) where method == .post: return try await server.upload(call)
        case ("files", 1) where method == .get: return try server.listFiles(call)
        case ("files", 2) where method == .get || method == .head: return try server.file(call, sha256: s[1])
        case ("files", 2) where method == .delete: return try server.deleteFile(call, s[1])
        case ("instances", 1) where method == .post: return try await server.spawn(call)
        case ("operations", 1) where method == .get: return try server.listOperations(call)
        case ("operations", 2) where method == .get: return try server.operation(call, s[1])
        case ("operations", 2) where method == .delete: return try server.cancel(call, s[1])
        case ("operations", 3) where s[2] == "events" && method == .get: return try server.events(call, s[1])
        case ("operations", 3) where s[2] == "subprocesses" && method == .post:
            return try await server.execSubprocess(call, s[1])
        case ("operations", 4) where s[2] == "subprocesses" && method == .get:
            return try server.subprocess(call, s[1], spid: s[3])
        case ("operations", 4) where s[2] == "subprocesses" && method == .delete:
            return try server.kill(call, s[1], spid: s[3])
        case ("operations", 5) where s[2] == "subprocesses" && s[4] == "stdin" && method == .post:
            return try await server.stdin(call, s[1], spid: s[3])
        case ("inspect", 1) where method == .get:
            if !call.trailingSlash {
                return APIResponder.redirect(
                    .temporaryRedirect, "/v1/inspect/" + (request.uri.query.map { "?" + $0 } ?? ""))
            }
            return try server.findByTag(call)
        case ("inspect", 2) where method == .get:
            if !call.trailingSlash { return APIResponder.redirect(.temporaryRedirect, "/v1/inspect/\(s[1])/") }
            return try server.inspectImage(call, s[1])
        case ("inspect", 3) where method == .get || method == .head:
            switch s[2] {
            case "download": return try server.download(call, s[1])
            case "archive": return try await server.archive(call, s[1])
            case "list" where method == .get: return try server.list(call, s[1])
            case "grep" where method == .get: return try await server.grep(call, s[1])
            default: break
            }
        default: break
        }
        throw APIError(.notFound, "no endpoint \(method) \(path); see the ConTree API (openapi.yaml)")
    }

    private func authenticate(_ request: Request) throws -> Token {
        guard let header = request.headers[.authorization], !header.isEmpty else {
            throw APIError(.unauthorized, "missing Authorization header: send Authorization: Bearer <token>")
        }
        let parts = header.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else {
            throw APIError(.unauthorized, "the Authorization header must be 'Bearer <token>'")
        }
        guard let token = server.tokens.token(for: String(parts[1]).trimmingCharacters(in: .whitespaces)) else {
            throw APIError(.unauthorized, "the token is not valid for this server; see the tokens file of `serve`")
        }
        return token
    }

    static func parseQuery(_ query: String?) -> [(String, String)] {
        var result: [(String, String)] = []
        for pair in (query ?? "").split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(parts[0]).removingPercentEncoding ?? String(parts[0])
            let value = parts.count > 1 ? (String(parts[1]).removingPercentEncoding ?? String(parts[1])) : ""
            result.append((key, value))
        }
        return result
    }

    static func redirect(_ status: HTTPResponse.Status, _ location: String) -> Response {
        var headers = HTTPFields()
        headers[.location] = location
        headers[.contentLength] = "0"
        return Response(status: status, headers: headers)
    }
}

extension Response {
    static func json(
        _ value: JSON, status: HTTPResponse.Status = .ok, headers extra: HTTPFields = HTTPFields()
    ) -> Response {
        var headers = extra
        headers[.contentType] = "application/json"
        return Response(
            status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: value.serialized())))
    }

    static func noContent() -> Response { Response(status: .noContent) }
}
