import FoundationEssentials
import Glibc
import SystemSupport

/// `contree-pipeline serve` as a child process on a free loopback port, for the tests and the
/// benchmark: started with `--listen 127.0.0.1:0`, its port read from the line it prints.
public final class ServeProcess: Sendable {
    public let pid: pid_t
    public let port: Int
    private let stderrFD: Int32

    private init(pid: pid_t, port: Int, stderrFD: Int32) {
        self.pid = pid
        self.port = port
        self.stderrFD = stderrFD
    }

    /// Starts `binary serve` with the tokens file and environment given, and waits until it listens.
    public static func start(
        binary: String, tokens: String, environment: [String], arguments: [String] = []
    ) async throws -> ServeProcess {
        let child = try ChildProcess.spawn(
            [binary, "serve", "--listen", "127.0.0.1:0", "--tokens", tokens] + arguments, environment: environment,
            captureStdout: true)
        let out = child.stdout!
        let line = try await BlockingPool.shared.run { () -> String in
            var bytes: [UInt8] = []
            var byte: UInt8 = 0
            while read(out, &byte, 1) == 1 && byte != 10 { bytes.append(byte) }
            close(out)
            return String(decoding: bytes, as: UTF8.self)
        }
        guard let range = line.range(of: "127.0.0.1:"),
            let port = Int(line[range.upperBound...].prefix { $0.isNumber })
        else {
            kill(child.pid, SIGKILL)
            _ = try? ChildProcess.wait(child.pid, "serve")
            let err = (try? FileSystem.readAll(fd: child.stderr, path: "serve's stderr")) ?? []
            close(child.stderr)
            throw LoopbackHTTP.Failure("serve did not start: \(line) \(String(decoding: err, as: UTF8.self))")
        }
        return ServeProcess(pid: child.pid, port: port, stderrFD: child.stderr)
    }

    /// Stops it (SIGTERM: gracefully; SIGKILL: a crash) and waits for it.
    public func stop(signal: Int32 = SIGTERM) async throws {
        kill(pid, signal)
        let pid = self.pid
        _ = try await BlockingPool.shared.run { try ChildProcess.wait(pid, "serve") }
        close(stderrFD)
    }
}
