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
    /// Its stderr, kept open (closing it would kill it with SIGPIPE at its first log line).
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
        // A free port: bind to 0, read it, let it go.
        let probe = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
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
        port = Int(UInt16(bigEndian: address.sin_port))
        close(probe)
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
            ["docker-registry", "serve", root + "/config.yml"], captureStdout: false,
            stdoutFD: open("/dev/null", O_WRONLY | O_CLOEXEC))
        stderrFD = child.stderr
        pid = child.pid
        for _ in 0..<200 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var target = address
            let connected = withUnsafePointer(to: &target) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            close(fd)
            if connected == 0 { return }
            usleep(20_000)
        }
        throw SandboxError(.childProcess, "docker-registry did not start on 127.0.0.1:\(port)")
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
