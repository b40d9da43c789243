import Foundation
import Glibc
import FoundationNetworking
import Sandbox

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
            throw SandboxError(.invalidArgument, "'\(text)' names no registry host: write docker://HOST[:PORT]/REPO:TAG")
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

    /// Whether the host is this machine (plain http is allowed there).
    var isLoopback: Bool {
        let name = host.split(separator: ":").first.map(String.init) ?? host
        return name == "localhost" || name == "127.0.0.1" || name == "[::1]" || name.hasPrefix("127.")
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
final class RegistryClient: @unchecked Sendable {
    let reference: RegistryReference
    let credentials: RegistryCredentials?
    let scheme: String
    private let session: URLSession
    /// The header the last challenge earned; shared by the requests of concurrent imports.
    private let authorizationLock = NSLock()
    private var storedAuthorization: String?
    private var authorization: String? {
        get { authorizationLock.withLock { storedAuthorization } }
        set { authorizationLock.withLock { storedAuthorization = newValue } }
    }

    init(reference: RegistryReference, credentials: RegistryCredentials?, allowHTTP: Bool, pushing: Bool = false) {
        self.reference = reference
        self.pushing = pushing
        self.credentials = credentials
        scheme = reference.isLoopback || allowHTTP ? "http" : "https"
        let configuration = URLSessionConfiguration.ephemeral
        configuration.timeoutIntervalForRequest = 60
        session = URLSession(configuration: configuration, delegate: catcher, delegateQueue: nil)
    }

    /// Keeps URLSession's own 401 handling out of the way: it would answer a Basic challenge
    /// from its credential store or hang. The challenge is cancelled and its response kept,
    /// so that this client answers it (`authenticate`).
    private final class ChallengeCatcher: NSObject, URLSessionTaskDelegate, @unchecked Sendable {
        private let lock = NSLock()
        private var responses: [Int: HTTPURLResponse] = [:]

        func urlSession(
            _ session: URLSession, task: URLSessionTask, didReceive challenge: URLAuthenticationChallenge,
            completionHandler: @escaping (URLSession.AuthChallengeDisposition, URLCredential?) -> Void
        ) {
            if let response = challenge.failureResponse as? HTTPURLResponse {
                lock.lock()
                responses[task.taskIdentifier] = response
                lock.unlock()
            }
            completionHandler(.cancelAuthenticationChallenge, nil)
        }

        func take(_ task: Int) -> HTTPURLResponse? {
            lock.lock()
            defer { lock.unlock() }
            return responses.removeValue(forKey: task)
        }
    }
    private let catcher = ChallengeCatcher()

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
                throw failure(response.statusCode, url: url, body: data)
            }
            return (data, response)
        }
    }

    /// Whether to ask a token service for write access (the bearer scope).
    let pushing: Bool

    /// GET a blob into a file (streamed to disk by the session), then check its sha256
    /// against `digest` before anything uses it.
    func download(_ url: String, digest: String, to path: String) throws {
        var request = URLRequest(url: URL(string: url)!)
        if let authorization { request.setValue(authorization, forHTTPHeaderField: "Authorization") }
        let semaphore = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var outcome: (any Error)?
        nonisolated(unsafe) var status = 0
        let task = session.downloadTask(with: request) { file, response, error in
            defer { semaphore.signal() }
            if let error {
                outcome = error
                return
            }
            status = (response as? HTTPURLResponse)?.statusCode ?? 0
            guard let file, (200..<300).contains(status) else { return }
            do {
                try FileSystem.rename(file.path, path)
            } catch {
                outcome = error
            }
        }
        task.resume()
        semaphore.wait()
        if catcher.take(task.taskIdentifier) != nil {
            throw failure(401, url: url, body: Data())
        }
        if let outcome {
            throw SandboxError(.childProcess, "\(reference): downloading \(digest) failed: \(outcome.localizedDescription)")
        }
        guard (200..<300).contains(status) else { throw failure(status, url: url, body: Data()) }
        let (actual, size) = try OCI.sha256(file: path)
        guard actual == digest else {
            unlink(path)
            throw SandboxError(
                .corrupt,
                "\(reference): the blob \(digest) arrived as \(size) bytes hashing to \(actual) (truncated or altered); nothing was imported"
            )
        }
    }

    private func failure(_ status: Int, url: String, body: Data) -> SandboxError {
        let detail = String(decoding: body.prefix(300), as: UTF8.self)
        switch status {
        case 401, 403 where credentials != nil:
            return SandboxError(
                .invalidArgument,
                "\(reference): the registry refused the credentials of '\(credentials!.username)' (\(status)); check the user and password"
            )
        case 401, 403:
            return SandboxError(
                .invalidArgument,
                "\(reference): the registry refused access (\(status)); give credentials (--username/--password or CONTREE_REGISTRY_USER/CONTREE_REGISTRY_PASSWORD)"
            )
        case 404:
            return SandboxError(.notFound, "\(reference): not found in the registry (\(url)): \(detail)")
        default:
            return SandboxError(.childProcess, "\(reference): the registry answered \(status) for \(url): \(detail)")
        }
    }

    private func send(_ request: URLRequest) throws -> (Data, HTTPURLResponse) {
        let semaphore = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var result: Result<(Data, HTTPURLResponse), any Error> = .failure(URLError(.unknown))
        let task = session.dataTask(with: request) { data, response, error in
            if let error {
                result = .failure(error)
            } else if let http = response as? HTTPURLResponse {
                result = .success((data ?? Data(), http))
            }
            semaphore.signal()
        }
        task.resume()
        semaphore.wait()
        // A challenge URLSession raised and this client cancelled: answer it as the 401 it was.
        if case .failure = result, let challenged = catcher.take(task.taskIdentifier) {
            return (Data(), challenged)
        }
        do {
            return try result.get()
        } catch {
            throw SandboxError(
                .childProcess,
                "\(reference): cannot reach the registry at \(scheme)://\(reference.host) (\(error.localizedDescription)); is it running, and is the address right?"
            )
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
            throw SandboxError(.unsupported, "\(reference): the registry asks for '\(challenge)', which is not supported")
        }
        var parameters: [String: String] = [:]
        let pattern = /([a-zA-Z_]+)="([^"]*)"/
        for match in challenge.matches(of: pattern) { parameters[String(match.1).lowercased()] = String(match.2) }
        guard let realm = parameters["realm"], var components = URLComponents(string: realm) else {
            throw SandboxError(.invalidArgument, "\(reference): the registry's bearer challenge names no token realm")
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
        guard response.statusCode == 200 else { throw failure(response.statusCode, url: realm, body: data) }
        struct TokenAnswer: Decodable {
            var token: String?
            var access_token: String?
        }
        guard let answer = try? JSONDecoder().decode(TokenAnswer.self, from: data),
            let token = answer.token ?? answer.access_token
        else {
            throw SandboxError(.invalidArgument, "\(reference): the token service at \(realm) gave no token")
        }
        authorization = "Bearer " + token
    }
}
