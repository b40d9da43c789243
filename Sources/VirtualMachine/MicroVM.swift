import Foundation
import Glibc
import Sandbox
import SystemSupport

/// One command in a fresh QEMU `microvm`: the image's layers as read-only erofs disks under an
/// overlay in the guest, the command's output streamed back over a virtio-serial port (see
/// Sources/contree-agent/agent.c for the frames), the guest powered off at the end. No network
/// device. The QEMU process, its socket and its temporary files never outlive the run.
public struct MicroVM: Sendable {
    public let kit: GuestKit
    /// The guest's RAM, which is also its memory limit.
    public var memoryMiB = 256
    public var accelerator = "tcg"

    public init(kit: GuestKit) {
        self.kit = kit
    }

    public struct Command: Sendable {
        public var argv: [String]
        public var env: [String]
        public var workdir: String
        /// erofs images of the image's layers, bottom first.
        public var layers: [String]
        /// An ext4 image holding `upper/` and `work/`: the run's changes land there. Without
        /// it the changes stay in the guest's memory and are lost.
        public var upperDisk: String?
        public var uid: UInt32 = 0
        public var gid: UInt32 = 0
        public var hostname: String?
        /// `lo` up in the guest (it never has another interface).
        public var loopback = true

        public init(
            argv: [String], env: [String] = [], workdir: String = "/", layers: [String], upperDisk: String? = nil
        ) {
            self.argv = argv
            self.env = env
            self.workdir = workdir
            self.layers = layers
            self.upperDisk = upperDisk
        }
    }

    public struct Outcome: Sendable {
        /// How the command ended (exit code, signal, timeout), as every backend says it.
        public var termination = Termination()
        /// What the agent measured: CPU time, peak memory, processes the command created
        /// (itself included), the disks' block I/O; and the wall time from starting QEMU.
        public var metrics = RunMetrics()
        /// Wall time from starting QEMU to the agent's ready frame.
        public var bootSeconds = 0.0
        /// The guest console (kernel messages), kept when the run failed.
        public var console: String?
    }

    /// The agent's spec: NUL-terminated fields, a kind letter then its text. `fresh` adds the
    /// host's time and 64 bytes of its entropy (a restored guest has the template's).
    static func spec(_ command: Command, fresh: Bool = false) -> [UInt8] {
        var fields: [String] = command.layers.indices.map { "Dlayer\($0)" }
        if fresh {
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            fields.append("T\(now.tv_sec).\(now.tv_nsec)")
            var generator = SystemRandomNumberGenerator()
            fields.append("Z" + Hex.encode((0..<64).map { _ in UInt8.random(in: 0...255, using: &generator) }))
        }
        if command.upperDisk != nil { fields.append("Pupper") }
        fields.append("W" + command.workdir)
        fields.append("U\(command.uid):\(command.gid)")
        if let hostname = command.hostname { fields.append("H" + hostname) }
        fields.append(command.loopback ? "Nloopback" : "Nnone")
        fields += command.env.map { "E" + $0 }
        fields += command.argv.map { "A" + $0 }
        return fields.flatMap { Array($0.utf8) + [0] }
    }

    /// A saved guest, stopped at the agent's ready point: its RAM in a file every run maps
    /// copy-on-write, its device state in another. Runs restored from it skip the boot; they
    /// must attach the same devices (`layerSlots` layer disks, then the upper disk).
    public struct Template: Sendable {
        public var ram: String
        public var state: String
        public var layerSlots: Int
    }

    /// Starts QEMU with `arguments`, its stdout on /dev/null (the descriptor closed again).
    private func spawnQEMU(_ arguments: [String]) throws -> ChildProcess.Spawned {
        let devNull = open("/dev/null", O_WRONLY | O_CLOEXEC)
        defer { if devNull >= 0 { close(devNull) } }
        return try ChildProcess.spawn(arguments, captureStdout: false, stdoutFD: devNull)
    }

    /// A path inside a QEMU option (commas doubled) or a shell word (single-quoted).
    static func option(_ path: String) -> String { path.replacingOccurrences(of: ",", with: ",,") }
    static func shellWord(_ path: String) -> String { "'" + path.replacingOccurrences(of: "'", with: #"'\''"#) + "'" }
    /// A string as a JSON string literal's contents.
    static func json(_ text: String) -> String {
        text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
    }

    /// A template that could not be restored (another QEMU, a damaged file): nothing ran yet.
    public struct RestoreFailed: Error, CustomStringConvertible {
        public var description: String
    }

    /// QEMU's arguments: the machine, the agent's port, the disks.
    func arguments(
        work: String, layers: [String], upper: String?, ram: (path: String, shared: Bool)?, restoring: Bool
    ) -> [String] {
        var machine = "microvm,x-option-roms=off,isa-serial=on,rtc=off"
        if ram != nil { machine += ",memory-backend=ram" }
        var arguments = [
            "qemu-system-x86_64", "-M", machine, "-accel", accelerator, "-cpu", "max", "-m", String(memoryMiB),
            "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "file:" + MicroVM.option(work + "/console.log"), "-kernel", kit.kernel, "-initrd", kit.initramfs,
            "-append", "console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=2000000 lpj=8000000 no_timer_check",
            "-device", "virtio-serial-device",
            // QEMU waits for this process to connect before the guest starts: nothing is lost.
            "-chardev", "socket,id=agent,path=\(MicroVM.option(work + "/agent.sock")),server=on,wait=on",
            "-device", "virtserialport,chardev=agent,nr=1,name=contree",
            "-qmp", "unix:\(MicroVM.option(work + "/qmp.sock")),server=on,wait=off",
        ]
        if let ram {
            // Shared while a template is made (the RAM lands in the file); private (copy on
            // write) in a restored run, so clones of one template never see each other.
            arguments += [
                "-object",
                "memory-backend-file,id=ram,size=\(memoryMiB)M,mem-path=\(MicroVM.option(ram.path)),share=\(ram.shared ? "on" : "off")",
            ]
        }
        if restoring { arguments += ["-incoming", "defer"] }
        for (index, layer) in layers.enumerated() {
            arguments += [
                "-drive", "id=layer\(index),file=\(MicroVM.option(layer)),format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=layer\(index),serial=layer\(index)",
            ]
        }
        if let upper {
            arguments += [
                "-drive", "id=upper,file=\(MicroVM.option(upper)),format=raw,if=none,cache=unsafe",
                "-device", "virtio-blk-device,drive=upper,serial=upper",
            ]
        }
        return arguments
    }

    /// Whether a guest boots to its agent within `seconds` with this accelerator.
    public func boots(within seconds: Double) -> Bool {
        let work = "/tmp/contree-vm-" + UUID().uuidString.lowercased().prefix(12)
        guard (try? FileSystem.makeDirectories(work)) != nil else { return false }
        defer { try? FileSystem.removeTree(work) }
        guard
            let qemu = try? spawnQEMU(arguments(work: work, layers: [], upper: nil, ram: nil, restoring: false))
        else { return false }
        defer {
            kill(qemu.pid, SIGKILL)
            _ = try? ChildProcess.wait(qemu.pid, "qemu")
            close(qemu.stderr)
        }
        guard let channel = try? connect(work + "/agent.sock", qemu: qemu.pid) else { return false }
        defer { close(channel) }
        var reader = FrameReader(fd: channel)
        return (try? reader.next(until: monotonicSeconds() + seconds))??.type == UInt8(ascii: "R")
    }

    /// Boots a guest to the agent's ready point and saves it as a template in `directory`
    /// (`layerSlots` layer disks and an upper disk, each `slotBytes` as the guest sees them).
    public func makeTemplate(in directory: String, layerSlots: Int, slotBytes: Int64) throws -> Template {
        let work = "/tmp/contree-vm-" + UUID().uuidString.lowercased().prefix(12)
        try FileSystem.makeDirectories(work)
        defer { try? FileSystem.removeTree(work) }
        // Placeholder disks: the guest only probes them before its ready point.
        let placeholder = work + "/slot.img"
        let upperPlaceholder = work + "/upper.img"  // a file of its own: QEMU locks a writable disk
        for path in [placeholder, upperPlaceholder] {
            try FileSystem.writeFile(path, [], mode: 0o644)
            guard truncate(path, off_t(slotBytes)) == 0 else { throw SandboxError.system("truncate(\(path))") }
        }
        let ram = directory + "/ram.partial"
        let state = directory + "/state.partial"
        let qemu = try spawnQEMU(
            arguments(
                work: work, layers: Array(repeating: placeholder, count: layerSlots), upper: upperPlaceholder,
                ram: (ram, true), restoring: false))
        defer {
            kill(qemu.pid, SIGKILL)
            _ = try? ChildProcess.wait(qemu.pid, "qemu")
            close(qemu.stderr)
        }
        let channel = try connect(work + "/agent.sock", qemu: qemu.pid)
        defer { close(channel) }
        var reader = FrameReader(fd: channel)
        guard let ready = try reader.next(until: monotonicSeconds() + 300), ready.type == UInt8(ascii: "R") else {
            let console = MicroVM.tail(work + "/console.log", 3000)
            kill(qemu.pid, SIGKILL)
            let errors = String(
                decoding: (try? FileSystem.readAll(fd: qemu.stderr, path: "qemu stderr")) ?? [], as: UTF8.self)
            throw SandboxError(
                .sandboxSetup, "the template VM never reached its agent: \(errors)\nconsole:\n\(console ?? "")")
        }
        let qmp = try QMP(path: work + "/qmp.sock")
        try qmp.execute("stop")
        try qmp.execute(
            "migrate-set-capabilities", #"{"capabilities":[{"capability":"x-ignore-shared","state":true}]}"#)
        try qmp.execute("migrate", #"{"uri":"exec:cat > \#(MicroVM.json(MicroVM.shellWord(state)))"}"#)
        let deadline = monotonicSeconds() + 120
        while true {
            let answer = try qmp.execute("query-migrate")
            if answer.contains(#""status": "completed""#) || answer.contains(#""status":"completed""#) { break }
            if answer.contains("failed") || monotonicSeconds() > deadline {
                throw SandboxError(.sandboxSetup, "saving the template VM failed: \(answer)")
            }
            usleep(10_000)
        }
        try? qmp.execute("quit")
        try FileSystem.rename(ram, directory + "/ram")
        try FileSystem.rename(state, directory + "/state")
        return Template(ram: directory + "/ram", state: directory + "/state", layerSlots: layerSlots)
    }

    /// The command's stdin: bytes, or a host descriptor read as the command runs (a pipe or a
    /// terminal: what arrives is passed on at once, and its end closes the command's stdin).
    public enum Input: Sendable {
        case bytes([UInt8])
        case fileDescriptor(Int32)
    }

    /// Runs `command` in a fresh guest (booted, or restored from `template`); `onStdout` and
    /// `onStderr` see the output as it arrives.
    public func run(
        _ command: Command, stdin: Input = .bytes([]), timeout: Double = 600, template: Template? = nil,
        onStart: @Sendable (pid_t) -> Void = { _ in },
        onStdout: @escaping @Sendable ([UInt8]) -> Void = { _ in },
        onStderr: @escaping @Sendable ([UInt8]) -> Void = { _ in },
        onChanges: ([UInt8]) throws -> Void = { _ in },
        onRunning: (Channel) -> Void = { _ in }
    ) throws -> Outcome {
        guard command.layers.count <= (template?.layerSlots ?? 20) else {
            throw SandboxError(.unsupported, "a VM takes at most 20 layer disks; flatten the image first")
        }
        let work = "/tmp/contree-vm-" + UUID().uuidString.lowercased().prefix(12)
        try FileSystem.makeDirectories(work)
        defer { try? FileSystem.removeTree(work) }
        var layers = command.layers
        if let template {
            // The template's devices, all of them: unused slots get an empty disk.
            try FileSystem.writeFile(work + "/empty.img", [], mode: 0o644)
            layers += Array(repeating: work + "/empty.img", count: template.layerSlots - layers.count)
        }
        let started = monotonicSeconds()
        let qemu = try spawnQEMU(
            arguments(
                work: work, layers: layers, upper: command.upperDisk,
                ram: template.map { ($0.ram, false) }, restoring: template != nil))
        onStart(qemu.pid)
        var reaped = false
        defer {
            if !reaped {
                kill(qemu.pid, SIGKILL)
                _ = try? ChildProcess.wait(qemu.pid, "qemu")
            }
            close(qemu.stderr)
        }
        let socket = try connect(work + "/agent.sock", qemu: qemu.pid)
        let channel = Channel(fd: socket)
        defer { channel.close() }
        let deadline = started + timeout
        var outcome = Outcome()
        let pump = InputPump()
        defer { pump.stop() }
        var specSent = false
        func start() throws {
            guard !specSent else { return }  // a second ready frame is not the agent's
            specSent = true
            outcome.bootSeconds = monotonicSeconds() - started
            try channel.send("S", MicroVM.spec(command, fresh: true))
            switch stdin {
            case .bytes(let bytes):
                if !bytes.isEmpty { try channel.send("I", bytes) }
                try channel.send("I", [])
            case .fileDescriptor(let fd):
                pump.start(from: fd) { chunk in try? channel.send("I", chunk) }
            }
            onRunning(channel)
        }
        if let template {
            do {
                try restore(template, work: work, deadline: deadline)
            } catch {
                throw RestoreFailed(description: "\(error)")
            }
            try start()
        }
        var reader = FrameReader(fd: socket)
        loop: while true {
            guard let frame = try reader.next(until: deadline) else {
                outcome.termination.timedOut = monotonicSeconds() >= deadline
                break
            }
            switch frame.type {
            case UInt8(ascii: "R"):
                try start()
            case UInt8(ascii: "O"): onStdout(frame.payload)
            case UInt8(ascii: "E"): onStderr(frame.payload)
            case UInt8(ascii: "L"): onStderr(frame.payload + [10])
            case UInt8(ascii: "T"): try onChanges(frame.payload)
            case UInt8(ascii: "X"):
                let report = String(decoding: frame.payload, as: UTF8.self)
                var values: [String: Int64] = [:]
                for pair in report.split(separator: " ") {
                    let parts = pair.split(separator: "=")
                    if parts.count == 2 { values[String(parts[0])] = Int64(parts[1]) }
                }
                // The guest is not trusted: numbers out of range are dropped, never trapped on.
                if let status = values["status"], (0...255).contains(status) {
                    outcome.termination.exitCode = Int32(status)
                }
                if let signal = values["signal"], (1...64).contains(signal) {
                    outcome.termination.signal = Int32(signal)
                }
                outcome.metrics.cpuUserSeconds = Double(max(0, values["utime_us"] ?? 0)) / 1e6
                outcome.metrics.cpuSystemSeconds = Double(max(0, values["stime_us"] ?? 0)) / 1e6
                outcome.metrics.peakMemoryBytes = min(max(0, values["maxrss_kb"] ?? 0), Int64.max / 1024) * 1024
                outcome.metrics.processes = values["processes"] ?? 0
                outcome.metrics.bytesRead = values["read_bytes"] ?? 0
                outcome.metrics.bytesWritten = values["write_bytes"] ?? 0
                break loop
            default: continue
            }
        }
        // The agent reports after it unmounted the upper disk and synced: every write has
        // reached QEMU's image file, so the guest need not be waited for while it powers off.
        kill(qemu.pid, SIGKILL)
        _ = try? ChildProcess.wait(qemu.pid, "qemu")
        reaped = true
        outcome.metrics.wallSeconds = monotonicSeconds() - started
        if outcome.termination.exitCode == nil && outcome.termination.signal == nil {
            outcome.console = MicroVM.tail(work + "/console.log", 4000)
        }
        return outcome
    }

    /// Loads `template`'s state into the paused QEMU listening on `work`'s QMP socket and
    /// lets the guest go on.
    private func restore(_ template: Template, work: String, deadline: Double) throws {
        let qmp = try QMP(path: work + "/qmp.sock")
        try qmp.execute(
            "migrate-set-capabilities", #"{"capabilities":[{"capability":"x-ignore-shared","state":true}]}"#)
        try qmp.execute(
            "migrate-incoming", #"{"uri":"exec:cat \#(MicroVM.json(MicroVM.shellWord(template.state)))"}"#)
        while true {
            let status = try qmp.execute("query-status")
            if status.contains(#""status": "paused""#) || status.contains(#""status":"paused""#) { break }
            let migration = try qmp.execute("query-migrate")
            if migration.contains("failed") || monotonicSeconds() > deadline {
                throw SandboxError(.sandboxSetup, "the VM was not restored from its template: \(migration)")
            }
            usleep(2_000)
        }
        try qmp.execute("cont")
    }

    /// The last `count` bytes of a file (a console the guest may have filled), read alone.
    static func tail(_ path: String, _ count: Int) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        let end = lseek(fd, 0, SEEK_END)
        guard end >= 0 else { return nil }
        var bytes = [UInt8](repeating: 0, count: Int(min(off_t(count), end)))
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, end - off_t($0.count)) }
        return n > 0 ? String(decoding: bytes[0..<n], as: UTF8.self) : nil
    }

    /// Connects to QEMU's socket once it listens (or fails when QEMU died).
    private func connect(_ path: String, qemu: pid_t) throws -> Int32 {
        for _ in 0..<1000 {
            if let fd = connectUnixSocket(path) { return fd }
            var status: Int32 = 0
            if waitpid(qemu, &status, WNOHANG) == qemu {
                throw SandboxError(.sandboxSetup, "qemu-system-x86_64 exited before the VM started (status \(status))")
            }
            usleep(5_000)
        }
        throw SandboxError(.sandboxSetup, "qemu-system-x86_64 did not open the agent's socket within 5 s")
    }

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
            let remaining = deadline - monotonicSeconds()
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

/// CLOCK_MONOTONIC in seconds.
func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// QEMU's machine protocol (QMP) over its unix socket: one command at a time, answers read
/// past the events QEMU sends in between.
final class QMP {
    private let fd: Int32
    private var buffer: [UInt8] = []

    init(path: String) throws {
        var connected: Int32 = -1
        for _ in 0..<1000 {
            if let fd = connectUnixSocket(path) {
                connected = fd
                break
            }
            usleep(5_000)
        }
        guard connected >= 0 else { throw SandboxError(.sandboxSetup, "QEMU's QMP socket did not open") }
        fd = connected
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

    func send(_ type: Character, _ payload: [UInt8]) throws {
        let size = UInt32(payload.count)
        let header: [UInt8] = [
            type.asciiValue!, UInt8(size & 0xff), UInt8((size >> 8) & 0xff), UInt8((size >> 16) & 0xff),
            UInt8(size >> 24),
        ]
        try lock.withLock {
            guard !closed else { throw SandboxError(.conflict, "the VM has ended") }
            try FileSystem.writeAll(fd: fd, header + payload, path: "the agent's socket")
        }
    }

    /// Asks the agent to send `signal` to the command.
    public func signal(_ signal: Int32) { try? send("K", Array(String(signal).utf8)) }

    func close() {
        lock.withLock {
            if !closed { Glibc.close(fd) }
            closed = true
        }
    }
}
