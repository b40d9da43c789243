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
        /// The guest's network: `loopback` (only `lo`, up; the default), `none`, or egress: a
        /// virtio-net device behind passt, configured as pasta configures a container's.
        public var network = NetworkMode.loopback
        /// ext4 disks (host paths) the guest mounts read-write at paths in the root: dependency
        /// caches. What the command writes there stays on the disk, not in the change.
        public var caches: [(disk: String, target: String)] = []

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

    /// The agent's spec: NUL-terminated fields, a kind (`SpecField`) then its text. `fresh`
    /// adds the host's time and 64 bytes of its entropy (a restored guest has the template's).
    static func spec(_ command: Command, fresh: Bool = false, live: Bool = false) -> [UInt8] {
        var fields: [(Character, String)] = command.layers.indices.map { (SpecField.layer, "layer\($0)") }
        if fresh { fields += freshFields() }
        if command.upperDisk != nil { fields.append((SpecField.upper, "upper")) }
        fields.append((SpecField.workdir, command.workdir))
        fields.append((SpecField.user, "\(command.uid):\(command.gid)"))
        if let hostname = command.hostname { fields.append((SpecField.hostname, hostname)) }
        fields.append((SpecField.network, command.network.rawValue))
        fields += command.caches.enumerated().map { (SpecField.cache, "cache\($0.offset)\t\($0.element.target)") }
        fields += command.env.map { (SpecField.env, $0) }
        fields += command.argv.map { (SpecField.argument, $0) }
        if live { fields.append((SpecField.live, "")) }
        return encode(fields)
    }

    /// The host's time and 64 bytes of its entropy, as spec fields: what a restored guest
    /// must not keep from its template or parent.
    static func freshFields() -> [(Character, String)] {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var generator = SystemRandomNumberGenerator()
        let entropy = (0..<64).map { _ in UInt8.random(in: 0...255, using: &generator) }
        return [(SpecField.time, "\(now.tv_sec).\(now.tv_nsec)"), (SpecField.entropy, Hex.encode(entropy))]
    }

    /// Spec fields as the agent reads them: each a kind byte and its text, NUL-terminated.
    static func encode(_ fields: [(Character, String)]) -> [UInt8] {
        fields.flatMap { Array(String($0.0).utf8) + Array($0.1.utf8) + [0] }
    }

    /// A saved guest, stopped at the agent's ready point: its RAM in a file every run maps
    /// copy-on-write, its device state in another. Runs restored from it skip the boot; they
    /// must attach the same devices (`layerSlots` layer disks, then the upper disk).
    public struct Template: Sendable {
        public var ram: String
        public var state: String
        public var layerSlots: Int

        /// Whether its files are still there (another process may drop a template that would
        /// not restore for it: a QEMU that could not open them is then a failed restore).
        var isWhole: Bool { FileSystem.exists(ram) && FileSystem.exists(state) }
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

    /// The agent's ports: the first one every run uses, the others a live sandbox's sessions.
    /// Part of the devices a template is saved with.
    static let sessionPorts = 5

    /// QEMU's arguments: the machine, the agent's ports, the disks.
    /// - Parameter daemon: QEMU detaches once started (`-daemonize`, its pid in `work/qemu.pid`)
    ///   and is started in `work`: its sockets are named relative to it, so that a long store
    ///   path never exceeds a socket address (`LiveVM.socket` reaches them the same way).
    func arguments(
        work: String, layers: [String], upper: String?, ram: (path: String, shared: Bool)?, restoring: Bool,
        uplink: String? = nil, caches: [String] = [], upperFormat: String = "raw", daemon: Bool = false
    ) -> [String] {
        var machine = "microvm,x-option-roms=off,isa-serial=on,rtc=off"
        if ram != nil { machine += ",memory-backend=ram" }
        let sockets = daemon ? "" : work + "/"
        var arguments = [
            "qemu-system-x86_64", "-M", machine, "-accel", accelerator, "-cpu", "max", "-m", String(memoryMiB),
            "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "file:" + MicroVM.option(work + "/console.log"), "-kernel", kit.kernel, "-initrd", kit.initramfs,
            "-append", "console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=2000000 lpj=8000000 no_timer_check",
            "-device", "virtio-serial-device",
            // QEMU waits for this process to connect before the guest starts: nothing is lost.
            "-chardev", "socket,id=agent,path=\(MicroVM.option(sockets + "agent.sock")),server=on,wait=on",
            "-device", "virtserialport,chardev=agent,nr=1,name=contree",
        ]
        // More ports for a live sandbox's sessions side by side (nobody need connect to them).
        for port in 1..<MicroVM.sessionPorts {
            arguments += [
                "-chardev",
                "socket,id=agent\(port),path=\(MicroVM.option(sockets + "agent\(port).sock")),server=on,wait=off",
                "-device", "virtserialport,chardev=agent\(port),nr=\(port + 1),name=contree\(port)",
            ]
        }
        arguments += [
            "-qmp", "unix:\(MicroVM.option(sockets + "qmp.sock")),server=on,wait=off",
        ]
        if daemon {
            // A daemon's stderr is /dev/null unless it logs: with a log file, QEMU writes its
            // errors there too (a restore that went wrong, an abort), so a failure can say why.
            arguments += [
                "-daemonize", "-pidfile", work + "/qemu.pid", "-D", work + "/qemu.log", "-d", "guest_errors",
            ]
        }
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
                "-drive", "id=upper,file=\(MicroVM.option(upper)),format=\(upperFormat),if=none,cache=unsafe",
                "-device", "virtio-blk-device,drive=upper,serial=upper",
            ]
        }
        for (index, disk) in caches.enumerated() {
            arguments += [
                "-drive", "id=cache\(index),file=\(MicroVM.option(disk)),format=raw,if=none,cache=unsafe",
                "-device", "virtio-blk-device,drive=cache\(index),serial=cache\(index)",
            ]
        }
        if let uplink {  // passt's socket: the guest's one network device
            arguments += [
                "-netdev", "stream,id=uplink,server=off,addr.type=unix,addr.path=\(MicroVM.option(uplink))",
                "-device", "virtio-net-device,netdev=uplink",
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
        return (try? reader.next(until: Monotonic.now + seconds))??.type == Frame.ready
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
        guard let ready = try reader.next(until: Monotonic.now + 300), ready.type == Frame.ready else {
            let console = MicroVM.tail(work + "/console.log", 3000)
            kill(qemu.pid, SIGKILL)
            let errors = String(
                decoding: (try? FileSystem.readAll(fd: qemu.stderr, path: "qemu stderr")) ?? [], as: UTF8.self)
            throw SandboxError(
                .sandboxSetup, "the template VM never reached its agent: \(errors)\nconsole:\n\(console ?? "")")
        }
        let qmp = try QMP(path: work + "/qmp.sock")
        try qmp.execute("stop")
        try MicroVM.save(
            qmp: qmp, to: state, ignoringShared: true, what: "the template VM", deadline: Monotonic.now + 120)
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
        onCache: (Int, ArraySlice<UInt8>) throws -> Void = { _, _ in },
        onRunning: (Channel) -> Void = { _ in }
    ) throws -> Outcome {
        guard template == nil || command.caches.isEmpty else {
            throw SandboxError(.unsupported, "a VM with cache disks boots cold: it cannot restore a template")
        }
        guard command.layers.count + command.caches.count <= (template?.layerSlots ?? 20) else {
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
        // Egress: passt listens on a socket QEMU connects to (no template has that device).
        var uplink: NATUplink?
        if command.network.isEgress {
            guard template == nil else {
                throw SandboxError(.unsupported, "a VM with egress boots cold: it cannot restore a template")
            }
            uplink = try NATUplink(
                program: try NATUplink.program(), mode: .passt(socketPath: work + "/uplink.sock"),
                hostLoopback: command.network == .egressHostLoopback)
        }
        defer { uplink?.close() }
        let started = Monotonic.now
        let qemu = try spawnQEMU(
            arguments(
                work: work, layers: layers, upper: command.upperDisk,
                ram: template.map { ($0.ram, false) }, restoring: template != nil,
                uplink: uplink == nil ? nil : work + "/uplink.sock", caches: command.caches.map(\.disk)))
        onStart(qemu.pid)
        var reaped = false
        defer {
            if !reaped {
                kill(qemu.pid, SIGKILL)
                _ = try? ChildProcess.wait(qemu.pid, "qemu")
            }
            close(qemu.stderr)
        }
        let socket: Int32
        do {
            socket = try connect(work + "/agent.sock", qemu: qemu.pid)
        } catch  where template.map({ !$0.isWhole }) ?? false {
            throw RestoreFailed(description: "the template was dropped while the VM started: \(error)")
        }
        let channel = Channel(fd: socket)
        defer { channel.close() }
        let deadline = started + timeout
        var outcome = Outcome()
        let pump = InputPump()
        defer { pump.stop(cutting: channel) }
        var specSent = false
        func start() throws {
            guard !specSent else { return }  // a second ready frame is not the agent's
            specSent = true
            outcome.bootSeconds = Monotonic.now - started
            try channel.send(Frame.spec, MicroVM.spec(command, fresh: true))
            try pump.start(stdin, into: channel)
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
                outcome.termination.timedOut = Monotonic.now >= deadline
                break
            }
            switch frame.type {
            case Frame.ready:
                try start()
            case Frame.stdout: onStdout(frame.payload)
            case Frame.stderr: onStderr(frame.payload)
            case Frame.log: onStderr(frame.payload + [10])
            case Frame.changes: try onChanges(frame.payload)
            case Frame.cache:
                guard let index = frame.payload.first, Int(index) < command.caches.count else {
                    throw SandboxError(.sandboxSetup, "the VM sent a cache that it was not given")
                }
                try onCache(Int(index), frame.payload.dropFirst())
            case Frame.exit:
                MicroVM.readReport(frame.payload, into: &outcome)
                break loop
            default: continue
            }
        }
        // The agent reports after it unmounted the upper disk and synced: every write has
        // reached QEMU's image file, so the guest need not be waited for while it powers off.
        kill(qemu.pid, SIGKILL)
        _ = try? ChildProcess.wait(qemu.pid, "qemu")
        reaped = true
        outcome.metrics.wallSeconds = Monotonic.now - started
        if outcome.termination.exitCode == nil && outcome.termination.signal == nil {
            outcome.console = MicroVM.tail(work + "/console.log", 4000)
        }
        return outcome
    }

    /// The agent's report of a command's end (AGENT_FRAME_EXIT) into `outcome`.
    static func readReport(_ payload: [UInt8], into outcome: inout Outcome) {
        var values: [String: Int64] = [:]
        for pair in String(decoding: payload, as: UTF8.self).split(separator: " ") {
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
    }

    /// Loads `template`'s state into the paused QEMU listening on `work`'s QMP socket and
    /// lets the guest go on.
    private func restore(_ template: Template, work: String, deadline: Double) throws {
        try MicroVM.restore(state: template.state, qmp: try QMP(path: work + "/qmp.sock"), deadline: deadline)
    }

    /// Saves the stopped guest behind `qmp` to the file `path` (a migration stream): its device
    /// state, and its RAM unless `ignoringShared` and the RAM is a shared file.
    static func save(qmp: QMP, to path: String, ignoringShared: Bool, what: String, deadline: Double) throws {
        try qmp.execute(
            "migrate-set-capabilities",
            #"{"capabilities":[{"capability":"x-ignore-shared","state":\#(ignoringShared)}]}"#)
        try qmp.execute("migrate", #"{"uri":"exec:cat > \#(MicroVM.json(MicroVM.shellWord(path)))"}"#)
        while true {
            let answer = try qmp.execute("query-migrate")
            if answer.contains(#""status": "completed""#) || answer.contains(#""status":"completed""#) { return }
            if answer.contains("failed") || Monotonic.now > deadline {
                throw SandboxError(.sandboxSetup, "saving \(what) failed: \(answer)")
            }
            usleep(5_000)
        }
    }

    /// Migrates `state` into the QEMU waiting on `qmp` (`-incoming defer`) and lets the guest go
    /// on (unless not `resume`). `ignoringShared`: the stream holds device state only, the RAM is
    /// the file QEMU maps.
    static func restore(
        state: String, qmp: QMP, deadline: Double, ignoringShared: Bool = true, resume: Bool = true
    )
        throws
    {
        try qmp.execute(
            "migrate-set-capabilities",
            #"{"capabilities":[{"capability":"x-ignore-shared","state":\#(ignoringShared)}]}"#)
        try qmp.execute("migrate-incoming", #"{"uri":"exec:cat \#(MicroVM.json(MicroVM.shellWord(state)))"}"#)
        while true {
            let status = try qmp.execute("query-status")
            if status.contains(#""status": "paused""#) || status.contains(#""status":"paused""#) { break }
            let migration = try qmp.execute("query-migrate")
            if migration.contains("failed") || Monotonic.now > deadline {
                throw SandboxError(.sandboxSetup, "the VM was not restored from its template: \(migration)")
            }
            usleep(2_000)
        }
        if resume { try qmp.execute("cont") }
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
