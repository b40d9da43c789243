import Foundation
import Glibc
import SystemSupport

/// Runs skopeo (Debian's; `scripts/setup` installs it) and fails the test when it fails.
public func skopeo(_ arguments: [String]) throws -> String {
    let result = try ChildProcess.run(["skopeo"] + arguments)
    guard result.succeeded else { throw SandboxError(.childProcess, "skopeo \(arguments): \(result.stderrText)") }
    return String(decoding: result.stdout, as: UTF8.self)
}

/// Debian's docker-registry (the CNCF distribution registry) on a free loopback port, over a
/// scratch directory; stopped when released.
public final class LocalRegistry: @unchecked Sendable {
    public let root: String
    public let port: Int
    private let pid: pid_t
    /// The stderr pipe spawn made (the log goes to a file), kept open while it runs.
    private let stderrFD: Int32

    /// A token service in front of it (`tokens`), when it asks for bearer tokens.
    private var tokenService: TokenService?

    /// With `user`, the registry asks for basic auth (an htpasswd file with a bcrypt hash);
    /// with `tokens` as well, for bearer tokens from a token service that checks `user`.
    public init(user: (name: String, password: String)? = nil, tokens: Bool = false) throws {
        root = "/tmp/contree-registry-" + UUID().uuidString.lowercased().prefix(12)
        try FileSystem.makeDirectories(root + "/data")
        var auth = ""
        if tokens, let user {
            let service = try TokenService(directory: root, user: user)
            tokenService = service
            auth = """
                auth: {token: {realm: "http://127.0.0.1:\(service.port)/token", service: test-registry, \
                issuer: test-issuer, rootcertbundle: \(root)/token.crt}}

                """
        } else if let user {
            let hash = try ChildProcess.run([
                "python3", "-W", "ignore", "-c",
                "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                user.password,
            ])
            guard hash.succeeded else { throw SandboxError(.childProcess, "bcrypt: \(hash.stderrText)") }
            let line = user.name + ":" + String(decoding: hash.stdout, as: UTF8.self)
            try FileSystem.writeFile(root + "/htpasswd", Array(line.utf8))
            auth = "auth: {htpasswd: {realm: test, path: \(root)/htpasswd}}\n"
        }
        // A port picked free can be taken before the registry binds it: then it exits, and the
        // next attempt takes another.
        var attempt = 0
        var started: (port: Int, pid: pid_t, stderr: Int32)
        while true {
            attempt += 1
            let port = freeLoopbackPort()
            try FileSystem.writeFile(
                root + "/config.yml",
                Array(
                    """
                    version: 0.1
                    log: {level: error}
                    storage: {filesystem: {rootdirectory: \(root)/data}}
                    http: {addr: 127.0.0.1:\(port)}
                    \(auth)
                    """.utf8))
            let child = try ChildProcess.spawn(
                // Its log goes to a file: a pipe nobody reads would fill and stall the registry.
                ["sh", "-c", "exec docker-registry serve \"$0/config.yml\" 2>>\"$0/registry.log\"", root],
                captureStdout: false,
                stdoutFD: open("/dev/null", O_WRONLY | O_CLOEXEC))
            started = (port, child.pid, child.stderr)
            if waitForLoopbackPort(port, process: child.pid) { break }
            kill(child.pid, SIGKILL)
            _ = try? ChildProcess.wait(child.pid, "docker-registry")
            close(child.stderr)
            let log = String(decoding: (try? FileSystem.readFile(root + "/registry.log")) ?? [], as: UTF8.self)
            guard attempt < 3, log.contains("address already in use") else {
                throw SandboxError(
                    .childProcess,
                    "docker-registry did not start on 127.0.0.1:\(port) (attempt \(attempt)); its log: \(log.suffix(500))"
                )
            }
        }
        (port, pid, stderrFD) = started
    }

    deinit {
        kill(pid, SIGTERM)
        _ = try? ChildProcess.wait(pid, "docker-registry")
        close(stderrFD)
        try? FileSystem.removeTree(root)
    }

    /// Pushes a layout's image with skopeo.
    public func push(_ source: String, _ repository: String) throws {
        _ = try skopeo(["copy", "--dest-tls-verify=false", source, "docker://127.0.0.1:\(port)/\(repository)"])
    }
}

/// A free port on loopback: bind to 0, read it, let it go.
public func freeLoopbackPort() -> Int {
    let probe = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(probe) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(probe, $0, length)
            return getsockname(probe, $0, &length)
        }
    }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// Waits until something accepts connections on the loopback port: up to `seconds` (a loaded
/// machine starts a server slowly), and no longer than `process` (when given) lives.
public func waitForLoopbackPort(_ port: Int, process: pid_t? = nil, seconds: Double = 30) -> Bool {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = UInt16(port).bigEndian
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        close(fd)
        if connected == 0 { return true }
        if let process, !isRunning(process) { return false }
        usleep(20_000)
    }
    return false
}

/// Whether `pid` runs (not gone, not a zombie waiting to be reaped).
func isRunning(_ pid: pid_t) -> Bool {
    guard let stat = try? FileSystem.readFile("/proc/\(pid)/stat") else { return false }
    let text = String(decoding: stat, as: UTF8.self)
    guard let close = text.lastIndex(of: ")") else { return false }
    return text[text.index(after: close)...].trimmingCharacters(in: .whitespaces).first != "Z"
}

/// A proxy in front of a registry that passes everything through at once, except the body of
/// a large blob: its first 4 KiB, then nothing for a minute (a download in flight to cancel),
/// or, with `cut`, the connection closes there (a truncated download).
public final class StallingProxy: @unchecked Sendable {
    private let server: PythonServer
    public var port: Int { server.port }

    static let script = """
        import http.server, socket, sys, time, urllib.request, urllib.error
        upstream, cut = sys.argv[2], sys.argv[3] == "cut"
        class Proxy(http.server.BaseHTTPRequestHandler):
            def relay(self, body):
                request = urllib.request.Request(upstream + self.path, method=self.command, headers=dict(self.headers))
                try:
                    answer = urllib.request.urlopen(request)
                except urllib.error.HTTPError as error:
                    answer = error
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    if name.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.end_headers()
                if not body:
                    return
                try:
                    if "/blobs/" in self.path and len(data) > 65536:
                        self.wfile.write(data[:4096])
                        self.wfile.flush()
                        if cut:
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        time.sleep(60)
                        data = data[4096:]
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
            def do_GET(self):
                self.relay(True)
            def do_HEAD(self):
                self.relay(False)
            def log_message(self, *args):
                pass
        http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Proxy).serve_forever()
        """

    public init(upstreamPort: Int, cut: Bool = false) throws {
        server = try PythonServer(
            "the proxy", StallingProxy.script, ["http://127.0.0.1:\(upstreamPort)", cut ? "cut" : "stall"])
    }
}

/// A Python program serving on a free loopback port (its first argument), killed when released.
public final class PythonServer: @unchecked Sendable {
    public let port = freeLoopbackPort()
    private let pid: pid_t
    private let stderrFD: Int32

    public init(_ name: String, _ script: String, _ arguments: [String]) throws {
        let child = try ChildProcess.spawn(
            ["python3", "-c", script, String(port)] + arguments, captureStdout: false,
            stdoutFD: open("/dev/null", O_WRONLY | O_CLOEXEC))
        pid = child.pid
        stderrFD = child.stderr
        guard waitForLoopbackPort(port, process: pid) else {
            kill(pid, SIGKILL)
            _ = try? ChildProcess.wait(pid, "python3")
            close(stderrFD)
            throw SandboxError(.childProcess, "\(name) did not start on 127.0.0.1:\(port)")
        }
    }

    deinit {
        kill(pid, SIGKILL)
        _ = try? ChildProcess.wait(pid, "python3")
        close(stderrFD)
    }
}

/// A bearer-token service as registries use (Docker Hub, GHCR): checks basic credentials and
/// answers a JWT for the asked scope, signed (RS256, with openssl) by a key whose certificate
/// the registry trusts and which the token carries in its `x5c` header.
final class TokenService: @unchecked Sendable {
    private let server: PythonServer
    var port: Int { server.port }

    static let script = """
        import base64, http.server, json, subprocess, sys, time, urllib.parse, uuid
        port, directory, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
        def b64(data):
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        der = subprocess.run(["openssl", "x509", "-in", directory + "/token.crt", "-outform", "DER"],
                             capture_output=True, check=True).stdout
        class Tokens(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"details":"wrong or missing credentials"}')
                    return
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                access = []
                for scope in query.get("scope", []):
                    kind, name, actions = scope.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                now = int(time.time())
                header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(der).decode()]}
                claims = {"iss": "test-issuer", "sub": user, "aud": query.get("service", [""])[0],
                          "exp": now + 300, "nbf": now - 10, "iat": now, "jti": str(uuid.uuid4()), "access": access}
                signed = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
                signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", directory + "/token.key"],
                                           input=signed.encode(), capture_output=True, check=True).stdout
                token = signed + "." + b64(signature)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps({"token": token, "expires_in": 300}).encode())
            def log_message(self, *args):
                pass
        http.server.ThreadingHTTPServer(("127.0.0.1", port), Tokens).serve_forever()
        """

    init(directory: String, user: (name: String, password: String)) throws {
        let key = try ChildProcess.run([
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-issuer",
            "-keyout", directory + "/token.key", "-out", directory + "/token.crt",
        ])
        guard key.succeeded else { throw SandboxError(.childProcess, "openssl: \(key.stderrText)") }
        server = try PythonServer("the token service", TokenService.script, [directory, user.name, user.password])
    }
}

/// Waits (up to 30 s) until an import into the store at `storeRoot` has bytes of a blob in
/// flight (a `.partial` file in its work directory), then interrupts `pid` with SIGINT; returns
/// its exit status, its stderr, and how long it took to end after the signal.
public func interruptDuringDownload(
    pid: pid_t, stderr: Int32, storeRoot: String
) async throws -> (downloading: Bool, status: Int32, stderr: String, seconds: Double) {
    let started = Date()
    var downloading = false
    while !downloading && Date().timeIntervalSince(started) < 30 {
        try await Task.sleep(for: .milliseconds(50))
        let partials = try? ChildProcess.run(["find", storeRoot + "/tmp", "-name", "*.partial", "-size", "+0"])
        downloading = !(partials?.stdout.isEmpty ?? true)
    }
    let interrupted = Date()
    kill(pid, SIGINT)
    let status = try await BlockingPool.shared.run { try ChildProcess.wait(pid, "contree-pipeline") }
    let text = String(decoding: try FileSystem.readAll(fd: stderr, path: "stderr"), as: UTF8.self)
    close(stderr)
    return (downloading, status, text, Date().timeIntervalSince(interrupted))
}
