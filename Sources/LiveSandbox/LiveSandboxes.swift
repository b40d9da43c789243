import Glibc
import ImageFormats
import ImageStore
import Sandbox
import SystemSupport
import VirtualMachine

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A sandbox that keeps running between commands, recorded in the store (`live_sandboxes`):
/// its VM's pid and start time (a pid reused by another process is not taken for it), the image
/// it came from, and what `exec` defaults to (environment, working directory, user).
public struct LiveSandbox: Codable, Sendable {
    public var id: String
    /// The image it was started or forked from (pinned while it lives).
    public var image: String
    /// The image whose layers lie under its upper disk.
    public var base: String
    public var isolation: IsolationKind
    public var pid: Int32
    public var startTicks: UInt64
    public var memoryMiB: Int
    public var layerSlots: Int
    /// Its upper disk, in its directory: `upper.ext4` (raw) or `upper.qcow2` (a fork's overlay).
    public var upper: String
    public var command: [String]
    public var env: [String]
    public var workdir: String
    public var uid: UInt32
    public var gid: UInt32
    public var hostname: String
    public var created: Double

    enum CodingKeys: String, CodingKey {
        case id, image, base, isolation, pid, upper, command, env, workdir, uid, gid, hostname, created
        case startTicks = "start_ticks"
        case memoryMiB = "memory_mib"
        case layerSlots = "layer_slots"
    }
}

/// Live sandboxes over a store: started, entered with more commands, snapshotted with their
/// memory, forked, listed and stopped, each by a separate process (no daemon: the VM itself is
/// what keeps running). See docs/memory-snapshots.md.
public final class LiveSandboxes: Sendable {
    public let store: Store
    let baseImages: BaseImages
    let backend: VMBackend
    /// The program that holds a live container sandbox (`contree-pipeline`, which takes
    /// `sandbox hold`); none: container sandboxes are refused.
    let holder: [String]

    public init(store: Store, baseImages: BaseImages, backend: VMBackend, holder: [String] = []) throws {
        self.store = store
        self.baseImages = baseImages
        self.backend = backend
        self.holder = holder
        try store.migrate(
            "live",
            [
                { tx in
                    try tx.query(
                        "CREATE TABLE live_sandboxes(id TEXT PRIMARY KEY, record TEXT NOT NULL, created REAL NOT NULL)")
                }
            ])
    }

    func directory(_ id: String) -> String { store.root + "/live/" + id }

    /// What `start` runs and how.
    public struct StartOptions: Sendable {
        public var image: String
        public var command: [String] = []
        public var env: [String: String] = [:]
        public var cwd: String?
        public var user: String?
        public var hostname = "sandbox"
        public var memoryBytes: Int64?
        public var network = NetworkMode.loopback
        public var isolation = IsolationKind.vm

        public init(image: String) {
            self.image = image
        }
    }

    /// Starts a live sandbox: `command` (if any) keeps running in it as its main process.
    public func start(_ options: StartOptions) throws -> LiveSandbox {
        guard options.network == .loopback || options.network == .none else {
            throw SandboxError(
                .unsupported, "a live sandbox's network is loopback or none for now (egress: run it with exec)")
        }
        if options.isolation == .container { return try startContainer(options) }
        let image = try baseImages.resolve(options.image)
        let (vm, template) = try backend.machine(storeRoot: store.root, memoryBytes: options.memoryBytes)
        guard image.layers.count <= template.layerSlots else {
            throw SandboxError(
                .unsupported, "a live sandbox's image has at most \(template.layerSlots) layers; flatten it first")
        }
        let layers = try image.layers.map { try ErofsLayers.image(of: $0, store: store) }
        let (id, directory, uid, gid) = try prepare(options, image: image)
        var started: LiveVM?
        do {
            try backend.makeUpperDisk(directory + "/upper.ext4", from: nil, staging: directory + "/tree")
            try FileSystem.removeTree(directory + "/tree")
            var command = MicroVM.Command(
                argv: options.command, env: SandboxEngine.environment(options.env, image: image.config.env),
                workdir: options.cwd ?? image.config.workingDir, layers: layers, upperDisk: directory + "/upper.ext4")
            command.uid = uid
            command.gid = gid
            command.hostname = options.hostname
            command.network = options.network
            let live = try backend.startLive(vm, command: command, storeRoot: store.root, directory: directory)
            started = live
            let sandbox = LiveSandbox(
                id: id, image: image.uuid, base: image.uuid, isolation: .vm, pid: live.pid,
                startTicks: live.startTicks, memoryMiB: vm.memoryMiB,
                layerSlots: template.layerSlots, upper: "upper.ext4", command: options.command, env: command.env,
                workdir: command.workdir, uid: uid, gid: gid, hostname: options.hostname,
                created: Date().timeIntervalSince1970)
            try record(sandbox)
            return sandbox
        } catch {
            started?.stop()  // by pid and start time: a QEMU that died may have left its pid to another
            abandon(id, image: image)
            throw error
        }
    }

    /// A new sandbox's id and directory (made), its image pinned to it, its user resolved.
    func prepare(
        _ options: StartOptions, image: ImageRecord
    ) throws -> (id: String, directory: String, uid: UInt32, gid: UInt32) {
        let filesystem = ImageFilesystem(layersTopFirst: image.layers.reversed().map(store.layerPath))
        let (uid, gid) = try SandboxEngine.parseUser(options.user ?? image.config.user, filesystem: filesystem)
        let (id, directory) = try claim(image)
        return (id, directory, uid, gid)
    }

    /// A new sandbox's id and directory (made), with `image` pinned to it.
    func claim(_ image: ImageRecord) throws -> (id: String, directory: String) {
        let id = UUID().uuidString.lowercased()
        try FileSystem.makeDirectories(directory(id))
        do {
            try store.pin(image.uuid, owner: "live:" + id)
        } catch {
            try? FileSystem.removeTree(directory(id))
            throw error
        }
        return (id, directory(id))
    }

    /// Undoes `claim` for a sandbox that did not start (its processes already ended).
    func abandon(_ id: String, image: ImageRecord) {
        try? FileSystem.removeTree(directory(id))
        try? store.unpin(image.uuid, owner: "live:" + id)
    }

    func record(_ sandbox: LiveSandbox) throws {
        let text = String(decoding: try JSONEncoder().encode(sandbox), as: UTF8.self)
        try store.database.query(
            "INSERT INTO live_sandboxes(id, record, created) VALUES(?, ?, ?)",
            [.text(sandbox.id), .text(text), .real(sandbox.created)])
    }

    /// Every live sandbox of the store, oldest first.
    public func list() throws -> [LiveSandbox] {
        try store.database.query("SELECT record FROM live_sandboxes ORDER BY created").compactMap { row in
            try row["record"].string.map { try JSONDecoder().decode(LiveSandbox.self, from: Data($0.utf8)) }
        }
    }

    /// The sandbox `reference` names: its id or a prefix only it has.
    public func resolve(_ reference: String) throws -> LiveSandbox {
        let all = try list()
        let matches =
            all.filter { $0.id == reference } + all.filter { $0.id != reference && $0.id.hasPrefix(reference) }
        guard !reference.isEmpty, let first = matches.first else {
            throw SandboxError(
                .notFound, "no live sandbox \(reference) in this store; `contree-pipeline sandbox ls` lists them")
        }
        guard matches.count == 1 || first.id == reference else {
            throw SandboxError(
                .invalidArgument, "\(reference) names \(matches.count) live sandboxes; give more of the id")
        }
        return first
    }

    public func isRunning(_ sandbox: LiveSandbox) -> Bool {
        LiveVM.isRunning(pid: sandbox.pid, startTicks: sandbox.startTicks)
    }

    private func running(_ sandbox: LiveSandbox) throws -> LiveVM {
        guard isRunning(sandbox) else {
            throw SandboxError(
                .conflict,
                "live sandbox \(sandbox.id) is not running (its VM has ended); `contree-pipeline sandbox stop \(sandbox.id)` removes it"
            )
        }
        return LiveVM(directory: directory(sandbox.id), pid: sandbox.pid, startTicks: sandbox.startTicks)
    }

    /// A session with the sandbox's agent (a snapshot that died half way is thawed first).
    public func session(_ sandbox: LiveSandbox) throws -> LiveSession {
        guard sandbox.isolation == .vm else {
            throw SandboxError(
                .unsupported, "live sandbox \(sandbox.id) is a container: run commands in it with execContainer")
        }
        let live = try running(sandbox)
        let session = try LiveSession(directory: live.directory)
        if session.frozen && !LiveVM.isFreezing(live.directory) {
            do { try session.thaw(hostname: nil) } catch {
                session.close()
                throw error
            }
        }
        return session
    }

    /// The main process's state as the agent says it (`running`, `none`, `exited status=N
    /// signal=N`); nil when the sandbox is not running.
    public func mainState(_ sandbox: LiveSandbox) -> String? {
        guard sandbox.isolation == .vm else { return isRunning(sandbox) ? "running" : nil }
        guard isRunning(sandbox), let session = try? session(sandbox) else { return nil }
        defer { session.close() }
        return session.main
    }

    /// Takes a memory snapshot of a running sandbox: a new image of its files (the image it
    /// started from plus one layer of everything it changed) holding its memory and processes.
    public func snapshot(_ sandbox: LiveSandbox, tag: String?) throws -> ImageRecord {
        if let tag { try Store.validateTag(tag) }
        guard sandbox.isolation == .vm else {
            throw SandboxError(
                .unsupported,
                "live sandbox \(sandbox.id) is a container, whose memory cannot be snapshotted on this host (CRIU cannot checkpoint here); start the sandbox with --isolation vm to snapshot and fork it, or keep its files with `contree-pipeline exec`"
            )
        }
        let live = try running(sandbox)
        guard let base = try store.image(sandbox.base) else {
            throw SandboxError(.corrupt, "the image \(sandbox.base) under live sandbox \(sandbox.id) is gone")
        }
        let (vm, _) = try backend.machine(storeRoot: store.root, memoryBytes: Int64(sandbox.memoryMiB) << 20)
        let lease = try store.acquireLease(layers: base.layers, image: base.uuid)
        defer { lease.release() }
        let work = lease.workPath
        let changes = try ChangesFile(work + "/changes.tar", limit: backend.changesLimit)
        try FileSystem.makeDirectories(work + "/state")
        let state = try live.snapshot(
            vm, layers: try base.layers.map { try ErofsLayers.image(of: $0, store: store) },
            layerSlots: sandbox.layerSlots, upper: live.directory + "/" + sandbox.upper, staging: work + "/state",
            onChanges: changes.take)
        let upper = work + "/upper"
        try changes.extract(into: upper, source: "the sandbox's changes")
        let (digest, bytes) = try Store.sealState(state.directory)
        let metadata = LiveVM.Snapshot(
            guest: backend.guestIdentity(vm), baseLayers: base.layers, memoryMiB: state.memoryMiB,
            layerSlots: state.layerSlots, command: sandbox.command, env: sandbox.env, workdir: sandbox.workdir,
            uid: sandbox.uid, gid: sandbox.gid, hostname: sandbox.hostname)
        let placed = PlacedState(
            digest: digest, bytes: bytes, base: base.uuid, kind: LiveVM.Snapshot.kind,
            metadata: String(decoding: try JSONEncoder().encode(metadata), as: UTF8.self), directory: state.directory)
        // The changes are relative to the base: the image's layers are the base's and one
        // more, its parent the image the sandbox came from.
        let from = try store.image(sandbox.image) ?? base
        let result = try Snapshotter(store: store).commit(
            upper, base: from, layersOf: base, config: from.config, origin: "sandbox:\(sandbox.id)", lease: lease,
            newImage: true
        ) { tx, image, _ in
            try store.recordState(tx, image: image.uuid, state: placed)
            if let tag { try store.tag(tx, tag, image: image.uuid) }
        }
        return result.image
    }

    /// Starts `count` live sandboxes from the memory snapshot `image` holds, each with the
    /// snapshot's processes running where they were (and its own clock, random state and
    /// `hostname`, nil: the snapshot's).
    public func fork(_ reference: String, count: Int, hostname: String? = nil) throws -> [LiveSandbox] {
        let image = try store.resolveImage(reference)
        let (state, metadata) = try memoryState(of: image, asked: "sandbox fork")
        guard let base = try store.image(state.base) else {
            throw SandboxError(.corrupt, "the image \(state.base) under the snapshot \(image.uuid) is gone")
        }
        let (vm, _) = try backend.machine(storeRoot: store.root, memoryBytes: Int64(metadata.memoryMiB) << 20)
        guard backend.guestIdentity(vm) == metadata.guest else {
            throw SandboxError(
                .unsupported,
                "image \(image.uuid)'s memory snapshot was saved by another guest kernel, QEMU or accelerator than this host's; start from its files with `exec --image \(image.uuid)`"
            )
        }
        let layers = try metadata.baseLayers.map { try ErofsLayers.image(of: $0, store: store) }
        /// One child: its VM resumed and recorded, or nothing left of it.
        func resumeOne() throws -> LiveSandbox {
            let (id, directory) = try claim(image)
            var started: LiveVM?
            do {
                let live = try LiveVM.resume(
                    vm,
                    state: LiveVM.MemoryState(
                        directory: state.path, memoryMiB: metadata.memoryMiB, layerSlots: metadata.layerSlots),
                    layers: layers, hostname: hostname, directory: directory)
                started = live
                let child = LiveSandbox(
                    id: id, image: image.uuid, base: base.uuid, isolation: .vm, pid: live.pid,
                    startTicks: live.startTicks, memoryMiB: metadata.memoryMiB,
                    layerSlots: metadata.layerSlots, upper: "upper.qcow2", command: metadata.command, env: metadata.env,
                    workdir: metadata.workdir, uid: metadata.uid, gid: metadata.gid,
                    hostname: hostname ?? metadata.hostname, created: Date().timeIntervalSince1970)
                try record(child)
                return child
            } catch {
                started?.stop()
                abandon(id, image: image)
                throw error
            }
        }
        var children: [LiveSandbox] = []
        for _ in 0..<count {
            do {
                children.append(try resumeOne())
            } catch {
                for child in children { try? stop(child) }  // all of them or none
                throw error
            }
        }
        return children
    }

    /// The memory snapshot `image` holds. - Throws: `invalidArgument` naming `asked` when it
    /// holds files only.
    private func memoryState(of image: ImageRecord, asked: String) throws -> (ImageState, LiveVM.Snapshot) {
        guard let state = try store.state(of: image.uuid), state.kind == LiveVM.Snapshot.kind else {
            throw SandboxError(
                .invalidArgument,
                "image \(image.uuid) holds files only, no memory snapshot, so \(asked) cannot resume it; start from its files with `exec --image \(image.uuid)` or `sandbox start --image \(image.uuid)`, or make one with `sandbox snapshot`"
            )
        }
        let metadata = try JSONDecoder().decode(LiveVM.Snapshot.self, from: Data(state.metadata.utf8))
        return (state, metadata)
    }

    /// Stops the sandbox (everything in it ends; nothing is kept) and forgets it.
    public func stop(_ sandbox: LiveSandbox) throws {
        let directory = self.directory(sandbox.id)
        if sandbox.isolation == .container {
            stopHolder(sandbox)
        } else {
            LiveVM(directory: directory, pid: sandbox.pid, startTicks: sandbox.startTicks).stop()
        }
        try? FileSystem.removeTree(directory)
        try store.database.transaction { tx in
            try store.unpin(tx, sandbox.image, owner: "live:" + sandbox.id)
            try tx.query("DELETE FROM live_sandboxes WHERE id = ?", [.text(sandbox.id)])
        }
    }
}
