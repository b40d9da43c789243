import Glibc
import Synchronization
import SystemSupport

/// The write end of a process's stdin pipe. Writes happen one at a time in the order they
/// were asked for, the first carrying what the spawn itself sent; each uses a copy of the
/// descriptor, so closing the pipe meanwhile never makes a write land on a reused number.
final class StdinPipe: Sendable {
    private let state: Mutex<(fd: Int32?, initial: [UInt8])>
    private let turns = Slots()

    init(fd: Int32, initial: [UInt8]) {
        state = Mutex((fd, initial))
    }

    /// Writes `bytes` (blocking while the pipe is full) and closes the pipe when asked.
    /// - Throws: 409 when the pipe is closed or the process no longer reads it.
    func write(_ bytes: [UInt8], close: Bool, spid: Int) async throws {
        try await turns.acquire("", limit: 1)
        defer { turns.release("") }
        let (copy, initial) = state.withLock { s -> (Int32?, [UInt8]) in
            guard let fd = s.fd else { return (nil, []) }
            defer { s.initial = [] }
            return (fcntl(fd, F_DUPFD_CLOEXEC, 3), s.initial)
        }
        guard let copy, copy >= 0 else {
            throw APIError(
                .conflict,
                "the stdin of process \(spid) is closed: it was started without stdin.close=false, closed by an earlier request, or the process ended"
            )
        }
        defer { Glibc.close(copy) }
        let all = initial + bytes
        if !all.isEmpty {
            do {
                try await BlockingPool.shared.run { try FileSystem.writeAll(fd: copy, all, path: "stdin") }
            } catch {
                throw APIError(.conflict, "process \(spid) no longer reads its stdin (it may have ended)")
            }
        }
        if close { self.close() }
    }

    func close() {
        let fd = state.withLock { s -> Int32? in
            defer { s.fd = nil }
            return s.fd
        }
        if let fd { Glibc.close(fd) }
    }
}
