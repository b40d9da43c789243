import CAgentProtocol
import CSandbox
import Foundation
import Glibc
import Sandbox
import SystemSupport

/// A VM that outlives the process that started it: a live sandbox. QEMU runs detached
/// (`-daemonize`) in its own directory, which holds its sockets (`agent.sock`, `qmp.sock`), its
/// pid, its console and its upper disk; the agent in the guest keeps the root mounted and serves
/// one host session at a time (`LiveSession`, Sources/contree-agent/live.c).
///
/// A memory snapshot (`snapshot`) freezes the guest's processes, takes its changes as a layer
/// tar, stops the guest and saves its RAM and devices, copies its upper disk, and lets it go on;
/// a loader QEMU then turns the RAM stream into a RAM file that children (`resume`) map copy on
/// write, so each child costs the memory it writes, not the guest's size.
public struct LiveVM: Sendable {
    /// What a memory snapshot's record says besides its files (`image_states.metadata`): the
    /// guest it restores into, the disks it had, and what commands in it default to.
    public struct Snapshot: Codable, Sendable {
        /// `VMBackend.guestIdentity`: kernel, initramfs, QEMU, accelerator, memory size.
        public var guest: String
        /// The layers (digests, bottom first) under its upper disk: a child attaches them.
        public var baseLayers: [String]
        public var memoryMiB: Int
        public var layerSlots: Int
        /// The main command of the sandbox that was saved, if any.
        public var command: [String]
        public var env: [String]
        public var workdir: String
        public var uid: UInt32
        public var gid: UInt32
        public var hostname: String

        public init(
            guest: String, baseLayers: [String], memoryMiB: Int, layerSlots: Int, command: [String], env: [String],
            workdir: String, uid: UInt32, gid: UInt32, hostname: String
        ) {
            self.guest = guest
            self.baseLayers = baseLayers
            self.memoryMiB = memoryMiB
            self.layerSlots = layerSlots
            self.command = command
            self.env = env
            self.workdir = workdir
            self.uid = uid
            self.gid = gid
            self.hostname = hostname
        }

        enum CodingKeys: String, CodingKey {
            case guest, command, env, workdir, uid, gid, hostname
            case baseLayers = "base_layers"
            case memoryMiB = "memory_mib"
            case layerSlots = "layer_slots"
        }

        /// The state kind in the store's `image_states`.
        public static let kind = "vm-memory"
    }

    public let directory: String
    public let pid: pid_t
    /// QEMU's start time (clock ticks since boot): with the pid, it names the process, so a pid
    /// the kernel handed to another process since is never taken for this VM.
    public let startTicks: UInt64

    /// A memory snapshot's files: `ram` (the guest's RAM, a sparse file as long as it), `state`
    /// (device state), `upper.img` (the upper disk, raw). A child attaches `layerSlots` layer
    /// disks, then the upper, exactly as the guest that was saved did.
    public struct MemoryState: Sendable {
        public var directory: String
        public var memoryMiB: Int
        public var layerSlots: Int
        public static let files = ["ram", "state", "upper.img"]

        public init(directory: String, memoryMiB: Int, layerSlots: Int) {
            self.directory = directory
            self.memoryMiB = memoryMiB
            self.layerSlots = layerSlots
        }
    }

    public init(directory: String, pid: pid_t, startTicks: UInt64) {
        self.directory = directory
        self.pid = pid
        self.startTicks = startTicks
    }

    /// Starts `command` (its argv may be empty: a sandbox that only waits) as the main process of
    /// a guest restored from `template` and leaves it running. `command.upperDisk` is a raw disk
    /// in `directory`; `command.layers` at most `template.layerSlots`.
    /// - Parameter onStart: QEMU's pid as soon as it runs (to kill it on a cancel).
    /// - Returns: the sandbox, and the main process's pid in the guest (0 for none).
    public static func start(
        _ vm: MicroVM, command: MicroVM.Command, template: MicroVM.Template, directory: String,
        onStart: (pid_t) -> Void = { _ in }
    ) throws -> (LiveVM, mainPID: Int) {
        guard command.caches.isEmpty, !command.network.isEgress else {
            throw SandboxError(
                .unsupported,
                "a live VM sandbox has no cache disks or egress yet; use --network loopback or none")
        }
        guard command.layers.count <= template.layerSlots else {
            throw SandboxError(
                .unsupported, "a VM takes at most \(template.layerSlots) layer disks; flatten the image first")
        }
        let layers = try paddedLayers(command.layers, slots: template.layerSlots, directory: directory)
        let (live, channel): (LiveVM, Channel)
        do {
            (live, channel) = try spawn(
                vm,
                vm.arguments(
                    work: directory, layers: layers, upper: command.upperDisk, ram: (template.ram, false),
                    restoring: true, daemon: true),
                directory: directory)
        } catch  where !template.isWhole {
            throw MicroVM.RestoreFailed(description: "the template was dropped while the VM started: \(error)")
        }
        onStart(live.pid)
        var started = false
        defer {
            channel.close()
            // Gone before this returns: a retry's QEMU opens the same upper disk, which QEMU
            // locks while it has it open.
            if !started { live.stop() }
        }
        do {
            try MicroVM.restore(
                state: template.state, qmp: try QMP(fd: try socket(directory, "qmp.sock")),
                deadline: Monotonic.now + 60)
        } catch {
            throw MicroVM.RestoreFailed(description: "\(error)")  // nothing ran
        }
        do {
            try channel.send(Frame.spec, MicroVM.spec(command, fresh: true, live: true))
        } catch {
            throw SandboxError(
                .sandboxSetup, "the VM took no command (\(error)): " + live.lastWords())
        }
        var reader = FrameReader(fd: channel.fd)
        while let frame = try reader.next(until: Monotonic.now + 120) {
            if frame.type == Frame.live {
                started = true
                let text = String(decoding: frame.payload, as: UTF8.self)
                return (live, Int(text.dropFirst(4)) ?? 0)
            }
            if frame.type == Frame.log {
                throw SandboxError(
                    .sandboxSetup, "the VM could not start: \(String(decoding: frame.payload, as: UTF8.self))")
            }
        }
        throw SandboxError(
            .sandboxSetup, "the VM did not start its sandbox: " + live.lastWords())
    }

    /// Starts a child of `state` in `directory`: its RAM the state's file mapped copy on write,
    /// its upper disk a copy-on-write overlay of the state's, the layer disks `layers` (the image
    /// the saved guest started from). The guest's processes go on where they were, with the host's
    /// time, fresh entropy and `hostname` (nil: the parent's).
    public static func resume(
        _ vm: MicroVM, state: MemoryState, layers: [String], hostname: String?, directory: String,
        onStart: (pid_t) -> Void = { _ in }
    ) throws -> LiveVM {
        guard vm.memoryMiB == state.memoryMiB else {
            throw SandboxError(
                .invalidArgument, "the state is of a \(state.memoryMiB) MiB guest, not \(vm.memoryMiB) MiB")
        }
        let upper = directory + "/upper.qcow2"
        try run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", state.directory + "/upper.img", "-F", "raw", upper],
            "make the child's upper disk")
        let (live, channel) = try spawn(
            vm,
            vm.arguments(
                work: directory, layers: try paddedLayers(layers, slots: state.layerSlots, directory: directory),
                upper: upper, ram: (state.directory + "/ram", false), restoring: true, upperFormat: "qcow2",
                daemon: true),
            directory: directory)
        onStart(live.pid)
        channel.close()  // a session of its own thaws the guest
        do {
            try MicroVM.restore(
                state: state.directory + "/state", qmp: try QMP(fd: try socket(directory, "qmp.sock")),
                deadline: Monotonic.now + 60)
            let session = try LiveSession(directory: directory)
            defer { session.close() }
            try session.thaw(hostname: hostname)
        } catch {
            let words = live.lastWords()
            live.stop()
            throw SandboxError(
                .sandboxSetup, "the sandbox could not be resumed from its memory snapshot: \(error); \(words)")
        }
        return live
    }

    /// Takes a memory snapshot into `staging` (made, empty): the changes go to `onChanges` (an
    /// OCI layer tar, all files the guest changed since it started) while every process of the
    /// sandbox is frozen; then the guest is stopped, saved, and goes on. `layers` and
    /// `layerSlots` are the disks it runs with; `upper` its upper disk (raw or qcow2).
    public func snapshot(
        _ vm: MicroVM, layers: [String], layerSlots: Int, upper: String, staging: String,
        onChanges: ([UInt8]) throws -> Void
    ) throws -> MemoryState {
        try FileSystem.withLock(directory + "/" + LiveVM.freezeLock) {
            try takeSnapshot(
                vm, layers: layers, layerSlots: layerSlots, upper: upper, staging: staging, onChanges: onChanges)
        }
    }

    /// Held while a snapshot or a change freezes the guest: a session that finds the guest frozen
    /// thaws it only when nobody holds this (a snapshot that died half way).
    public static let freezeLock = "freeze.lock"

    /// Whether a snapshot is freezing the guest in `directory` now.
    public static func isFreezing(_ directory: String) -> Bool {
        let fd = open(directory + "/" + freezeLock, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return flock(fd, LOCK_SH | LOCK_NB) != 0
    }

    private func takeSnapshot(
        _ vm: MicroVM, layers: [String], layerSlots: Int, upper: String, staging: String,
        onChanges: ([UInt8]) throws -> Void
    ) throws -> MemoryState {
        let session = try LiveSession(directory: directory)
        defer { session.close() }
        // Whatever fails, the sandbox goes on as it was.
        defer { if session.frozen { try? session.thaw(hostname: nil) } }
        try session.freeze(onChanges: onChanges)
        do {
            let qmp = try QMP(fd: try LiveVM.socket(directory, "qmp.sock"))
            try qmp.execute("stop")
            defer { _ = try? qmp.execute("cont") }
            Trace.mark("live: frozen and stopped")
            try MicroVM.save(
                qmp: qmp, to: staging + "/stream", ignoringShared: false, what: "the sandbox's memory",
                deadline: Monotonic.now + 600)
            Trace.mark("live: memory saved")
            try LiveVM.run(
                ["qemu-img", "convert", "-U", "-O", "raw", upper, staging + "/upper.img"], "copy the upper disk")
            Trace.mark("live: upper disk copied")
        }
        try session.thaw(hostname: nil)
        // The RAM stream becomes a RAM file: a loader QEMU maps a new shared file, takes the
        // stream in, and saves its devices alone (the RAM stays in the file).
        let loaderDirectory = staging + "/loader"
        try FileSystem.makeDirectories(loaderDirectory)
        defer { try? FileSystem.removeTree(loaderDirectory) }
        let (loader, channel) = try LiveVM.spawn(
            vm,
            vm.arguments(
                work: loaderDirectory,
                layers: try LiveVM.paddedLayers(layers, slots: layerSlots, directory: loaderDirectory),
                upper: staging + "/upper.img", ram: (staging + "/ram", true), restoring: true, daemon: true),
            directory: loaderDirectory)
        defer {
            channel.close()
            kill(loader.pid, SIGKILL)
        }
        let qmp = try QMP(fd: try LiveVM.socket(loaderDirectory, "qmp.sock"))
        try MicroVM.restore(
            state: staging + "/stream", qmp: qmp, deadline: Monotonic.now + 600, ignoringShared: false, resume: false)
        try MicroVM.save(
            qmp: qmp, to: staging + "/state", ignoringShared: true, what: "the snapshot's devices",
            deadline: Monotonic.now + 120)
        _ = try? qmp.execute("quit")
        unlink(staging + "/stream")
        Trace.mark("live: RAM file made")
        return MemoryState(directory: staging, memoryMiB: vm.memoryMiB, layerSlots: layerSlots)
    }

    /// Takes the sandbox's changes alone (its files: every process frozen meanwhile, then thawed).
    public func changes(onChanges: ([UInt8]) throws -> Void) throws {
        try FileSystem.withLock(directory + "/" + LiveVM.freezeLock) {
            let session = try LiveSession(directory: directory)
            defer { session.close() }
            defer { if session.frozen { try? session.thaw(hostname: nil) } }
            try session.freeze(onChanges: onChanges)
        }
    }

    /// Whether this QEMU still runs: its pid alive, not a zombie, and started at `startTicks`
    /// (a pid the kernel handed to another process is not ours).
    public static func isRunning(pid: pid_t, startTicks: UInt64) -> Bool {
        ChildProcess.startTicks(of: pid) == startTicks
    }

    /// Stops the VM (SIGKILL: nothing in it is kept) and waits until it is gone.
    public func stop() {
        guard LiveVM.isRunning(pid: pid, startTicks: startTicks) else { return }
        kill(pid, SIGKILL)
        for _ in 0..<500 where ChildProcess.startTicks(of: pid) != nil {
            var status: Int32 = 0
            _ = waitpid(pid, &status, WNOHANG)  // ours only when this process started it
            usleep(2_000)
        }
    }

    // MARK: - QEMU

    /// Unused layer slots get an empty disk: a restored guest finds the devices it was saved with.
    static func paddedLayers(_ layers: [String], slots: Int, directory: String) throws -> [String] {
        guard layers.count < slots else { return layers }
        try FileSystem.writeFile(directory + "/empty.img", [], mode: 0o644)
        return layers + Array(repeating: directory + "/empty.img", count: slots - layers.count)
    }

    /// Starts QEMU detached in `directory` and connects to its agent's socket, which lets the
    /// guest start. - Returns: the VM (the daemon's pid) and the connected channel.
    static func spawn(_ vm: MicroVM, _ arguments: [String], directory: String) throws -> (LiveVM, Channel) {
        let devNull = open("/dev/null", O_WRONLY | O_CLOEXEC)
        defer { if devNull >= 0 { close(devNull) } }
        let parent = try ChildProcess.spawn(arguments, captureStdout: false, stdoutFD: devNull, directory: directory)
        defer { close(parent.stderr) }
        func failure(_ status: Int32) -> SandboxError {
            let errors = String(
                decoding: (try? FileSystem.readAll(fd: parent.stderr, path: "qemu stderr")) ?? [], as: UTF8.self)
            let logged = MicroVM.tail(directory + "/qemu.log", 3000) ?? ""
            return SandboxError(
                .sandboxSetup,
                "qemu-system-x86_64 could not start the sandbox's VM (status \(status)): \(errors)\(logged)")
        }
        var agent: Int32 = -1
        for _ in 0..<2000 {
            if let fd = try? socket(directory, "agent.sock") {
                agent = fd
                break
            }
            var status: Int32 = 0
            if waitpid(parent.pid, &status, WNOHANG) == parent.pid { throw failure(status) }
            usleep(5_000)
        }
        guard agent >= 0 else {
            kill(parent.pid, SIGKILL)
            _ = try? ChildProcess.wait(parent.pid, "qemu")
            throw SandboxError(.sandboxSetup, "qemu-system-x86_64 did not open the agent's socket within 10 s")
        }
        let channel = Channel(fd: agent)
        // The first QEMU process exits once the daemon it forked is initialised.
        var status: Int32 = 0
        while waitpid(parent.pid, &status, 0) < 0 && errno == EINTR {}
        guard status == 0,
            let text = try? FileSystem.readFile(directory + "/qemu.pid"),
            let pid = pid_t(String(decoding: text, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
        else {
            channel.close()
            throw failure(status)
        }
        return (LiveVM(directory: directory, pid: pid, startTicks: ChildProcess.startTicks(of: pid) ?? 0), channel)
    }

    /// What a VM that went quiet left behind: whether QEMU still runs, what it wrote (its errors
    /// go to `qemu.log` once it is a daemon) and the end of the guest's console.
    func lastWords() -> String {
        let running =
            LiveVM.isRunning(pid: pid, startTicks: startTicks)
            ? "QEMU (pid \(pid)) still runs" : "QEMU (pid \(pid)) has exited"
        let qemu = MicroVM.tail(directory + "/qemu.log", 3000) ?? "(nothing)"
        let console = MicroVM.tail(directory + "/console.log", 3000) ?? "(nothing)"
        return "\(running); QEMU wrote:\n\(qemu)\nthe console ended with:\n\(console)"
    }

    /// A connection to the socket `name` in `directory`, reached through the directory's
    /// descriptor: a socket address holds 107 bytes, a store path may be longer.
    static func socket(_ directory: String, _ name: String) throws -> Int32 {
        let handle = csb_open_path_dir(directory)
        guard handle >= 0 else { throw SandboxError.system("open(\(directory))") }
        defer { close(handle) }
        guard let fd = connectUnixSocket("/proc/self/fd/\(handle)/\(name)") else {
            throw SandboxError(.sandboxSetup, "nothing listens on \(directory)/\(name): the VM is not running")
        }
        return fd
    }

    static func run(_ argv: [String], _ what: String) throws {
        let result = try ChildProcess.run(argv)
        guard result.succeeded else {
            throw SandboxError(.sandboxSetup, "could not \(what): \(argv[0]): \(result.stderrText)")
        }
    }
}

/// One host session with a live sandbox's agent, on one of its ports (a lock in the sandbox's
/// directory), opened by a hello that ends what the port's last session left running. The lock
/// file says whether that session ended cleanly ("c"); otherwise (a host killed mid-frame, a
/// connection cut) the new session realigns the port first.
/// `signal` may be called from any thread (a Ctrl-C handler); the rest from one at a time.
public final class LiveSession: @unchecked Sendable {
    private let channel: Channel
    private var reader: FrameReader
    private let lock: Int32
    private var closed = false
    /// The main process, as the agent says: `running`, `none`, or `exited status=N signal=N`.
    public private(set) var main = ""
    /// Whether the sandbox's processes are frozen (a snapshot that did not finish).
    public private(set) var frozen = false

    /// Opens a session on the first of the agent's ports no other session holds, waiting up to
    /// `timeout` for one to come free.
    public init(directory: String, timeout: Double = 60) throws {
        var held: (fd: Int32, port: Int)?
        let deadline = Monotonic.now + timeout
        while held == nil {
            for port in 0..<MicroVM.sessionPorts where held == nil {
                let path = directory + "/session-\(port).lock"
                let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
                guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
                if flock(fd, LOCK_EX | LOCK_NB) == 0 { held = (fd, port) } else { Glibc.close(fd) }
            }
            if held == nil {
                guard Monotonic.now < deadline else {
                    throw SandboxError(
                        .conflict,
                        "all \(MicroVM.sessionPorts) sessions with the sandbox are busy; retry when a command in it has ended"
                    )
                }
                usleep(20_000)
            }
        }
        let (lockFD, port) = held!
        lock = lockFD
        var last: UInt8 = 0
        let clean = pread(lock, &last, 1, 0) != 1 || last == UInt8(ascii: "c")
        var dirty = UInt8(ascii: "d")
        _ = pwrite(lock, &dirty, 1, 0)
        do {
            channel = Channel(fd: try LiveVM.socket(directory, port == 0 ? "agent.sock" : "agent\(port).sock"))
        } catch {
            Glibc.close(lock)
            throw error
        }
        reader = FrameReader(fd: channel.fd)
        do {
            if !clean { try channel.realign() }
            try channel.send(Frame.hello, [])
            let answer = try expect(Frame.hello, until: Monotonic.now + timeout)
            let text = String(decoding: answer, as: UTF8.self)
            frozen = text.hasSuffix(" frozen")
            main = String(text.dropFirst(5).dropLast(frozen ? 7 : 0))
        } catch {
            close()
            throw error
        }
    }

    /// Reads frames until one of `type` (earlier ones are a past session's); its payload.
    private func expect(
        _ type: UInt8, until deadline: Double, onFrame: (UInt8, [UInt8]) throws -> Void = { _, _ in }
    ) throws -> [UInt8] {
        while let frame = try reader.next(until: deadline) {
            if frame.type == type { return frame.payload }
            try onFrame(frame.type, frame.payload)
        }
        throw SandboxError(
            .sandboxSetup,
            Monotonic.now >= deadline
                ? "the sandbox's agent did not answer in time" : "the sandbox's VM closed the connection")
    }

    /// Runs one more command in the sandbox and waits for it.
    /// - Parameter keep: the command outlives this session (a run's own command: in a snapshot's
    ///   children it goes on, as everything the sandbox runs does); otherwise it ends with it.
    public func exec(
        argv: [String], env: [String], workdir: String, uid: UInt32, gid: UInt32, stdin: MicroVM.Input,
        timeout: Double, keep: Bool = false, onStdout: @escaping @Sendable ([UInt8]) -> Void,
        onStderr: @escaping @Sendable ([UInt8]) -> Void
    ) throws -> MicroVM.Outcome {
        var fields: [(Character, String)] = [(SpecField.workdir, workdir), (SpecField.user, "\(uid):\(gid)")]
        if keep { fields.append((SpecField.keep, "")) }
        fields += env.map { (SpecField.env, $0) } + argv.map { (SpecField.argument, $0) }
        let spec = MicroVM.encode(fields)
        guard spec.count <= Int(AGENT_MAX_FRAME) else {
            throw SandboxError(
                .invalidArgument,
                "the command's arguments and environment take \(spec.count) bytes; a live sandbox takes at most \(AGENT_MAX_FRAME) (pass large data as a file or on stdin)"
            )
        }
        let started = Monotonic.now
        try channel.send(Frame.exec, spec)
        let pump = InputPump(window: Int(AGENT_STDIN_WINDOW))
        defer { pump.stop(cutting: channel) }
        try pump.start(stdin, into: channel)
        var outcome = MicroVM.Outcome()
        do {
            let report = try expect(Frame.exit, until: started + timeout) { type, payload in
                if type == Frame.stdinAck { pump.acknowledge(Int(String(decoding: payload, as: UTF8.self)) ?? 0) }
                if type == Frame.stdout { onStdout(payload) }
                if type == Frame.stderr || type == Frame.log { onStderr(payload) }
            }
            MicroVM.readReport(report, into: &outcome)
        } catch  where Monotonic.now >= started + timeout {
            channel.signal(SIGKILL)
            outcome.termination.timedOut = true
        }
        outcome.metrics.wallSeconds = Monotonic.now - started
        return outcome
    }

    /// Puts a file (`bytes`) or a directory (nil) at `path` in the sandbox's root (every
    /// component of `path` resolved inside it, parents made where missing).
    public func put(_ path: String, mode: UInt32, uid: UInt32, gid: UInt32, bytes: [UInt8]?) throws {
        let header = "\(path)\0\(String(mode & 0o7777, radix: 8))\0\(uid):\(gid)\0\(bytes == nil ? "d" : "f")\0"
        try channel.send(Frame.put, Array(header.utf8))
        if let bytes {
            try channel.sendChunked(Frame.putData, bytes)
            try channel.send(Frame.putData, [])
        }
        let answer = try expect(Frame.put, until: Monotonic.now + 60)
        guard answer.isEmpty else {
            throw SandboxError(
                .invalidArgument,
                "could not put \(path) into the sandbox: \(String(decoding: answer, as: UTF8.self)); map it to another path in the sandbox"
            )
        }
    }

    /// Asks the agent to signal the running command.
    public func signal(_ signal: Int32) { channel.signal(signal) }

    /// Freezes every process of the sandbox and receives its changes.
    func freeze(onChanges: ([UInt8]) throws -> Void) throws {
        try channel.send(Frame.freeze, [])
        frozen = true  // from here on, whatever happens: a thaw is due
        let answer = try expect(Frame.freeze, until: Monotonic.now + 600) { type, payload in
            if type == Frame.changes { try onChanges(payload) }
        }
        guard answer.isEmpty else {
            throw SandboxError(.sandboxSetup, String(decoding: answer, as: UTF8.self))
        }
    }

    /// Lets the sandbox's processes go on, with the host's time, fresh entropy and `hostname`.
    public func thaw(hostname: String?) throws {
        var fields = MicroVM.freshFields()
        if let hostname { fields.append((SpecField.hostname, hostname)) }
        try channel.send(Frame.thaw, MicroVM.encode(fields))
        _ = try expect(Frame.thaw, until: Monotonic.now + 60)
        frozen = false
    }

    public func close() {
        guard !closed else { return }
        closed = true
        if !channel.cut {
            var clean = UInt8(ascii: "c")
            _ = pwrite(lock, &clean, 1, 0)
        }
        channel.close()
        Glibc.close(lock)
    }
}
