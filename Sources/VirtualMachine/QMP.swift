import Foundation
import Glibc
import SystemSupport

/// QEMU's machine protocol (QMP) over its unix socket: one command at a time, answers read
/// past the events QEMU sends in between.
final class QMP {
    private let fd: Int32
    private var buffer: [UInt8] = []

    convenience init(path: String) throws {
        var connected: Int32 = -1
        for _ in 0..<1000 {
            if let fd = connectUnixSocket(path) {
                connected = fd
                break
            }
            usleep(5_000)
        }
        guard connected >= 0 else { throw SandboxError(.sandboxSetup, "QEMU's QMP socket did not open") }
        try self.init(fd: connected)
    }

    /// Over a socket already connected (owned from now on).
    init(fd: Int32) throws {
        self.fd = fd
        _ = try line()  // the greeting
        try execute("qmp_capabilities")
    }

    deinit { close(fd) }

    private func line() throws -> String {
        while true {
            if let newline = buffer.firstIndex(of: 10) {
                let text = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeFirst(newline + 1)
                return text
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw SandboxError(.sandboxSetup, "QEMU closed its QMP socket") }
            buffer += chunk[0..<n]
        }
    }

    /// Runs a command; returns its answer (JSON text). - Throws: when QEMU answers an error.
    @discardableResult
    func execute(_ command: String, _ arguments: String? = nil) throws -> String {
        let request = #"{"execute":"\#(command)""# + (arguments.map { #","arguments":\#($0)"# } ?? "") + "}\n"
        try FileSystem.writeAll(fd: fd, Array(request.utf8), path: "QMP")
        while true {
            let answer = try line()
            if answer.contains(#""return""#) { return answer }
            if answer.contains(#""error""#) {
                throw SandboxError(.sandboxSetup, "QEMU refused \(command): \(answer)")
            }
        }
    }
}

/// One attempt to connect to a unix socket; nil when nothing listens there (yet).
func connectUnixSocket(_ path: String) -> Int32? {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return nil }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (i, byte) in path.utf8.prefix(raw.count - 1).enumerated() { raw[i] = byte }
    }
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
    }
    if connected == 0 { return fd }
    close(fd)
    return nil
}
