import ContreeServer
import ContreeTestSupport
import Foundation
import Glibc
import SystemSupport
import Testing

typealias Reply = HTTPReply

extension HTTPReply {
    func json() throws -> [String: Any] {
        guard let object = try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any] else {
            throw TestFailure("not a JSON object: \(text)")
        }
        return object
    }
    func jsonArray() throws -> [[String: Any]] {
        guard let array = try JSONSerialization.jsonObject(with: Data(body)) as? [[String: Any]] else {
            throw TestFailure("not a JSON array: \(text)")
        }
        return array
    }
    /// The spec's error shape: the message, after checking `status` matches.
    func errorMessage() throws -> String {
        let object = try json()
        guard let message = object["error"] as? String, object["status"] as? Int == status else {
            throw TestFailure("not an error body: \(text)")
        }
        return message
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// `contree-pipeline serve` on a free loopback port, over a fresh store, with three tokens:
/// alice (defaults, import=1), bob (max_concurrency=1, max_timeout=30, import=1) and carol
/// (defaults, no import). Stopped when released.
final class TestServer: @unchecked Sendable {
    static let alice = "alice-0123456789abcdef0123456789abcdef"
    static let bob = "bob-0123456789abcdef0123456789abcdef0"
    static let carol = "carol-0123456789abcdef0123456789abcdef"
    let home: String
    let tokensPath: String
    private var process: ServeProcess?
    var port: Int { process?.port ?? 0 }
    var pid: pid_t { process?.pid ?? 0 }

    /// Extra `serve` arguments (e.g. `--isolation vm`) and environment.
    let arguments: [String]
    let environment: [String]

    /// - Parameter tokens: the tokens file's lines, instead of alice, bob and carol.
    init(home: String? = nil, arguments: [String] = [], environment: [String] = [], tokens: String? = nil) async throws
    {
        self.arguments = arguments
        self.environment = environment
        self.home = home ?? "/tmp/contree-serve-test-" + UUID().uuidString.lowercased().prefix(12)
        tokensPath = self.home + "/tokens"
        try FileSystem.makeDirectories(self.home)
        if let tokens {
            try FileSystem.writeFile(tokensPath, Array(tokens.utf8), mode: 0o600)
        } else if !FileSystem.exists(tokensPath) {
            try FileSystem.writeFile(
                tokensPath,
                Array(
                    """
                    alice \(TestServer.alice) import=1
                    bob \(TestServer.bob) max_concurrency=1 max_timeout=30 import=1
                    carol \(TestServer.carol)

                    """.utf8),
                mode: 0o600)
        }
        try await start()
    }

    func start() async throws {
        let env =
            ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") } + ["CONTREE_HOME=\(home)"]
            + environment
        process = try await ServeProcess.start(
            binary: Paths.cli, tokens: tokensPath, environment: env, arguments: arguments)
    }

    /// Stops the server: SIGTERM (graceful) or SIGKILL (a crash).
    func stop(signal: Int32 = SIGTERM) async throws {
        guard let process else { return }
        self.process = nil
        try await process.stop(signal: signal)
    }

    deinit {
        if let process {
            kill(process.pid, SIGKILL)
            _ = try? ChildProcess.wait(process.pid, "serve")
        }
        // A killed server leaves its VM instances' detached QEMUs (the next command on the
        // store would end them; this store goes now).
        for pid in (try? FileSystem.list("/proc")) ?? [] where Int32(pid) != nil {
            let command = (try? FileSystem.readFile("/proc/\(pid)/cmdline")) ?? []
            if String(decoding: command, as: UTF8.self).contains(home + "/") { kill(Int32(pid)!, SIGKILL) }
        }
        try? FileSystem.removeTree(home)
    }

    /// One request on a fresh connection (`Connection: close`); the body is read to the end.
    func request(
        _ method: String, _ path: String, token: String? = TestServer.alice, body: [UInt8]? = nil,
        json: String? = nil, headers: [String: String] = [:], chunked: Bool = false
    ) async throws -> Reply {
        let port = self.port
        let payload = json.map { Array($0.utf8) } ?? body
        return try await BlockingPool.shared.run {
            try LoopbackHTTP.exchange(
                port: port, method: method, path: path, token: token, body: payload,
                headers: headers.merging(json != nil ? ["Content-Type": "application/json"] : [:]) { a, _ in a },
                chunked: chunked)
        }
    }

    /// Spawns an instance and returns its operation id.
    func spawn(_ json: String, token: String = TestServer.alice) async throws -> String {
        let reply = try await request("POST", "/v1/instances", token: token, json: json)
        guard reply.status == 201, let uuid = try reply.json()["uuid"] as? String else {
            throw TestFailure("spawn failed: \(reply.status) \(reply.text)")
        }
        return uuid
    }

    /// Follows the event stream to its end; returns the events' JSON objects.
    func events(
        _ operation: String, query: String = "follow=1", headers: [String: String] = [:]
    ) async throws
        -> [[String: Any]]
    {
        let reply = try await request("GET", "/v1/operations/\(operation)/events?\(query)", headers: headers)
        guard reply.status == 200 else { throw TestFailure("events: \(reply.status) \(reply.text)") }
        return try reply.text.split(separator: "\n").filter { $0.hasPrefix("data: ") }.map {
            try JSONSerialization.jsonObject(with: Data($0.dropFirst(6).utf8)) as! [String: Any]
        }
    }

    /// Waits until a process of the operation has written `text` (stdout or stderr): up to a few
    /// minutes, for an instance that starts slowly on a loaded machine.
    func waitForOutput(_ operation: String, spid: Int, _ text: String) async throws {
        for _ in 0..<6000 {
            let reply = try await request("GET", "/v1/operations/\(operation)/events?spid=\(spid)")
            if reply.text.contains(#""value":"\#(text)"#) { return }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw TestFailure("process \(spid) of \(operation) never wrote \(text)")
    }

    /// Waits for the operation to end and returns its record: up to 3 min (a VM instance beside
    /// other guests on a loaded machine once took more than 30 s).
    func wait(_ operation: String, token: String = TestServer.alice) async throws -> [String: Any] {
        for _ in 0..<3600 {
            let reply = try await request("GET", "/v1/operations/\(operation)", token: token)
            let object = try reply.json()
            if let status = object["status"] as? String, ["SUCCESS", "FAILED", "CANCELLED"].contains(status) {
                return object
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw TestFailure("operation \(operation) did not end")
    }
}

extension [String: Any] {
    /// `a.b.c` into nested objects.
    subscript(path path: String) -> Any? {
        var current: Any? = self
        for key in path.split(separator: ".") { current = (current as? [String: Any])?[String(key)] }
        return current
    }
}
