import CAgentProtocol
import Foundation
import Glibc
import Synchronization
import SystemSupport

// The host's end of the agent's channel (the guest's first virtio-serial port): frames of
// agent_protocol.h read and written, stdin pumped in.

/// The agent protocol's frame types: defined once in agent_protocol.h, which the agent's C
/// includes too.
enum Frame {
    static let ready = UInt8(AGENT_FRAME_READY)
    static let stdout = UInt8(AGENT_FRAME_STDOUT)
    static let stderr = UInt8(AGENT_FRAME_STDERR)
    static let log = UInt8(AGENT_FRAME_LOG)
    static let changes = UInt8(AGENT_FRAME_CHANGES)
    static let cache = UInt8(AGENT_FRAME_CACHE)
    static let exit = UInt8(AGENT_FRAME_EXIT)
    static let spec = UInt8(AGENT_FRAME_SPEC)
    static let stdin = UInt8(AGENT_FRAME_STDIN)
    static let kill = UInt8(AGENT_FRAME_KILL)
    static let live = UInt8(AGENT_FRAME_LIVE)
    static let hello = UInt8(AGENT_FRAME_HELLO)
    static let exec = UInt8(AGENT_FRAME_EXEC)
    static let freeze = UInt8(AGENT_FRAME_FREEZE)
    static let thaw = UInt8(AGENT_FRAME_THAW)
    static let put = UInt8(AGENT_FRAME_PUT)
    static let putData = UInt8(AGENT_FRAME_PUT_DATA)
    static let stdinAck = UInt8(AGENT_FRAME_STDIN_ACK)
}

/// The kinds of the spec's fields (agent_protocol.h).
enum SpecField {
    static let layer = Character(Unicode.Scalar(UInt8(AGENT_SPEC_LAYER)))
    static let upper = Character(Unicode.Scalar(UInt8(AGENT_SPEC_UPPER)))
    static let workdir = Character(Unicode.Scalar(UInt8(AGENT_SPEC_WORKDIR)))
    static let user = Character(Unicode.Scalar(UInt8(AGENT_SPEC_USER)))
    static let hostname = Character(Unicode.Scalar(UInt8(AGENT_SPEC_HOSTNAME)))
    static let network = Character(Unicode.Scalar(UInt8(AGENT_SPEC_NETWORK)))
    static let cache = Character(Unicode.Scalar(UInt8(AGENT_SPEC_CACHE)))
    static let time = Character(Unicode.Scalar(UInt8(AGENT_SPEC_TIME)))
    static let entropy = Character(Unicode.Scalar(UInt8(AGENT_SPEC_ENTROPY)))
    static let env = Character(Unicode.Scalar(UInt8(AGENT_SPEC_ENV)))
    static let argument = Character(Unicode.Scalar(UInt8(AGENT_SPEC_ARGUMENT)))
    static let live = Character(Unicode.Scalar(UInt8(AGENT_SPEC_LIVE)))
    static let keep = Character(Unicode.Scalar(UInt8(AGENT_SPEC_KEEP)))
}

/// Frames from the agent: a type byte, a 4-byte little-endian length, the payload.
struct FrameReader {
    let fd: Int32
    private var buffer: [UInt8] = []

    init(fd: Int32) {
        self.fd = fd
    }

    /// The next frame; nil when the guest closed the channel or the deadline passed.
    mutating func next(until deadline: Double) throws -> (type: UInt8, payload: [UInt8])? {
        while true {
            if buffer.count >= 5 {
                let size = Int(buffer[1]) | Int(buffer[2]) << 8 | Int(buffer[3]) << 16 | Int(buffer[4]) << 24
                // The agent sends at most 64 KiB a frame; anything larger is not the agent.
                guard size <= 1 << 20 else {
                    throw SandboxError(
                        .sandboxSetup, "the VM sent a frame of \(size) bytes; the guest is not trusted further")
                }
                if buffer.count >= 5 + size {
                    let frame = (buffer[0], Array(buffer[5..<(5 + size)]))
                    buffer.removeFirst(5 + size)
                    return frame
                }
            }
            let remaining = deadline - Monotonic.now
            guard remaining > 0 else { return nil }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, Int32(min(remaining, 1) * 1000))
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            buffer += chunk[0..<n]
        }
    }
}

/// Passes a command's stdin to the guest, on a thread of its own, until it ends (then an empty
/// frame closes the command's stdin) or the run ends. With a `window` (a live agent), at most
/// that much is sent and not yet acknowledged: the pump waits for the agent, never on the
/// channel, which stays free for signals.
final class InputPump: @unchecked Sendable {
    private let condition = NSCondition()
    private var stopped = false
    private var credit: Int
    private let window: Int?
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)

    init(window: Int? = nil) {
        self.window = window
        credit = window ?? Int.max
    }

    /// The agent's acknowledgement that the command took `bytes` more.
    func acknowledge(_ bytes: Int) {
        guard window != nil else { return }
        condition.withLock { credit += bytes }
        condition.broadcast()
    }

    /// Waits until `count` more bytes may be sent; false once stopped.
    private func take(_ count: Int) -> Bool {
        condition.withLock {
            while !stopped && credit < count { condition.wait() }
            credit -= count
            return !stopped
        }
    }

    private var isStopped: Bool { condition.withLock { stopped } }

    /// Starts passing `input` to the command through `channel`.
    func start(_ input: MicroVM.Input, into channel: Channel) throws {
        let send: @Sendable ([UInt8]) -> Bool = { [self] chunk in
            take(chunk.count) && (try? channel.send(Frame.stdin, chunk)) != nil
        }
        switch input {
        case .bytes(let bytes) where bytes.count <= 65536:  // at once, within any window
            if !bytes.isEmpty { try channel.send(Frame.stdin, bytes) }
            credit -= bytes.count
            try channel.send(Frame.stdin, [])
        case .bytes(let bytes):
            run {
                for start in stride(from: 0, to: bytes.count, by: 65536) {
                    guard send(Array(bytes[start..<min(start + 65536, bytes.count)])) else { return }
                }
                _ = send([])
            }
        case .fileDescriptor(let fd):
            run { [self] in
                var buffer = [UInt8](repeating: 0, count: 65536)
                while !isStopped {
                    var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                    let ready = poll(&poller, 1, 100)
                    if ready < 0 && errno == EINTR { continue }
                    if ready == 0 { continue }
                    let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                    // The end of the input (an empty frame): the command's stdin closes.
                    guard send(Array(buffer[0..<max(n, 0)])), n > 0 else { return }
                }
            }
        }
    }

    private func run(_ body: @escaping @Sendable () -> Void) {
        let thread = Thread { [self] in
            defer { finished.signal() }
            body()
        }
        condition.withLock { self.thread = thread }
        thread.start()
    }

    /// Stops reading and waits for the thread (the channel closes after this). A thread still
    /// blocked on `channel` after two seconds (an agent that takes no more) is freed by cutting
    /// the connection.
    func stop(cutting channel: Channel) {
        let running = condition.withLock { () -> Bool in
            stopped = true
            return thread != nil
        }
        condition.broadcast()
        guard running else { return }
        if finished.wait(timeout: .now() + 2) == .timedOut {
            channel.cutConnection()
            finished.wait()
        }
    }
}

/// The host's end of the agent's port: frames written whole, one writer at a time (the stdin
/// pump and signals share it).
public final class Channel: @unchecked Sendable {
    let fd: Int32
    private let lock = NSLock()
    private var closed = false
    private let cutFlag = Atomic<Bool>(false)

    init(fd: Int32) {
        self.fd = fd
    }

    /// Whether a frame may have been cut short (a failed write, a connection cut): the agent may
    /// hold part of a frame, which the next host on the port must complete with padding.
    var cut: Bool { cutFlag.load(ordering: .relaxed) }

    /// Zero bytes, which a live agent skips between frames: more than a frame holds completes
    /// whatever part of one a cut session left, and realigns the port.
    func realign() throws {
        lock.lock()
        defer { lock.unlock() }
        guard !closed else { throw SandboxError(.conflict, "the VM has ended") }
        try FileSystem.writeAll(
            fd: fd, [UInt8](repeating: 0, count: Int(AGENT_MAX_FRAME) + 16), path: "the agent's socket")
    }

    func send(_ type: UInt8, _ payload: [UInt8]) throws {
        lock.lock()
        defer { lock.unlock() }
        try sendHeld(type, payload)
    }

    /// `payload` in frames of at most 64 KiB each (the agent holds a frame whole).
    func sendChunked(_ type: UInt8, _ payload: [UInt8]) throws {
        for start in stride(from: 0, to: payload.count, by: 65536) {
            try send(type, Array(payload[start..<min(start + 65536, payload.count)]))
        }
    }

    private func sendHeld(_ type: UInt8, _ payload: [UInt8]) throws {
        guard !closed else { throw SandboxError(.conflict, "the VM has ended") }
        let size = UInt32(payload.count)
        let header: [UInt8] = [
            type, UInt8(size & 0xff), UInt8((size >> 8) & 0xff), UInt8((size >> 16) & 0xff),
            UInt8(size >> 24),
        ]
        do {
            try FileSystem.writeAll(fd: fd, header + payload, path: "the agent's socket")
        } catch {
            cutFlag.store(true, ordering: .relaxed)
            throw error
        }
    }

    /// Ends the connection under a blocked writer; the agent ends a command whose host went away.
    func cutConnection() {
        cutFlag.store(true, ordering: .relaxed)
        Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    /// Asks the agent to send `signal` to the command. A command that reads no stdin can leave
    /// the stdin pump blocked on the channel: past two seconds the connection is cut instead,
    /// and the agent ends a command whose host went away.
    public func signal(_ signal: Int32) {
        guard lock.lock(before: Date(timeIntervalSinceNow: 2)) else {
            cutConnection()
            return
        }
        defer { lock.unlock() }
        try? sendHeld(Frame.kill, Array(String(signal).utf8))
    }

    func close() {
        lock.withLock {
            if !closed { Glibc.close(fd) }
            closed = true
        }
    }
}
