import Foundation
import FoundationNetworking
import Glibc
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
    private let session: URLSession
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
        let configuration = URLSessionConfiguration.ephemeral
        configuration.timeoutIntervalForRequest = 60
        delegate = SessionDelegate(access: access, registryHost: reference.host)
        session = URLSession(configuration: configuration, delegate: delegate, delegateQueue: nil)
    }

    /// The session's delegate. It keeps URLSession's own 401 handling out of the way (it would
    /// answer a Basic challenge from its credential store, or hang): the challenge is cancelled
    /// and its response kept, so that this client answers it (`authenticate`). And it streams
    /// blob downloads into their sinks.
    private final class SessionDelegate: NSObject, URLSessionDataDelegate, @unchecked Sendable {
        private let lock = NSLock()
        private var responses: [Int: HTTPURLResponse] = [:]
        private var sinks: [Int: BlobSink] = [:]
        /// Redirects refused (the target is not allowed), by task: why.
        private var refusedRedirects: [Int: String] = [:]
        let access: RegistryAccess
        let registryHost: String

        init(access: RegistryAccess, registryHost: String) {
            self.access = access
            self.registryHost = registryHost
        }

        /// A redirect is followed only within `access`, without the registry's authorization
        /// when it leaves the registry's host (blob storage signs its own URLs).
        func urlSession(
            _ session: URLSession, task: URLSessionTask, willPerformHTTPRedirection response: HTTPURLResponse,
            newRequest request: URLRequest, completionHandler: @escaping (URLRequest?) -> Void
        ) {
            guard let url = request.url else { return completionHandler(nil) }
            if let why = access.refusal(of: url, from: registryHost) {
                lock.withLock { refusedRedirects[task.taskIdentifier] = why }
                return completionHandler(nil)
            }
            var next = request
            let sameHost =
                url.host?.lowercased() == task.originalRequest?.url?.host?.lowercased()
                && url.port == task.originalRequest?.url?.port
            if !sameHost { next.setValue(nil, forHTTPHeaderField: "Authorization") }
            completionHandler(next)
        }

        func refusedRedirect(_ task: Int) -> String? {
            lock.withLock { refusedRedirects.removeValue(forKey: task) }
        }

        func urlSession(
            _ session: URLSession, task: URLSessionTask, didReceive challenge: URLAuthenticationChallenge,
            completionHandler: @escaping (URLSession.AuthChallengeDisposition, URLCredential?) -> Void
        ) {
            if let response = challenge.failureResponse as? HTTPURLResponse {
                lock.withLock { responses[task.taskIdentifier] = response }
            }
            completionHandler(.cancelAuthenticationChallenge, nil)
        }

        func take(_ task: Int) -> HTTPURLResponse? {
            lock.withLock { responses.removeValue(forKey: task) }
        }

        func attach(_ sink: BlobSink, to task: Int) { lock.withLock { sinks[task] = sink } }
        private func sink(_ task: Int) -> BlobSink? { lock.withLock { sinks[task] } }

        func urlSession(
            _ session: URLSession, dataTask: URLSessionDataTask, didReceive response: URLResponse,
            completionHandler: @escaping (URLSession.ResponseDisposition) -> Void
        ) {
            sink(dataTask.taskIdentifier)?.status = (response as? HTTPURLResponse)?.statusCode ?? 0
            completionHandler(.allow)
        }

        func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive data: Data) {
            sink(dataTask.taskIdentifier)?.receive(data)
        }

        func urlSession(_ session: URLSession, task: URLSessionTask, didCompleteWithError error: (any Error)?) {
            guard let sink = lock.withLock({ sinks.removeValue(forKey: task.taskIdentifier) }) else { return }
            sink.failure = error
            sink.done.signal()
        }
    }
    private let delegate: SessionDelegate

    /// Where a blob download goes: a file, hashed as the bytes arrive (only the delegate's
    /// serial queue touches it until `done`).
    private final class BlobSink: @unchecked Sendable {
        let fd: Int32
        let path: String
        var hasher = Digest.Hasher()
        var size: Int64 = 0
        var status = 0
        var failure: (any Error)?
        var writeError: (any Error)?
        /// The start of an error answer's body, for its OCI error codes.
        var errorBody = Data()
        let onBytes: (@Sendable (Int64) -> Void)?
        let done = DispatchSemaphore(value: 0)

        init(fd: Int32, path: String, onBytes: (@Sendable (Int64) -> Void)?) {
            self.fd = fd
            self.path = path
            self.onBytes = onBytes
        }

        func receive(_ data: Data) {
            guard (200..<300).contains(status) else {
                if errorBody.count < 300 { errorBody.append(data.prefix(300 - errorBody.count)) }
                return
            }
            guard writeError == nil else { return }
            data.withUnsafeBytes { hasher.update($0) }
            do {
                try data.withUnsafeBytes { try FileSystem.writeAll(fd: fd, $0, path: path) }
            } catch {
                writeError = error
            }
            size += Int64(data.count)
            onBytes?(Int64(data.count))
        }
    }

    var base: String { "\(scheme)://\(reference.host)/v2/\(reference.repository)" }

    /// GET with the auth dance; returns the body and the response.
    func get(_ url: String, accept: [String] = []) throws -> (Data, HTTPURLResponse) {
        try call("GET", url, headers: accept.isEmpty ? [:] : ["Accept": accept.joined(separator: ", ")])
    }

    /// A request with the auth dance (one retry after a 401 challenge); any 2xx is success,
    /// and `allow` lists other statuses the caller handles itself.
    func call(
        _ method: String, _ url: String, headers: [String: String] = [:], body: Data? = nil, allow: Set<Int> = []
    ) throws -> (Data, HTTPURLResponse) {
        var attempt = 0
        while true {
            guard let target = URL(string: url) else {
                throw SandboxError(.invalidArgument, "\(reference): the registry gave the unusable address '\(url)'")
            }
            var request = URLRequest(url: target)
            request.httpMethod = method
            for (name, value) in headers { request.setValue(value, forHTTPHeaderField: name) }
            if let authorization { request.setValue(authorization, forHTTPHeaderField: "Authorization") }
            request.httpBody = body
            let (data, response) = try send(request)
            if response.statusCode == 401 && attempt == 0 {
                attempt += 1
                try authenticate(response.value(forHTTPHeaderField: "WWW-Authenticate") ?? "")
                continue
            }
            guard (200..<300).contains(response.statusCode) || allow.contains(response.statusCode) else {
                throw failure(response.statusCode, url: url, body: data, redirect: redirectRefusal)
            }
            return (data, response)
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
        var request = URLRequest(url: URL(string: url)!)
        if let authorization { request.setValue(authorization, forHTTPHeaderField: "Authorization") }
        let partial = path + ".partial"
        let fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SandboxError.system("open(\(partial))") }
        let sink = BlobSink(fd: fd, path: partial, onBytes: onBytes)
        let task = session.dataTask(with: request)
        delegate.attach(sink, to: task.taskIdentifier)
        withCancellation(of: task) {
            task.resume()
            sink.done.wait()
        }
        close(fd)
        var keep = false
        defer { if !keep { unlink(partial) } }
        try cancellation?.check()
        if delegate.take(task.taskIdentifier) != nil {
            throw failure(401, url: url, body: Data())
        }
        if let error = sink.failure {
            throw SandboxError(
                .remote, "\(reference): downloading \(digest) failed: \(error.localizedDescription)",
                cause: RegistryError(.transport, path: URL(string: url)?.path ?? "", underlying: error))
        }
        if let error = sink.writeError { throw error }
        guard (200..<300).contains(sink.status) else {
            throw failure(
                sink.status, url: url, body: sink.errorBody, redirect: delegate.refusedRedirect(task.taskIdentifier))
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

    /// Runs `body` (which waits for `task`) so that a cancellation cancels the task.
    private func withCancellation(of task: URLSessionTask, _ body: () -> Void) {
        guard let cancellation else { return body() }
        cancellation.whileRunning(onCancel: { task.cancel() }, body)
    }

    /// Why the last `send` did not follow a redirect, if it did not.
    private var redirectRefusal: String? {
        get { authorizationLock.withLock { storedRedirectRefusal } }
        set { authorizationLock.withLock { storedRedirectRefusal = newValue } }
    }
    private var storedRedirectRefusal: String?

    /// The error for an answer that is not a success. It names the status and the OCI error
    /// codes of the body (`MANIFEST_UNKNOWN`), never the body itself: what a registry (or
    /// whatever answered) wrote is not repeated to whoever asked for the import.
    private func failure(_ status: Int, url: String, body: Data, redirect: String? = nil) -> SandboxError {
        let path = URL(string: url)?.path ?? ""
        if let redirect {
            return SandboxError(
                .invalidArgument,
                "\(reference): the registry redirected to an address this client may not follow: \(redirect)",
                cause: RegistryError(.redirectRefused, path: path))
        }
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

    private func send(_ request: URLRequest) throws -> (Data, HTTPURLResponse) {
        let semaphore = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var result: Result<(Data, HTTPURLResponse), any Error> = .failure(URLError(.unknown))
        try cancellation?.check()
        let task = session.dataTask(with: request) { data, response, error in
            if let error {
                result = .failure(error)
            } else if let http = response as? HTTPURLResponse {
                result = .success((data ?? Data(), http))
            }
            semaphore.signal()
        }
        withCancellation(of: task) {
            task.resume()
            semaphore.wait()
        }
        try cancellation?.check()
        redirectRefusal = delegate.refusedRedirect(task.taskIdentifier)
        // A challenge URLSession raised and this client cancelled: answer it as the 401 it was.
        if case .failure = result, let challenged = delegate.take(task.taskIdentifier) {
            return (Data(), challenged)
        }
        do {
            return try result.get()
        } catch {
            throw SandboxError(
                .remote,
                "\(reference): cannot reach the registry at \(scheme)://\(reference.host) (\(error.localizedDescription)); is it running, and is the address right?",
                cause: RegistryError(.transport, path: request.url?.path ?? "", underlying: error))
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
        var request = URLRequest(url: components.url!)
        if let credentials { request.setValue(credentials.basic, forHTTPHeaderField: "Authorization") }
        let (data, response) = try send(request)
        guard response.statusCode == 200 else {
            throw failure(response.statusCode, url: realm, body: data, redirect: redirectRefusal)
        }
        struct TokenAnswer: Decodable {
            var token: String?
            var accessToken: String?

            enum CodingKeys: String, CodingKey {
                case token
                case accessToken = "access_token"
            }
        }
        guard let answer = try? JSONDecoder().decode(TokenAnswer.self, from: data),
            let token = answer.token ?? answer.accessToken
        else {
            throw SandboxError(.invalidArgument, "\(reference): the token service at \(realm) gave no token")
        }
        authorization = "Bearer " + token
    }
}
