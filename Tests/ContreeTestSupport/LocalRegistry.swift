import Foundation
import Glibc
import Sandbox

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

    /// With `user`, the registry asks for basic auth (an htpasswd file with a bcrypt hash).
    public init(user: (name: String, password: String)? = nil) throws {
        root = "/tmp/contree-registry-" + UUID().uuidString.lowercased().prefix(12)
        try FileSystem.makeDirectories(root + "/data")
        var auth = ""
        if let user {
            let hash = try ChildProcess.run([
                "python3", "-W", "ignore", "-c",
                "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))", user.password,
            ])
            guard hash.succeeded else { throw SandboxError(.childProcess, "bcrypt: \(hash.stderrText)") }
            let line = user.name + ":" + String(decoding: hash.stdout, as: UTF8.self)
            try FileSystem.writeFile(root + "/htpasswd", Array(line.utf8))
            auth = "auth: {htpasswd: {realm: test, path: \(root)/htpasswd}}\n"
        }
        port = freeLoopbackPort()
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
        stderrFD = child.stderr
        pid = child.pid
        guard waitForLoopbackPort(port) else {
            throw SandboxError(.childProcess, "docker-registry did not start on 127.0.0.1:\(port)")
        }
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

/// Waits (up to 4 s) until something accepts connections on the loopback port.
public func waitForLoopbackPort(_ port: Int) -> Bool {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = UInt16(port).bigEndian
    for _ in 0..<200 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        close(fd)
        if connected == 0 { return true }
        usleep(20_000)
    }
    return false
}

/// A proxy in front of a registry that passes everything through at once, except the body of
/// a large blob: its first 4 KiB, then nothing for a minute. A download in flight to cancel.
public final class StallingProxy: @unchecked Sendable {
    public let port: Int
    private let pid: pid_t
    private let stderrFD: Int32

    static let script = """
        import http.server, sys, time, urllib.request, urllib.error
        upstream = sys.argv[2]
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

    public init(upstreamPort: Int) throws {
        port = freeLoopbackPort()
        let child = try ChildProcess.spawn(
            ["python3", "-c", StallingProxy.script, String(port), "http://127.0.0.1:\(upstreamPort)"],
            captureStdout: false, stdoutFD: open("/dev/null", O_WRONLY | O_CLOEXEC))
        pid = child.pid
        stderrFD = child.stderr
        guard waitForLoopbackPort(port) else { throw SandboxError(.childProcess, "the proxy did not start") }
    }

    deinit {
        kill(pid, SIGKILL)
        _ = try? ChildProcess.wait(pid, "python3")
        close(stderrFD)
    }
}
