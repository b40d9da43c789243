import CAgentProtocol
import Foundation
import Glibc
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

/// Passes a host descriptor's bytes to the guest as they arrive, on a thread of its own, until
/// the descriptor ends (then an empty frame closes the command's stdin) or the run ends.
final class InputPump: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)

    func start(from fd: Int32, send: @escaping @Sendable ([UInt8]) -> Void) {
        let thread = Thread { [self] in
            defer { finished.signal() }
            var buffer = [UInt8](repeating: 0, count: 65536)
            while !lock.withLock({ stopped }) {
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let ready = poll(&poller, 1, 100)
                if ready < 0 && errno == EINTR { continue }
                if ready == 0 { continue }
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                if n <= 0 {
                    send([])  // the end of the input: the command's stdin closes
                    return
                }
                send(Array(buffer[0..<n]))
            }
        }
        lock.withLock { self.thread = thread }
        thread.start()
    }

    /// Stops reading and waits for the thread (the channel closes after this).
    func stop() {
        let running = lock.withLock { () -> Bool in
            stopped = true
            return thread != nil
        }
        if running { finished.wait() }
    }
}

/// The host's end of the agent's port: frames written whole, one writer at a time (the stdin
/// pump and signals share it).
public final class Channel: @unchecked Sendable {
    let fd: Int32
    private let lock = NSLock()
    private var closed = false

    init(fd: Int32) {
        self.fd = fd
    }

    func send(_ type: UInt8, _ payload: [UInt8]) throws {
        let size = UInt32(payload.count)
        let header: [UInt8] = [
            type, UInt8(size & 0xff), UInt8((size >> 8) & 0xff), UInt8((size >> 16) & 0xff),
            UInt8(size >> 24),
        ]
        try lock.withLock {
            guard !closed else { throw SandboxError(.conflict, "the VM has ended") }
            try FileSystem.writeAll(fd: fd, header + payload, path: "the agent's socket")
        }
    }

    /// Asks the agent to send `signal` to the command.
    public func signal(_ signal: Int32) { try? send(Frame.kill, Array(String(signal).utf8)) }

    func close() {
        lock.withLock {
            if !closed { Glibc.close(fd) }
            closed = true
        }
    }
}
