import Foundation
import Glibc
import HTTPClient
import ImageFormats
import SystemSupport

/// `docker://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]`.
public struct RegistryReference: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var repository: String
    /// A tag or a `sha256:` digest.
    public var reference: String

    public init(parsing text: String) throws {
        guard text.hasPrefix("docker://") else {
            throw SandboxError(.invalidArgument, "'\(text)' is not a registry reference: write docker://HOST/REPO:TAG")
        }
        let rest = String(text.dropFirst("docker://".count))
        guard let slash = rest.firstIndex(of: "/"), slash != rest.startIndex else {
            throw SandboxError(
                .invalidArgument, "'\(text)' names no registry host: write docker://HOST[:PORT]/REPO:TAG")
        }
        host = String(rest[..<slash])
        var path = String(rest[rest.index(after: slash)...])
        if let at = path.firstIndex(of: "@") {
            reference = String(path[path.index(after: at)...])
            path = String(path[..<at])
            _ = try OCI.checkDigest(reference, what: text)
        } else if let colon = path.lastIndex(of: ":"), !path[colon...].contains("/") {
            reference = String(path[path.index(after: colon)...])
            path = String(path[..<colon])
        } else {
            reference = "latest"
        }
        let validPath = path.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { part in
            !part.isEmpty && part.allSatisfy { $0.isLowercase || $0.isNumber || "._-".contains($0) }
        }
        guard validPath, !reference.isEmpty else {
            throw SandboxError(
                .invalidArgument, "'\(text)': the repository must be lower-case path components, e.g. library/debian")
        }
        repository = path
    }

    /// `docker://HOST[:PORT]/REPOSITORY`, a repository without a tag (the shared step cache
    /// names its own tags in it).
    public init(repository text: String) throws {
        self = try RegistryReference(parsing: text)
        guard text.hasSuffix("/" + repository), !text.contains("@") else {
            throw SandboxError(
                .invalidArgument,
                "'\(text)' names a tag or digest; name the repository alone (docker://HOST[:PORT]/REPO): the cache keeps one tag per step in it"
            )
        }
        reference = ""
    }

    public var description: String {
        "docker://\(host)/\(repository)"
            + (reference.isEmpty ? "" : (reference.hasPrefix("sha256:") ? "@" : ":") + reference)
    }
}

/// Credentials for a registry: `user:password` for basic auth, or to ask a token service.
public struct RegistryCredentials: Sendable {
    public var username: String
    public var password: String

    public init(username: String, password: String) {
        self.username = username
        self.password = password
    }

    var basic: String { "Basic " + Data("\(username):\(password)".utf8).base64EncodedString() }
}

/// A client of the OCI distribution API: answers 401 challenges (Basic, and Bearer through the
/// token service the challenge names), talks https, or plain http to loopback or when allowed.
/// Every request, token realm and redirect stays within `access`; a registry's answer bodies
/// never reach an error message (only the OCI error codes in them).
final class RegistryClient: @unchecked Sendable {
    let reference: RegistryReference
    let credentials: RegistryCredentials?
    let access: RegistryAccess
    let scheme: String
    /// The header the last challenge earned; shared by the requests of concurrent imports.
    private let authorizationLock = NSLock()
    private var storedAuthorization: String?
    private var authorization: String? {
        get { authorizationLock.withLock { storedAuthorization } }
        set { authorizationLock.withLock { storedAuthorization = newValue } }
    }

    /// Stops requests in flight when cancelled (an interrupted import).
    let cancellation: Cancellation?

    /// - Throws: when `access` does not reach the reference's registry.
    init(
        reference: RegistryReference, credentials: RegistryCredentials?, access: RegistryAccess, pushing: Bool = false,
        cancellation: Cancellation? = nil
    ) throws {
        try access.check(reference)
        self.reference = reference
        self.cancellation = cancellation
        self.pushing = pushing
        self.credentials = credentials
        self.access = access
        scheme = access.scheme(for: reference.host)
    }

    /// Where a blob download goes: a file, hashed as the bytes arrive.
    private final class BlobSink {
        let fd: Int32
        let path: String
        var hasher = Digest.Hasher()
        var size: Int64 = 0
        var writeError: (any Error)?
        /// The start of an error answer's body, for its OCI error codes.
        var errorBody = Data()
        let onBytes: (@Sendable (Int64) -> Void)?

        init(fd: Int32, path: String, onBytes: (@Sendable (Int64) -> Void)?) {
            self.fd = fd
            self.path = path
            self.onBytes = onBytes
        }

        /// - Returns: false to stop the transfer (the file cannot be written).
        func receive(_ bytes: UnsafeRawBufferPointer, status: Int) -> Bool {
            guard (200..<300).contains(status) else {
                if errorBody.count < 300 { errorBody.append(contentsOf: bytes.prefix(300 - errorBody.count)) }
                return true
            }
            hasher.update(bytes)
            do {
                try FileSystem.writeAll(fd: fd, bytes, path: path)
            } catch {
                writeError = error
                return false
            }
            size += Int64(bytes.count)
            onBytes?(Int64(bytes.count))
            return true
        }
    }

    var base: String { "\(scheme)://\(reference.host)/v2/\(reference.repository)" }

    /// GET with the auth dance; returns the body and the response.
    func get(_ url: String, accept: [String] = []) throws -> (Data, HTTPResponse) {
        try call("GET", url, headers: accept.isEmpty ? [:] : ["Accept": accept.joined(separator: ", ")])
    }

    /// A request with the auth dance (one retry after a 401 challenge); any 2xx is success,
    /// and `allow` lists other statuses the caller handles itself.
    func call(
        _ method: String, _ url: String, headers: [String: String] = [:], body: Data? = nil, allow: Set<Int> = []
    ) throws -> (Data, HTTPResponse) {
        var attempt = 0
        while true {
            var fields = headers.sorted { $0.key < $1.key }.map { (name: $0.key, value: $0.value) }
            if let authorization { fields.append((name: "Authorization", value: authorization)) }
            let (response, data) = try exchange(method, url, headers: fields, body: body)
            if response.status == 401 && attempt == 0 {
                attempt += 1
                try authenticate(response.header("WWW-Authenticate") ?? "")
                continue
            }
            guard (200..<300).contains(response.status) || allow.contains(response.status) else {
                throw failure(response.status, url: url, body: Data(data))
            }
            return (Data(data), response)
        }
    }

    /// Whether to ask a token service for write access (the bearer scope).
    let pushing: Bool

    /// GETs a blob into a file, hashing the bytes as they arrive; the file appears at `path`
    /// only when they match `digest` (a truncated or altered blob never does).
    func download(
        _ url: String, digest: String, to path: String, onBytes: (@Sendable (Int64) -> Void)? = nil
    ) throws {
        try cancellation?.check()
        let partial = path + ".partial"
        let fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SandboxError.system("open(\(partial))") }
        let sink = BlobSink(fd: fd, path: partial, onBytes: onBytes)
        var keep = false
        defer { if !keep { unlink(partial) } }
        let response: HTTPResponse
        do {
            defer { close(fd) }
            let fields = authorization.map { [(name: "Authorization", value: $0)] } ?? []
            (response, _) = try exchange("GET", url, headers: fields, body: nil, what: "downloading \(digest)") {
                sink.receive($1, status: $0.status)
            }
        } catch {
            if let writeError = sink.writeError { throw writeError }
            throw error
        }
        guard (200..<300).contains(response.status) else {
            throw failure(response.status, url: url, body: sink.errorBody)
        }
        let actual = sink.hasher.finalize().description
        guard actual == digest else {
            throw SandboxError(
                .corrupt,
                "\(reference): the blob \(digest) arrived as \(sink.size) bytes hashing to \(actual) (truncated or altered); nothing was imported"
            )
        }
        try FileSystem.rename(partial, path)
        keep = true
    }

    /// One request, following redirects within `access`: without the registry's authorization
    /// once it leaves the URL's host (blob storage signs its own URLs), never to an address
    /// `access` refuses (that is an error naming why). `onData` sees the body of the final
    /// answer only; without it the body is returned.
    private func exchange(
        _ method: String, _ url: String, headers: [(name: String, value: String)], body: Data?,
        what: String? = nil, onData: ((HTTPResponse, UnsafeRawBufferPointer) -> Bool)? = nil
    ) throws -> (HTTPResponse, [UInt8]) {
        var target = url
        var method = method
        var headers = headers
        var body = body.map { [UInt8]($0) }
        for _ in 0..<10 {
            try cancellation?.check()
            var request = HTTPRequest(method, target, headers: headers, body: body)
            request.idleTimeout = 60
            let transfer = HTTPTransfer()
            let result: Result<(response: HTTPResponse, body: [UInt8]), HTTPFailure> = withCancellation(of: transfer) {
                do throws(HTTPFailure) {
                    return .success(
                        try transfer.perform(
                            request,
                            onData: onData.map { receive in
                                { response, bytes in
                                    RegistryClient.isRedirect(response.status) || receive(response, bytes)
                                }
                            }))
                } catch {
                    return .failure(error)
                }
            }
            try cancellation?.check()
            let response: HTTPResponse
            let data: [UInt8]
            switch result {
            case .success(let answer): (response, data) = answer
            case .failure(let error) where error.kind == .stopped: throw error
            case .failure(let error):
                let path = URL(string: target)?.path ?? ""
                let cause = RegistryError(.transport, path: path, underlying: error)
                if let what {
                    throw SandboxError(.remote, "\(reference): \(what) failed: \(error.description)", cause: cause)
                }
                throw SandboxError(
                    .remote,
                    "\(reference): cannot reach the registry at \(scheme)://\(reference.host) (\(error.description)); is it running, and is the address right?",
                    cause: cause)
            }
            guard RegistryClient.isRedirect(response.status), let location = response.header("Location") else {
                return (response, data)
            }
            guard let from = URL(string: target), let next = URL(string: location, relativeTo: from)?.absoluteURL else {
                throw SandboxError(
                    .invalidArgument, "\(reference): the registry redirected to the unusable address '\(location)'")
            }
            if let why = access.refusal(of: next, from: reference.host) {
                throw SandboxError(
                    .invalidArgument,
                    "\(reference): the registry redirected to an address this client may not follow: \(why)",
                    cause: RegistryError(.redirectRefused, path: from.path))
            }
            if next.host?.lowercased() != from.host?.lowercased() || next.port != from.port {
                headers.removeAll { $0.name.lowercased() == "authorization" }
            }
            if response.status == 303 || (response.status != 307 && response.status != 308 && method == "POST") {
                method = "GET"
                body = nil
            }
            target = next.absoluteString
        }
        throw SandboxError(.remote, "\(reference): the registry redirected more than 10 times from \(url)")
    }

    private static func isRedirect(_ status: Int) -> Bool { [301, 302, 303, 307, 308].contains(status) }

    /// Runs `body` (which performs a transfer) so that a cancellation stops the transfer.
    private func withCancellation<T>(of transfer: HTTPTransfer, _ body: () -> T) -> T {
        guard let cancellation else { return body() }
        return cancellation.whileRunning(onCancel: { transfer.cancel() }, body)
    }

    /// The error for an answer that is not a success. It names the status and the OCI error
    /// codes of the body (`MANIFEST_UNKNOWN`), never the body itself: what a registry (or
    /// whatever answered) wrote is not repeated to whoever asked for the import.
    private func failure(_ status: Int, url: String, body: Data) -> SandboxError {
        let path = URL(string: url)?.path ?? ""
        struct ErrorAnswer: Decodable {
            struct Entry: Decodable { var code: String? }
            var errors: [Entry]?
        }
        let codes = ((try? JSONDecoder().decode(ErrorAnswer.self, from: body))?.errors ?? []).compactMap(\.code)
            .filter { code in !code.isEmpty && code.count <= 64 && code.allSatisfy { $0.isUppercase || $0 == "_" } }
        let detail = codes.isEmpty ? "" : " (\(codes.joined(separator: ", ")))"
        let cause = RegistryError(.status(status), path: path, codes: codes)
        switch status {
        case 401, 403:
            if let credentials {
                return SandboxError(
                    .invalidArgument,
                    "\(reference): the registry refused the credentials of '\(credentials.username)' (\(status)); check the user and password",
                    cause: cause)
            }
            return SandboxError(
                .invalidArgument,
                "\(reference): the registry refused access (\(status)); give credentials (--username/--password or CONTREE_REGISTRY_USER/CONTREE_REGISTRY_PASSWORD)",
                cause: cause)
        case 404:
            return SandboxError(.notFound, "\(reference): not found in the registry (\(path))\(detail)", cause: cause)
        default:
            return SandboxError(
                .remote, "\(reference): the registry answered \(status) for \(path)\(detail)", cause: cause)
        }
    }

    /// Answers a `WWW-Authenticate` challenge.
    private func authenticate(_ challenge: String) throws {
        let lower = challenge.lowercased()
        if lower.hasPrefix("basic") {
            guard let credentials else {
                throw SandboxError(
                    .invalidArgument,
                    "\(reference): the registry needs credentials (basic auth); give --username and --password")
            }
            authorization = credentials.basic
            return
        }
        guard lower.hasPrefix("bearer") else {
            throw SandboxError(
                .unsupported, "\(reference): the registry asks for '\(challenge)', which is not supported")
        }
        var parameters: [String: String] = [:]
        let pattern = /([a-zA-Z_]+)="([^"]*)"/
        for match in challenge.matches(of: pattern) { parameters[String(match.1).lowercased()] = String(match.2) }
        guard let realm = parameters["realm"], var components = URLComponents(string: realm),
            let realmURL = components.url
        else {
            throw SandboxError(.invalidArgument, "\(reference): the registry's bearer challenge names no token realm")
        }
        if let why = access.refusal(of: realmURL, from: reference.host) {
            throw SandboxError(.invalidArgument, "\(reference): the registry's token service may not be asked: \(why)")
        }
        var items = components.queryItems ?? []
        if let service = parameters["service"] { items.append(URLQueryItem(name: "service", value: service)) }
        items.append(
            URLQueryItem(
                name: "scope",
                value: parameters["scope"] ?? "repository:\(reference.repository):\(pushing ? "pull,push" : "pull")"))
        components.queryItems = items
        let fields = credentials.map { [(name: "Authorization", value: $0.basic)] } ?? []
        let (response, data) = try exchange("GET", components.url!.absoluteString, headers: fields, body: nil)
        guard response.status == 200 else { throw failure(response.status, url: realm, body: Data(data)) }
        struct TokenAnswer: Decodable {
            var token: String?
            var accessToken: String?

            enum CodingKeys: String, CodingKey {
                case token
                case accessToken = "access_token"
            }
        }
        guard let answer = try? JSONDecoder().decode(TokenAnswer.self, from: Data(data)),
            let token = answer.token ?? answer.accessToken
        else {
            throw SandboxError(.invalidArgument, "\(reference): the token service at \(realm) gave no token")
        }
        authorization = "Bearer " + token
    }
}
