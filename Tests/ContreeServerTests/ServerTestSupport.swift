import Foundation
import Glibc
import Sandbox
import Testing

extension Trait where Self == ConditionTrait {
    static var requiresRoot: Self { .enabled(if: geteuid() == 0, "needs root: namespaces, mounts and cgroups") }
}

enum Paths {
    static let packageRoot: String = {
        var parts = #filePath.split(separator: "/").map(String.init)
        parts.removeLast(3)
        return "/" + parts.joined(separator: "/")
    }()

    static var cli: String {
        for configuration in ["debug", "release"] {
            let path = packageRoot + "/.build/\(configuration)/contree-pipeline"
            if FileSystem.exists(path) { return path }
        }
        return packageRoot + "/.build/debug/contree-pipeline"
    }
}

/// An HTTP answer.
struct Reply: Sendable {
    var status: Int
    var headers: [String: String]
    var body: [UInt8]
    var text: String { String(decoding: body, as: UTF8.self) }
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

/// `contree-pipeline serve` on a free loopback port, over a fresh store, with two tokens:
/// alice (defaults) and bob (max_concurrency=1, max_timeout=30). Stopped when released.
final class TestServer: @unchecked Sendable {
    static let alice = "alice-0123456789abcdef0123456789abcdef"
    static let bob = "bob-0123456789abcdef0123456789abcdef0"
    let home: String
    let tokensPath: String
    private(set) var port = 0
    private var pid: pid_t = 0
    private var stderrFD: Int32 = -1

    init(home: String? = nil) async throws {
        self.home = home ?? "/tmp/contree-serve-test-" + UUID().uuidString.lowercased().prefix(12)
        tokensPath = self.home + "/tokens"
        try FileSystem.makeDirectories(self.home)
        if !FileSystem.exists(tokensPath) {
            try FileSystem.writeFile(
                tokensPath,
                Array("alice \(TestServer.alice)\nbob \(TestServer.bob) max_concurrency=1 max_timeout=30\n".utf8),
                mode: 0o600)
        }
        try await start()
    }

    func start() async throws {
        var env = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") }
        env.append("CONTREE_HOME=\(home)")
        let child = try ChildProcess.spawn(
            [Paths.cli, "serve", "--listen", "127.0.0.1:0", "--tokens", tokensPath], environment: env,
            captureStdout: true)
        pid = child.pid
        stderrFD = child.stderr
        let out = child.stdout!
        // The first line names the port: "serving the ConTree API on http://127.0.0.1:PORT ...".
        let line = try await DedicatedThread.run { () -> String in
            var bytes: [UInt8] = []
            var byte: UInt8 = 0
            while read(out, &byte, 1) == 1 && byte != 10 { bytes.append(byte) }
            close(out)
            return String(decoding: bytes, as: UTF8.self)
        }
        guard let range = line.range(of: "127.0.0.1:"), let port = Int(line[range.upperBound...].prefix { $0.isNumber })
        else {
            let err = (try? FileSystem.readAll(fd: stderrFD, path: "stderr")).map { String(decoding: $0, as: UTF8.self) }
            throw TestFailure("serve did not start: \(line) \(err ?? "")")
        }
        self.port = port
    }

    /// Stops the server: SIGTERM (graceful) or SIGKILL (a crash).
    func stop(signal: Int32 = SIGTERM) async throws {
        guard pid > 0 else { return }
        kill(pid, signal)
        let pid = self.pid
        _ = try await DedicatedThread.run { try ChildProcess.wait(pid, "serve") }
        self.pid = 0
        close(stderrFD)
    }

    deinit {
        if pid > 0 {
            kill(pid, SIGKILL)
            _ = try? ChildProcess.wait(pid, "serve")
            close(stderrFD)
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
        return try await DedicatedThread.run {
            try HTTP.exchange(
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
    func events(_ operation: String, query: String = "follow=1", headers: [String: String] = [:]) async throws
        -> [[String: Any]]
    {
        let reply = try await request("GET", "/v1/operations/\(operation)/events?\(query)", headers: headers)
        guard reply.status == 200 else { throw TestFailure("events: \(reply.status) \(reply.text)") }
        return try reply.text.split(separator: "\n").filter { $0.hasPrefix("data: ") }.map {
            try JSONSerialization.jsonObject(with: Data($0.dropFirst(6).utf8)) as! [String: Any]
        }
    }

    /// Waits for the operation to end and returns its record.
    func wait(_ operation: String, token: String = TestServer.alice) async throws -> [String: Any] {
        for _ in 0..<600 {
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

/// A minimal HTTP/1.1 client over a loopback socket: exact control of what is sent (raw,
/// chunked, malformed), and the whole answer read until the server closes.
enum HTTP {
    static func exchange(
        port: Int, method: String, path: String, token: String?, body: [UInt8]?, headers: [String: String],
        chunked: Bool
    ) throws -> Reply {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0 else { throw TestFailure("connect to 127.0.0.1:\(port): \(errno)") }
        var head = "\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nConnection: close\r\n"
        if let token { head += "Authorization: Bearer \(token)\r\n" }
        for (key, value) in headers { head += "\(key): \(value)\r\n" }
        var payload: [UInt8] = []
        if let body {
            if chunked {
                head += "Transfer-Encoding: chunked\r\n"
                var offset = 0
                while offset < body.count {
                    let piece = body[offset..<min(body.count, offset + 1000)]
                    payload += Array((String(piece.count, radix: 16) + "\r\n").utf8) + piece + Array("\r\n".utf8)
                    offset += piece.count
                }
                payload += Array("0\r\n\r\n".utf8)
            } else {
                head += "Content-Length: \(body.count)\r\n"
                payload = body
            }
        }
        let request = Array((head + "\r\n").utf8) + payload
        var sent = 0
        while sent < request.count {
            let n = request[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw TestFailure("send: \(errno)") }
            sent += n
        }
        var raw: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            raw += buffer[0..<n]
        }
        return try parse(raw)
    }

    static func parse(_ raw: [UInt8]) throws -> Reply {
        let separator: [UInt8] = [13, 10, 13, 10]
        guard let end = raw.indices.first(where: { raw[$0...].starts(with: separator) }) else {
            throw TestFailure("no HTTP head in \(String(decoding: raw, as: UTF8.self))")
        }
        let lines = String(decoding: raw[..<end], as: UTF8.self).components(separatedBy: "\r\n")
        let status = Int(lines[0].split(separator: " ")[1]) ?? 0
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var body = Array(raw[(end + 4)...])
        if headers["transfer-encoding"]?.lowercased() == "chunked" {
            var decoded: [UInt8] = []
            var i = 0
            while i < body.count {
                guard let lineEnd = body[i...].indices.first(where: { body[$0...].starts(with: [13, 10]) }) else { break }
                let size = Int(String(decoding: body[i..<lineEnd], as: UTF8.self).split(separator: ";")[0], radix: 16) ?? 0
                if size == 0 { break }
                decoded += body[(lineEnd + 2)..<min(body.count, lineEnd + 2 + size)]
                i = lineEnd + 2 + size + 2
            }
            body = decoded
        }
        return Reply(status: status, headers: headers, body: body)
    }
}
