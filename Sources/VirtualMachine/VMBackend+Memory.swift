import Foundation
import Glibc
import ImageFormats
import ImageStore
import Sandbox
import SystemSupport

extension VMBackend {
    /// A run in a live VM (`LiveVM`, in the run's directory): one that resumes a memory snapshot,
    /// keeps one (`persist: memory`), or takes more commands while it runs (`RunControl.exec`, a
    /// server's subprocess calls, each on a session of its own). The command is started through a
    /// session; then either the whole guest is snapshotted (its processes kept, the state placed
    /// in the store for the engine to record) or its changes alone are taken; the VM is stopped
    /// either way. The change lands in the engine's upper as any VM run's does.
    func runLive(_ request: LaunchRequest, memory: MemoryRun?, state: RunState) throws -> CommandOutcome {
        let root = request.storeRoot
        guard request.mounts.isEmpty, request.sharedNetwork == nil, !request.network.isEgress else {
            throw SandboxError(
                .unsupported,
                "a run that keeps or resumes its memory has no caches, services or egress yet; drop them for this step"
            )
        }
        let (vm, template) = try machine(storeRoot: root, memoryBytes: request.limits.memoryBytes)
        let upper = root + "/" + request.upper
        let work = upper + "-vm"
        try? FileSystem.removeTree(work)
        try FileSystem.makeDirectories(work)
        defer { try? FileSystem.removeTree(work) }
        let live: LiveVM
        let layers: [String]
        let baseLayers: [String]
        let layerSlots: Int
        let upperDisk: String
        if let resume = memory?.resume {
            let snapshot = try JSONDecoder().decode(LiveVM.Snapshot.self, from: Data(resume.metadata.utf8))
            guard snapshot.guest == guestIdentity(vm) else {
                throw SandboxError(
                    .unsupported,
                    "image \(resume.image)'s memory snapshot was saved by another guest kernel, QEMU, accelerator or memory size than this run's; give the run the snapshot's memory (\(snapshot.memoryMiB) MiB), or start from its files"
                )
            }
            baseLayers = snapshot.baseLayers
            layers = try baseLayers.map {
                try ErofsLayers.image(ofDirectory: root + "/layers/" + Store.hex($0), storeRoot: root)
            }
            layerSlots = snapshot.layerSlots
            upperDisk = work + "/upper.qcow2"
            live = try LiveVM.resume(
                vm,
                state: LiveVM.MemoryState(
                    directory: resume.path, memoryMiB: snapshot.memoryMiB, layerSlots: snapshot.layerSlots),
                layers: layers, hostname: request.hostname, directory: work, onStart: state.started)
        } else {
            baseLayers = request.lowers.reversed().map { "sha256:" + ($0.split(separator: "/").last ?? "") }
            layers = try request.lowers.reversed().map {
                try ErofsLayers.image(ofDirectory: root + "/" + $0, storeRoot: root)
            }
            guard layers.count <= template.layerSlots else {
                throw SandboxError(
                    .unsupported,
                    "a VM that keeps its memory takes at most \(template.layerSlots) layers; flatten the image")
            }
            layerSlots = template.layerSlots
            upperDisk = work + "/upper.ext4"
            try makeUpperDisk(upperDisk, from: upper, staging: work + "/tree") { tree in
                try VMBackend.copyFiles(request.files, into: tree)
            }
            try FileSystem.removeTree(work + "/tree")
            var command = MicroVM.Command(argv: [], env: request.environment, workdir: request.cwd, layers: layers)
            command.upperDisk = upperDisk
            command.uid = request.uid
            command.gid = request.gid
            command.hostname = request.hostname
            command.network = request.network
            live = try startLive(
                vm, command: command, storeRoot: root, directory: work, onStart: state.started)
        }
        defer { live.stop() }

        let session = try LiveSession(directory: work)
        defer { session.close() }
        if memory?.resume != nil {
            // What the engine prepared (the output file, mount points) and the files to copy in:
            // the resumed guest's disk is the snapshot's.
            try VMBackend.put(directory: upper, into: session)
            for (fd, mapping) in request.files {
                let bytes = try FileSystem.readAll(fd: fd, path: mapping.hostPath)
                try session.put(
                    mapping.sandboxPath, mode: mapping.mode ?? 0o644, uid: mapping.uid, gid: mapping.gid, bytes: bytes)
            }
        }
        let stdout = Capture(request.stdout)
        let stderr = Capture(request.stderr)
        let input = MicroVM.Input(request.stdin)
        // What a memory snapshot of this run records (the engine names its base).
        let metadata = LiveVM.Snapshot(
            guest: guestIdentity(vm), baseLayers: baseLayers, memoryMiB: vm.memoryMiB, layerSlots: layerSlots,
            command: [], env: request.environment, workdir: request.cwd, uid: request.uid, gid: request.gid,
            hostname: request.hostname)
        request.control?.attach(
            LiveCommand(
                session: session, vm: vm, live: live, layers: layers, layerSlots: layerSlots, upperDisk: upperDisk,
                storeRoot: root, changesLimit: changesLimit, metadata: metadata))
        let ran = try session.exec(
            argv: request.argv, env: request.environment, workdir: request.cwd, uid: request.uid, gid: request.gid,
            stdin: input, timeout: request.timeout ?? 24 * 3600, keep: true, onStdout: stdout.take,
            onStderr: stderr.take)
        session.close()
        var result = CommandOutcome()
        result.termination = ran.termination
        result.termination.cancelled = state.cancelled
        result.metrics = ran.metrics
        result.acceleration = vm.accelerator
        (result.stdout, result.stdoutDropped) = stdout.result()
        (result.stderr, result.stderrDropped) = stderr.result()
        guard ran.termination.exitCode != nil || ran.termination.signal != nil, !state.cancelled else { return result }

        // The change, with the processes kept or not.
        let changes = try ChangesFile(work + "/changes.tar", limit: changesLimit)
        if memory?.persist == true && ran.termination.exitCode == 0 {
            try FileSystem.makeDirectories(work + "/state")
            let saved = try live.snapshot(
                vm, layers: layers, layerSlots: layerSlots, upper: upperDisk, staging: work + "/state",
                onChanges: changes.take)
            // Beside the run's upper, in its lease's directory, until the engine records it.
            let kept = upper + "-state"
            try? FileSystem.removeTree(kept)
            try FileSystem.rename(saved.directory, kept)
            let (digest, bytes) = try Store.sealState(kept)
            result.memoryState = try metadata.placed(digest: digest, bytes: bytes, directory: kept)
        } else {
            try live.changes(onChanges: changes.take)
        }
        let unpacked = work + "/upper"
        try changes.extract(into: unpacked, source: "the VM's changes")
        try FileSystem.removeTree(upper)
        try FileSystem.rename(unpacked, upper)
        return result
    }

    /// Host files copied into an upper tree (`tree` is its root in the sandbox's view).
    static func copyFiles(_ files: [(fd: Int32, mapping: FileMapping)], into tree: String) throws {
        for (fd, mapping) in files {
            let target = tree + mapping.sandboxPath
            try FileSystem.makeDirectories(String(target[..<target.lastIndex(of: "/")!]))
            let bytes = try FileSystem.readAll(fd: fd, path: mapping.hostPath)
            try FileSystem.writeFile(target, bytes, mode: mode_t(mapping.mode ?? 0o644))
            if let mode = mapping.mode { chmod(target, mode_t(mode)) }
            chown(target, mapping.uid, mapping.gid)
        }
    }

    /// The directories and regular files under `directory` put into the sandbox's root.
    static func put(directory: String, into session: LiveSession, relative: String = "") throws {
        for name in try FileSystem.list(directory + relative).sorted() {
            let path = relative + "/" + name
            guard let st = try FileSystem.status(directory + path) else { continue }
            if st.isDirectory {
                try session.put(path, mode: UInt32(st.st_mode), uid: st.st_uid, gid: st.st_gid, bytes: nil)
                try put(directory: directory, into: session, relative: path)
            } else if st.isRegular {
                try session.put(
                    path, mode: UInt32(st.st_mode), uid: st.st_uid, gid: st.st_gid,
                    bytes: try FileSystem.readFile(directory + path))
            }
        }
    }
}

extension LiveVM.Snapshot {
    /// A state sealed in `directory` with this as its metadata (the engine fills in its base).
    func placed(digest: String, bytes: Int64, directory: String) throws -> PlacedState {
        PlacedState(
            digest: digest, bytes: bytes, base: "", kind: LiveVM.Snapshot.kind,
            metadata: String(decoding: try JSONEncoder().encode(self), as: UTF8.self), directory: directory)
    }
}

extension MicroVM.Input {
    /// A run's stdin as the agent's channel takes it.
    init(_ source: InputSource) {
        switch source {
        case .null: self = .bytes([])
        case .bytes(let bytes): self = .bytes(bytes)
        case .fileDescriptor(let fd): self = .fileDescriptor(fd)
        }
    }
}

/// The command of a run in a live VM as its `RunControl` sees it: signals go through the agent,
/// more commands each on a session of their own, memory snapshots as `sandbox snapshot` takes
/// them.
struct LiveCommand: RunningSandbox {
    let session: LiveSession
    let vm: MicroVM
    let live: LiveVM
    let layers: [String]
    let layerSlots: Int
    let upperDisk: String
    let storeRoot: String
    let changesLimit: Int64
    /// What a snapshot of it records.
    let metadata: LiveVM.Snapshot

    func signal(_ signal: Int32) { session.signal(signal) }

    func exec(_ spec: ExecSpec) async throws -> CommandOutcome {
        let directory = live.directory
        let opened = try await BlockingPool.shared.run { try LiveSession(directory: directory) }
        defer { opened.close() }
        let command = LiveCommand(
            session: opened, vm: vm, live: live, layers: layers, layerSlots: layerSlots, upperDisk: upperDisk,
            storeRoot: storeRoot, changesLimit: changesLimit, metadata: metadata)
        spec.control?.attach(command)
        defer { spec.control?.detach() }
        let stdout = VMBackend.Capture(spec.stdout)
        let stderr = VMBackend.Capture(spec.stderr)
        let ran = try await withTaskCancellationHandler {
            try await BlockingPool.shared.run {
                try opened.exec(
                    argv: spec.command, env: spec.environment, workdir: spec.cwd, uid: spec.uid, gid: spec.gid,
                    stdin: MicroVM.Input(spec.stdin), timeout: spec.timeout ?? 24 * 3600, onStdout: stdout.take,
                    onStderr: stderr.take)
            }
        } onCancel: {
            opened.signal(SIGKILL)
        }
        var result = CommandOutcome()
        result.termination = ran.termination
        result.metrics = ran.metrics
        (result.stdout, result.stdoutDropped) = stdout.result()
        (result.stderr, result.stderrDropped) = stderr.result()
        return result
    }

    func snapshotMemory(in directory: String) async throws -> (changes: ChangesFile, state: PlacedState) {
        try await BlockingPool.shared.run {
            let changes = try ChangesFile(directory + "/changes.tar", limit: changesLimit)
            try FileSystem.makeDirectories(directory + "/state")
            let saved = try live.snapshot(
                vm, layers: layers, layerSlots: layerSlots, upper: upperDisk, staging: directory + "/state",
                onChanges: changes.take)
            let (digest, bytes) = try Store.sealState(saved.directory)
            return (changes, try metadata.placed(digest: digest, bytes: bytes, directory: saved.directory))
        }
    }
}
