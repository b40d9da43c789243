import CSandbox
import Foundation
import Glibc
import ImageFormats
import Sandbox
import Synchronization
import SystemSupport

/// The VM isolation backend: each run is a fresh QEMU microvm (see `MicroVM`) over the same
/// store as the container backend. The image's layers become read-only erofs disks; the
/// engine's upper directory goes in as an ext4 disk (`mkfs.ext4 -d`) and comes back out of it
/// after the guest powered off, so the engine commits a VM run exactly as a container run:
/// images made by either backend are interchangeable.
public final class VMBackend: IsolationBackend {
    public let kind = IsolationKind.vm
    private let kits = Mutex<[String: GuestKit]>([:])
    let progress: ProgressReporter?
    /// The upper disk's size: what a run may write.
    public let upperDiskBytes: Int64
    /// The most a guest may send as its changes: what its upper disk holds, and tar headers.
    public var changesLimit: Int64 { upperDiskBytes + (256 << 20) }
    /// Restore each run from a saved template instead of booting (the default; set
    /// CONTREE_VM_COLD=1 to boot every run, e.g. to measure the difference).
    public let useTemplates: Bool
    private let templates = Mutex<[String: MicroVM.Template]>([:])
    /// Layer disks every template has (microvm takes 24 virtio devices: these, the upper disk
    /// and the serial port); images with more layers boot cold.
    static let layerSlots = 20
    /// What the guest sees as each disk's size in a template: larger than any layer.
    static let slotBytes: Int64 = 64 << 30

    public init(
        progress: ProgressReporter? = nil, upperDiskBytes: Int64 = 4 << 30,
        useTemplates: Bool = ProcessInfo.processInfo.environment["CONTREE_VM_COLD"] != "1"
    ) {
        self.progress = progress
        self.upperDiskBytes = upperDiskBytes
        self.useTemplates = useTemplates
    }

    /// The template for `vm` in the store at `root`: made once (under a lock, so concurrent
    /// runs make it once) and kept in the store.
    /// QEMU's version: a template saved by one QEMU may not restore in another.
    static let qemuVersion: String = {
        let result = try? ChildProcess.run(["qemu-system-x86_64", "--version"])
        return result.map {
            String(decoding: $0.stdout, as: UTF8.self).split(separator: "\n").first.map(String.init) ?? ""
        } ?? ""
    }()

    private func templateKey(_ vm: MicroVM) -> String {
        String(
            Digest.sha256(
                "\(vm.kit.release) \(vm.kit.initramfs.split(separator: "/").last ?? "") \(vm.memoryMiB) \(vm.accelerator) \(VMBackend.layerSlots) \(VMBackend.slotBytes) ports=\(MicroVM.sessionPorts) \(VMBackend.qemuVersion)"
            ).hex.prefix(16))
    }

    /// Drops `failed`, a template that would not restore: the next run makes it again. Only the
    /// generation that failed goes; one another process made since stays current.
    func forgetTemplate(_ failed: MicroVM.Template, for vm: MicroVM, root: String) {
        let key = templateKey(vm)
        templates.withLock { known in
            if known[key]?.state == failed.state { known.removeValue(forKey: key) }
        }
        let directory = root + "/vm/templates/" + key
        let generation = String(failed.state.dropLast("/state".count))
        guard generation.hasPrefix(directory + "/g-") else { return }
        try? FileSystem.withLock(directory + "/lock", mode: 0o644) {
            if let current = VMBackend.currentGeneration(directory), directory + "/" + current == generation {
                unlink(directory + "/current")
            }
            try? FileSystem.removeTree(generation)
        }
    }

    /// The template for `vm` in the store at `root`: made once (under a lock, so concurrent runs,
    /// in this process or others, make it once) and kept in the store.
    ///
    /// Its files live in a generation of their own, `templates/<key>/<generation>/{ram,state}`,
    /// which `current` names; `lock` is never removed. A run holds the paths of one generation, so
    /// a template made again (after one would not restore) never replaces files a QEMU is about to
    /// open, and dropping a template removes only the generation that failed.
    func template(for vm: MicroVM, root: String) throws -> MicroVM.Template {
        let key = templateKey(vm)
        if let known = templates.withLock({ $0[key] }), FileSystem.exists(known.state) { return known }
        let directory = root + "/vm/templates/" + key
        try FileSystem.makeDirectories(directory)
        let template = try FileSystem.withLock(directory + "/lock", mode: 0o644) { () -> MicroVM.Template in
            if let current = VMBackend.currentGeneration(directory),
                FileSystem.exists(directory + "/" + current + "/state")
            {
                return MicroVM.Template(
                    ram: directory + "/" + current + "/ram", state: directory + "/" + current + "/state",
                    layerSlots: VMBackend.layerSlots)
            }
            // What failed before (dropped generations a QEMU may still hold open, files of the
            // layout before generations) goes; the new generation is named once it is whole.
            for name in try FileSystem.list(directory) where name != "lock" {
                try? FileSystem.removeTree(directory + "/" + name)
            }
            let generation = "g-" + UUID().uuidString.lowercased().prefix(12)
            try FileSystem.makeDirectories(directory + "/" + generation)
            progress?.report("vm", "booting a template VM (once per store and memory size)", elapsed: 0)
            let made = try vm.makeTemplate(
                in: directory + "/" + generation, layerSlots: VMBackend.layerSlots, slotBytes: VMBackend.slotBytes)
            try FileSystem.writeFile(directory + "/current.new", Array(generation.utf8), mode: 0o644)
            try FileSystem.rename(directory + "/current.new", directory + "/current")
            return made
        }
        templates.withLock { $0[key] = template }
        return template
    }

    /// The generation `current` names in a template's directory; nil when there is none.
    static func currentGeneration(_ directory: String) -> String? {
        guard let bytes = try? FileSystem.readFile(directory + "/current") else { return nil }
        let name = String(decoding: bytes, as: UTF8.self)
        return name.hasPrefix("g-") && !name.contains("/") ? name : nil
    }

    /// The QEMU process of a run and whether the run was cancelled, shared with the
    /// cancellation handler. The process is held by a pidfd: a cancel that comes after QEMU was
    /// reaped (or, for a live VM, ended) signals nothing, never a process its pid went to since.
    final class RunState: Sendable {
        private let state = Mutex<(pidfd: Int32?, cancelled: Bool)>((nil, false))
        func started(_ pid: pid_t) {
            let fd = csb_pidfd_open(pid)
            let cancelled = state.withLock { s -> Bool in
                if let old = s.pidfd { close(old) }
                s.pidfd = fd >= 0 ? fd : nil
                return s.cancelled
            }
            if cancelled && fd >= 0 { _ = csb_pidfd_kill(fd, SIGKILL) }
        }
        func cancel() {
            state.withLock { s in
                s.cancelled = true
                if let fd = s.pidfd { _ = csb_pidfd_kill(fd, SIGKILL) }
            }
        }
        var cancelled: Bool { state.withLock { $0.cancelled } }
        /// QEMU has been reaped or stopped: nothing is signalled any more.
        func finished() {
            state.withLock { s in
                if let fd = s.pidfd { close(fd) }
                s.pidfd = nil
            }
        }
        deinit { finished() }
    }

    private let accelerators = Mutex<[String: String]>([:])

    /// `kvm` when the host's KVM runs the guest, found by trying a boot (a /dev/kvm that
    /// cannot run Debian's kernel, such as a PVM host's, hangs it); `tcg` otherwise. The
    /// answer is kept in the store per kernel.
    func accelerator(kit: GuestKit, root: String) -> String {
        if let known = accelerators.withLock({ $0[root] }) { return known }
        let path = root + "/vm/accelerator-" + kit.release
        var answer = (try? FileSystem.readFile(path)).map { String(decoding: $0, as: UTF8.self) } ?? ""
        if answer != "kvm" && answer != "tcg" {
            let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
            var usable = false
            if fd >= 0 {
                close(fd)
                var probe = MicroVM(kit: kit)
                probe.accelerator = "kvm"
                progress?.report("vm", "checking whether KVM runs the guest (once per store)", elapsed: 0)
                usable = probe.boots(within: 6)  // under KVM the agent is up in a second or two
            }
            answer = usable ? "kvm" : "tcg"
            try? FileSystem.writeFile(path, Array(answer.utf8), mode: 0o644)
        }
        accelerators.withLock { $0[root] = answer }
        return answer
    }

    private func kit(_ storeRoot: String) throws -> GuestKit {
        if let kit = kits.withLock({ $0[storeRoot] }) { return kit }
        let kit = try GuestKit.prepare(storeRoot: storeRoot, progress: progress)
        kits.withLock { $0[storeRoot] = kit }
        return kit
    }

    /// The VM a sandbox of `memoryBytes` (nil: the default) runs in over the store at
    /// `storeRoot`, with the template it restores from: what a live sandbox starts with.
    public func machine(storeRoot: String, memoryBytes: Int64?) throws -> (MicroVM, MicroVM.Template) {
        let kit = try kit(storeRoot)
        var vm = MicroVM(kit: kit)
        vm.accelerator =
            ProcessInfo.processInfo.environment["CONTREE_VM_ACCEL"] ?? accelerator(kit: kit, root: storeRoot)
        if let memoryBytes { vm.memoryMiB = max(128, Int(memoryBytes >> 20)) }
        return (vm, try template(for: vm, root: storeRoot))
    }

    /// Starts `command` as a live VM in `directory` from the template of `vm`'s size; a template
    /// that will not restore is dropped and made again, once (as a run's is).
    public func startLive(
        _ vm: MicroVM, command: MicroVM.Command, storeRoot: String, directory: String,
        onStart: (pid_t) -> Void = { _ in }
    ) throws -> LiveVM {
        let first = try template(for: vm, root: storeRoot)
        do {
            return try LiveVM.start(vm, command: command, template: first, directory: directory, onStart: onStart).0
        } catch let failure as MicroVM.RestoreFailed {
            progress?.report("vm", "the VM template could not be restored (\(failure)); making it again", elapsed: 0)
            forgetTemplate(first, for: vm, root: storeRoot)
            for name in try FileSystem.list(directory) where name.hasSuffix(".sock") || name == "qemu.pid" {
                unlink(directory + "/" + name)
            }
            return try LiveVM.start(
                vm, command: command, template: try template(for: vm, root: storeRoot), directory: directory,
                onStart: onStart
            ).0
        }
    }

    /// What identifies the guest a memory snapshot was saved from: it restores only into the
    /// same kernel and initramfs, QEMU, accelerator and memory size.
    public func guestIdentity(_ vm: MicroVM) -> String { templateKey(vm) }

    /// Makes `disk`, an ext4 upper disk (`upper/` and `work/`) as large as runs may write,
    /// holding the upper directory `upper` (nil: empty), using `staging` (made) for the tree.
    /// - Parameter adding: puts more into the tree's `upper/` (its path) before the disk is made.
    public func makeUpperDisk(
        _ disk: String, from upper: String?, staging: String, adding: (String) throws -> Void = { _ in }
    ) throws {
        try FileSystem.makeDirectories(staging + "/work")
        if let upper {
            try run(["cp", "-a", upper, staging + "/upper"], "copy the upper directory")
        } else {
            try FileSystem.makeDirectory(staging + "/upper", mode: 0o755)
        }
        try adding(staging + "/upper")
        try run(
            [
                "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "root_owner=0:0", "-d", staging, disk,
                String(upperDiskBytes / 1024) + "k",
            ], "make the upper disk")
    }

    public func run(_ request: LaunchRequest) async throws -> CommandOutcome {
        guard request.terminal == nil else {
            throw SandboxError(
                .unsupported, "terminal sessions are not available with isolation: vm yet; use container")
        }
        let state = RunState()
        return try await withTaskCancellationHandler {
            try await BlockingPool.shared.run { try self.runBlocking(request, state: state) }
        } onCancel: {
            state.cancel()
        }
    }

    private func runBlocking(_ request: LaunchRequest, state: RunState) throws -> CommandOutcome {
        defer {
            state.finished()
            request.control?.detach()
        }
        // A run that resumes or keeps memory, or that more commands may be started in (a
        // server's instance), runs as a live VM; one with caches, services or egress (which a
        // live VM has not) runs as before, without more commands.
        let plain = !request.mounts.isEmpty || request.sharedNetwork != nil || request.network.isEgress
        if request.memory != nil || (request.control != nil && !plain) {
            do {
                return try runLive(request, memory: request.memory, state: state)
            } catch  where state.cancelled {
                var result = CommandOutcome()  // killed on purpose: a cancelled run, not a failure
                result.termination.cancelled = true
                return result
            }
        }
        if request.sharedNetwork != nil {
            throw SandboxError(
                .unsupported,
                "the VM backend does not yet run services beside a step; run this with isolation container")
        }
        let root = request.storeRoot
        let kit = try kit(root)
        // Lowers come top-most first; the guest stacks its disks bottom first.
        let layers = try request.lowers.reversed().map {
            try ErofsLayers.image(ofDirectory: root + "/" + $0, storeRoot: root)
        }
        Trace.mark("vm: kit and erofs layers ready")
        let upper = root + "/" + request.upper
        let staging = upper + "-vm"
        try? FileSystem.removeTree(staging)
        try FileSystem.makeDirectories(staging)
        defer { try? FileSystem.removeTree(staging) }
        // The upper as the engine prepared it (mount points, the output file), and the files
        // to copy in.
        let disk = staging + "/upper.ext4"
        try makeUpperDisk(disk, from: upper, staging: staging + "/disk") { tree in
            try VMBackend.copyFiles(request.files, into: tree)
        }

        Trace.mark("vm: upper disk made")
        // Dependency caches: each an ext4 disk made from its directory (sparse, four times its
        // size, at least 1 GiB), mounted by the agent, sent back as a tar after the run.
        var cacheDisks: [(mount: BindMount, disk: String, bytes: Int64)] = []
        for (index, mount) in request.mounts.enumerated() {
            let disk = staging + "/cache\(index).ext4"
            let used =
                Int64(
                    String(decoding: try ChildProcess.run(["du", "-sb", mount.source]).stdout, as: UTF8.self)
                        .prefix { $0.isNumber }) ?? 0
            try run(
                [
                    "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "root_owner=0:0", "-d",
                    mount.source,
                    disk, String(max(Int64(1) << 30, 4 * used) / 1024) + "k",
                ], "make a cache disk")
            cacheDisks.append((mount, disk, max(Int64(1) << 30, 4 * used)))
        }
        // What comes back of each cache: a tar file per disk, no larger than the disk.
        var cacheTars: [(fd: Int32, path: String, bytes: Int64)] = []
        defer { for tar in cacheTars { close(tar.fd) } }
        for index in cacheDisks.indices {
            let path = staging + "/cache\(index).tar"
            let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
            cacheTars.append((fd, path, 0))
        }
        var command = MicroVM.Command(
            argv: request.argv, env: request.environment, workdir: request.cwd, layers: layers, upperDisk: disk)
        command.uid = request.uid
        command.gid = request.gid
        command.hostname = request.hostname
        command.network = request.network
        command.caches = cacheDisks.map { ($0.disk, $0.mount.target) }
        let stdin = MicroVM.Input(request.stdin)
        let stdout = Capture(request.stdout)
        let stderr = Capture(request.stderr)
        var vm = MicroVM(kit: kit)
        vm.accelerator = ProcessInfo.processInfo.environment["CONTREE_VM_ACCEL"] ?? accelerator(kit: kit, root: root)
        if let memory = request.limits.memoryBytes { vm.memoryMiB = max(128, Int(memory >> 20)) }
        var template =
            useTemplates && layers.count <= VMBackend.layerSlots && !request.network.isEgress && cacheDisks.isEmpty
            ? try self.template(for: vm, root: root) : nil
        // The guest sends its changes as a layer tar; the host never mounts what it wrote.
        let changes = try ChangesFile(staging + "/changes.tar", limit: changesLimit)
        var outcome: MicroVM.Outcome? = nil
        while outcome == nil {
            do {
                outcome = try vm.run(
                    command, stdin: stdin, timeout: request.timeout ?? 24 * 3600, template: template,
                    onStart: state.started, onStdout: stdout.take, onStderr: stderr.take,
                    onChanges: changes.take,
                    onCache: { index, chunk in
                        cacheTars[index].bytes += Int64(chunk.count)
                        guard cacheTars[index].bytes <= cacheDisks[index].bytes + (256 << 20) else {
                            throw SandboxError(.sandboxSetup, "the VM sent more of a cache than its disk holds")
                        }
                        try FileSystem.writeAll(fd: cacheTars[index].fd, Array(chunk), path: cacheTars[index].path)
                    },
                    onRunning: { channel in request.control?.attach(VMSandbox(channel: channel)) })
                state.finished()
            } catch let failure as MicroVM.RestoreFailed where template != nil && !state.cancelled {
                // Nothing ran: the template is dropped (made again next time) and this run boots.
                progress?.report(
                    "vm", "the VM template could not be restored (\(failure)); booting instead", elapsed: 0)
                if let template { forgetTemplate(template, for: vm, root: root) }
                template = nil
            } catch  where state.cancelled {
                state.finished()
                // Killed on purpose before the guest started: a cancelled run, not a failure.
                var result = CommandOutcome()
                result.termination.cancelled = true
                result.acceleration = vm.accelerator
                return result
            }
        }
        guard let outcome else { throw SandboxError(.sandboxSetup, "the VM did not run") }

        Trace.mark("vm: guest done (restored in \(Int(outcome.bootSeconds * 1000)) ms)")
        var result = CommandOutcome()
        result.termination = outcome.termination
        result.termination.cancelled = state.cancelled
        result.acceleration = vm.accelerator
        result.metrics = outcome.metrics
        (result.stdout, result.stdoutDropped) = stdout.result()
        (result.stderr, result.stderrDropped) = stderr.result()
        let ended = outcome.termination
        if ended.exitCode == nil && ended.signal == nil && !ended.timedOut && !state.cancelled {
            throw SandboxError(
                .sandboxSetup,
                "the VM ended without the command's report; its console ended with:\n\(outcome.console ?? "(nothing)")")
        }
        // The changes: unpacked (paths that would escape refused, as for any layer) into a
        // fresh directory that replaces the engine's upper.
        if ended.exitCode != nil || ended.signal != nil {
            let unpacked = staging + "/upper"
            try changes.extract(into: unpacked, source: "the VM's changes")
            try FileSystem.removeTree(upper)
            try FileSystem.rename(unpacked, upper)
        }
        Trace.mark("vm: changes copied out")
        // The caches as the guest left them, when it ended cleanly (a killed guest sends
        // none): unpacked like the changes (paths that would escape refused) into a fresh
        // directory swapped in for the cache's. The host never mounts or parses the disk.
        if ended.exitCode != nil || ended.signal != nil {
            for (index, (mount, _, _)) in cacheDisks.enumerated() where cacheTars[index].bytes > 0 {
                let fresh = mount.source + ".vm-" + request.id
                try? FileSystem.removeTree(fresh)
                try FileSystem.makeDirectory(fresh, mode: 0o755)
                guard lseek(cacheTars[index].fd, 0, SEEK_SET) == 0 else {
                    throw SandboxError.system("lseek(cache tar)")
                }
                var reader = TarReader(fd: cacheTars[index].fd, name: "the VM's cache \(mount.target)")
                var extractor = LayerExtractor(root: fresh)
                try extractor.extract(&reader, source: "the VM's cache \(mount.target)")
                let old = mount.source + ".old-" + request.id
                try FileSystem.rename(mount.source, old)
                try FileSystem.rename(fresh, mount.source)
                try? FileSystem.removeTree(old)
            }
        }
        return result
    }

    private func run(_ argv: [String], _ what: String) throws {
        let result = try ChildProcess.run(argv)
        guard result.succeeded else {
            throw SandboxError(.sandboxSetup, "the VM backend could not \(what): \(argv[0]): \(result.stderrText)")
        }
    }

    /// One output stream of the command, to where the request sends it.
    final class Capture: @unchecked Sendable {
        private let sink: OutputSink
        private let lock = NSLock()
        private var kept: [UInt8] = []
        private var dropped = 0

        init(_ sink: OutputSink) {
            self.sink = sink
        }

        func take(_ bytes: [UInt8]) {
            switch sink {
            case .fileDescriptor(let fd):
                try? FileSystem.writeAll(fd: fd, bytes, path: "output")
            case .capture(let limit, let onChunk):
                onChunk?(bytes)
                lock.withLock {
                    let room = limit <= 0 ? 0 : max(0, limit - kept.count)
                    kept += bytes.prefix(room)
                    dropped += bytes.count - min(room, bytes.count)
                }
            case .discard:
                break
            }
        }

        func result() -> ([UInt8], Int) { lock.withLock { (kept, dropped) } }
    }
}
/// A running VM as `RunControl` sees it: signals go to the command through the agent; more
/// commands cannot be started in a VM yet.
struct VMSandbox: RunningSandbox {
    let channel: Channel

    func signal(_ signal: Int32) { channel.signal(signal) }

    func exec(_ spec: ExecSpec) async throws -> CommandOutcome {
        throw SandboxError(
            .conflict,
            "more processes start only in a VM without caches, services or egress; use isolation: container for that"
        )
    }
}
