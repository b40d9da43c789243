import Foundation
import Glibc
import Synchronization

/// A step's log file. Output is written line by line with every secret value (and every line
/// of a multi-line one) replaced by `***`, so that no secret reaches a log even when the
/// command prints it.
public final class StepLog: Sendable {
    let path: String
    private struct State {
        var handle: FileHandle?
        var partial: [UInt8] = []
        var bytes: Int64 = 0
        var tail: [String] = []
    }
    private let state: Mutex<State>
    let mask: SecretMask
    /// Told where the step runs (the runner passes it on to the views).
    private let placement = Mutex<(@Sendable (Placement) -> Void)?>(nil)
    /// Logs past this size keep only their tail line buffer growing; the file stops.
    static let limit: Int64 = 64 << 20

    /// - Parameter secrets: the step's secrets by name.
    public init(path: String, secrets: [String: String]) {
        self.path = path
        self.mask = SecretMask(secrets)
        // Truncated in place: FileManager.createFile writes a temporary file and renames it
        // over the path, which would replace a device such as /dev/null with a regular file.
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        state = Mutex(State(handle: fd >= 0 ? FileHandle(fileDescriptor: fd, closeOnDealloc: true) : nil))
    }

    /// A log written to `descriptor` (a copy of it), not truncated: a cluster node's stderr,
    /// which may be a file Slurm was told to append to.
    public init(fileDescriptor descriptor: Int32, secrets: [String: String]) {
        self.path = "/proc/self/fd/\(descriptor)"
        self.mask = SecretMask(secrets)
        let fd = fcntl(descriptor, F_DUPFD_CLOEXEC, 3)
        state = Mutex(State(handle: fd >= 0 ? FileHandle(fileDescriptor: fd, closeOnDealloc: true) : nil))
    }

    /// Appends raw output; complete lines are masked and written.
    public func append(_ chunk: [UInt8]) {
        state.withLock { state in
            state.partial += chunk
            while let newline = state.partial.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: state.partial[..<newline], as: UTF8.self)
                state.partial.removeSubrange(...newline)
                write(mask(line) + "\n", &state)
            }
            // A very long line without a newline is flushed in pieces (secrets may straddle
            // the cut only in lines longer than 64 KiB).
            if state.partial.count > 65536 {
                write(mask(String(decoding: state.partial, as: UTF8.self)), &state)
                state.partial.removeAll()
            }
        }
    }

    /// Called by an executor once it knows where the step runs.
    public func placed(_ where: Placement) {
        placement.withLock { $0 }?(`where`)
    }

    func onPlacement(_ body: @escaping @Sendable (Placement) -> Void) {
        placement.withLock { $0 = body }
    }

    /// A line written by contree-pipeline itself.
    public func note(_ text: String) {
        state.withLock { state in write("[contree] " + mask(text) + "\n", &state) }
    }

    public func close() {
        state.withLock { state in
            if !state.partial.isEmpty {
                write(mask(String(decoding: state.partial, as: UTF8.self)) + "\n", &state)
                state.partial.removeAll()
            }
            try? state.handle?.close()
            state.handle = nil
        }
    }

    /// What the file holds so far, the line being written included: its last `limit` bytes.
    func written(last limit: Int) -> [UInt8] {
        state.withLock { state in
            // Only the tail is read: the file holds `state.bytes` (a log may be 64 MiB).
            var tail = [UInt8](repeating: 0, count: Int(min(Int64(limit), state.bytes)))
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            if fd >= 0 {
                let n = tail.withUnsafeMutableBytes {
                    pread(fd, $0.baseAddress, $0.count, off_t(state.bytes) - off_t($0.count))
                }
                tail.removeLast(tail.count - max(0, n))
                Glibc.close(fd)
            } else {
                tail = []
            }
            if !state.partial.isEmpty { tail += Array(mask(String(decoding: state.partial, as: UTF8.self)).utf8) }
            return Array(tail.suffix(limit))
        }
    }

    /// Output a cache hit had when it ran, written again (masked again: the secrets may differ).
    func replay(_ bytes: [UInt8]) {
        append(bytes)
        if bytes.last != UInt8(ascii: "\n") { append([UInt8(ascii: "\n")]) }
    }

    /// The last lines written (for failure summaries).
    var tail: [String] { state.withLock { $0.tail } }

    private func write(_ text: String, _ state: inout State) {
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast() {
            state.tail.append(String(line))
        }
        if state.tail.count > 40 { state.tail.removeFirst(state.tail.count - 40) }
        guard state.bytes < StepLog.limit else { return }
        let data = Data(text.utf8)
        state.bytes += Int64(data.count)
        state.handle?.write(data)
        if state.bytes >= StepLog.limit {
            state.handle?.write(Data("[contree] log truncated at \(StepLog.limit >> 20) MiB\n".utf8))
        }
    }
}
