import Glibc
import ImageFormats
import ImageStore
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Runs commands in sandboxes over images and records the results: resolve the image, take a
/// lease on its layers, prepare an upper, hand it to the isolation backend, commit the changes
/// as a new image (unless disposable or killed), record the run.
public final class SandboxEngine: Sendable {
    public let store: Store
    public let baseImages: BaseImages
    private let backends: [IsolationKind: any IsolationBackend]

    /// The isolation kinds this engine can run.
    public var availableBackends: [IsolationKind] { Array(backends.keys) }

    /// - Parameter sources: where image references outside the store are imported from.
    public init(
        store: Store, backends: [any IsolationBackend] = [ContainerBackend()], progress: ProgressReporter? = nil,
        sources: ImageSources = .builtIn
    ) {
        self.store = store
        self.baseImages = BaseImages(store: store, progress: progress, sources: sources)
        var map: [IsolationKind: any IsolationBackend] = [:]
        for backend in backends { map[backend.kind] = backend }
        self.backends = map
        if map[.container] != nil { ContainerBackend.warmUp() }
        // A sandbox closing its stdin pipe early must not kill the engine.
        signal(SIGPIPE, SIG_IGN)
        // Each running sandbox holds a handful of descriptors; many run at once.
        var limit = rlimit()
        let nofile = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        if getrlimit(nofile, &limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = min(limit.rlim_max, 65536)
            setrlimit(nofile, &limit)
        }
    }

    /// Runs `spec` to completion.
    /// - Throws: `notFound` (image, host file), `invalidArgument`/`pathEscapes` (bad spec),
    ///   `sandboxSetup`. Nothing is written to the store when it throws.
    public func run(_ spec: RunSpec) async throws -> RunResult {
        try SandboxEngine.validate(spec)
        guard let backend = backends[spec.isolation] else {
            throw SandboxError(.unsupported, "the \(spec.isolation.rawValue) backend is not available in this build")
        }
        // Store work (building a base image, hashing a large change) blocks: it runs on threads
        // of its own, never on the cooperative pool.
        // Cancelling stops an image import on first use (which removes what it made).
        let cancellation = Cancellation()
        let prepared = try await withTaskCancellationHandler {
            try await BlockingPool.shared.run { try self.prepare(spec, cancellation: cancellation) }
        } onCancel: {
            cancellation.cancel("cancelled while the image was imported; nothing was imported")
        }
        defer { prepared.close() }
        if let control = spec.control {
            let (image, resumed) = (prepared.image, prepared.request.memory?.resume?.base)
            control.setCommitter { sandbox in
                let work = prepared.lease.workPath + "/snapshot-" + UUID().uuidString.lowercased().prefix(8)
                try FileSystem.makeDirectories(work)
                defer { try? FileSystem.removeTree(work) }
                let (changes, state) = try await sandbox.snapshotMemory(in: work)
                return try await BlockingPool.shared.run {
                    try self.commitMemorySnapshot(changes: changes, state: state, image: image, resumedBase: resumed)
                }
            }
        }
        Trace.mark("launch")
        let outcome = try await backend.run(prepared.request)
        Trace.mark("sandbox ended")
        // The commit is part of the run: its timeout and a cancel (Ctrl-C, SIGTERM) stop it too.
        let commit = Cancellation()
        let deadline = spec.timeout.map { timeout in
            Task {
                let left = timeout - (Date().timeIntervalSince(prepared.startedAt))
                try await Task.sleep(for: .seconds(max(0, left)))
                commit.cancel(SandboxEngine.commitTimedOut)
            }
        }
        defer { deadline?.cancel() }
        return try await withTaskCancellationHandler {
            try await BlockingPool.shared.run {
                try self.finish(prepared, spec: spec, outcome: outcome, backend: backend.kind, cancellation: commit)
            }
        } onCancel: {
            commit.cancel("the run was cancelled while its change was committed; nothing was kept")
        }
    }

    static let commitTimedOut = "the run's timeout passed while its change was committed; nothing was kept"

    /// What a run holds between its preparation and its commit.
    final class Prepared: Sendable {
        let image: ImageRecord
        let lease: Lease
        let request: LaunchRequest
        let addedMountPoints: [String]
        let startedAt: Date

        init(image: ImageRecord, lease: Lease, request: LaunchRequest, addedMountPoints: [String]) {
            self.image = image
            self.lease = lease
            self.request = request
            self.addedMountPoints = addedMountPoints
            self.startedAt = Date()
        }

        /// Closes the host files and releases the lease (removing the work directory).
        func close() {
            for file in request.files { Glibc.close(file.fd) }
            lease.release()
        }
    }

    /// Opens the host files, resolves the image, takes the lease, prepares the upper.
    private func prepare(_ spec: RunSpec, cancellation: Cancellation? = nil) throws -> Prepared {
        // Open host files first: a missing one must fail before anything else happens.
        var opened: [(fd: Int32, mapping: FileMapping)] = []
        var handedOver = false
        defer { if !handedOver { for file in opened { close(file.fd) } } }
        for mapping in spec.files {
            let fd = try mapping.hostPaths.open(mapping.hostPath, what: "host file for \(mapping.sandboxPath)")
            var st = stat()
            fstat(fd, &st)
            var mapping = mapping
            if mapping.mode == nil { mapping.mode = UInt32(st.st_mode & 0o7777) }
            opened.append((fd, mapping))
        }

        Trace.mark("validated")
        let image = try baseImages.resolve(spec.image, cancellation: cancellation)
        Trace.mark("image resolved")
        let memory = try memoryRun(spec, image: image)
        let lease = try store.acquireLease(layers: image.layers, image: image.uuid)
        var leaseHandedOver = false
        defer { if !leaseHandedOver { lease.release() } }
        let runID = lease.id
        let upper = lease.workPath + "/upper"
        try FileSystem.makeDirectory(upper, mode: 0o755)
        Trace.mark("lease and upper")
        let filesystem = ImageFilesystem(layersTopFirst: image.layers.reversed().map(store.layerPath))
        var addedMountPoints = try prepareMountPoints(filesystem, upper: upper)
        if let output = spec.outputPath {
            let parts = output.split(separator: "/")
            guard parts.count == 2, try filesystem.child(of: filesystem.root, named: String(parts[0])) == nil else {
                throw SandboxError(
                    .invalidArgument,
                    "the output path \(output) must be a file in a top-level directory the image does not have")
            }
            try FileSystem.makeDirectory(upper + "/" + parts[0], mode: 0o755)
            try FileSystem.writeFile(upper + output, [], mode: 0o666)
            chmod(upper + output, 0o666)
        }

        var environment = SandboxEngine.environment(spec.env, image: spec.inheritImageEnv ? image.config.env : [])
        let seen = Set(spec.env.keys)
        let network = spec.sharedNetwork?.mode ?? spec.network
        // Egress also puts a resolv.conf at /etc/resolv.conf (each backend its own way): a mount
        // point the image may lack, removed like the others.
        let mounts = spec.mounts
        if network == .egressHostLoopback && !seen.contains("CONTREE_HOST") {
            environment.append("CONTREE_HOST=\(SandboxNetwork.hostAddress)")
        }
        addedMountPoints += try missingMountPoints(
            mounts.map(\.target) + (network.isEgress ? [SandboxNetwork.resolvConfPath] : []), in: filesystem)
        let (uid, gid) = try spec.user ?? SandboxEngine.parseUser(image.config.user, filesystem: filesystem)

        let request = LaunchRequest(
            id: runID, storeRoot: store.root, lowers: image.layers.reversed().map { "layers/" + Store.hex($0) },
            directory: "tmp/\(runID)",
            argv: spec.command, environment: environment, cwd: spec.cwd ?? image.config.workingDir, uid: uid, gid: gid,
            hostname: spec.hostname, network: network, sharedNetwork: spec.sharedNetwork, mounts: mounts,
            limits: spec.limits, timeout: spec.timeout,
            files: opened, stdin: spec.stdin, stdout: spec.stdout, stderr: spec.stderr, terminal: spec.terminal,
            control: spec.control, memory: memory)
        handedOver = true
        leaseHandedOver = true
        return Prepared(image: image, lease: lease, request: request, addedMountPoints: addedMountPoints)
    }

    /// A running sandbox's memory snapshot (its changes as a layer tar, its state placed) as a
    /// new image over `image`; its change lies over `resumedBase` when the run was resumed.
    private func commitMemorySnapshot(
        changes: ChangesFile, state: PlacedState, image: ImageRecord, resumedBase: String?
    ) throws -> ImageRecord {
        var layersOf = image
        if let resumedBase {
            guard let base = try store.image(resumedBase) else {
                throw SandboxError(.corrupt, "the image \(resumedBase) under the resumed snapshot is gone")
            }
            layersOf = base
        }
        let lease = try store.acquireLease(layers: layersOf.layers, image: layersOf.uuid)
        defer { lease.release() }
        let upper = lease.workPath + "/upper"
        try changes.extract(into: upper, source: "the sandbox's changes")
        var placed = state
        placed.base = layersOf.uuid
        return try Snapshotter(store: store).commit(
            upper, base: image, layersOf: layersOf, config: image.config, origin: "memory-snapshot", lease: lease,
            newImage: true
        ) { tx, result, _ in try store.recordState(tx, image: result.uuid, state: placed) }.image
    }

    /// What a run does with memory snapshots: resume `image`'s, keep one, or neither (nil).
    private func memoryRun(_ spec: RunSpec, image: ImageRecord) throws -> MemoryRun? {
        var resume: ImageState?
        if spec.resume != .never { resume = try store.state(of: image.uuid) }
        if spec.resume == .required && resume == nil {
            throw SandboxError(
                .invalidArgument,
                "image \(image.uuid) holds files only, no memory snapshot, so it cannot be resumed; run it without --resume, or make one with `contree-pipeline sandbox snapshot`"
            )
        }
        if spec.isolation != .vm {
            if spec.persistMemory || spec.resume == .required {
                throw SandboxError(
                    .unsupported,
                    "memory snapshots need isolation vm (--isolation vm, or isolation: vm in a pipeline): this host's CRIU cannot checkpoint a container"
                )
            }
            resume = nil  // a container starts from the snapshot's files
        }
        guard spec.persistMemory || resume != nil else { return nil }
        return MemoryRun(persist: spec.persistMemory, resume: resume)
    }

    /// Commits the changes (unless disposable or killed) and records the run.
    private func finish(
        _ prepared: Prepared, spec: RunSpec, outcome: CommandOutcome, backend: IsolationKind,
        cancellation: Cancellation
    ) throws
        -> RunResult
    {
        let image = prepared.image
        let lease = prepared.lease
        let upper = lease.workPath + "/upper"
        var output: [UInt8]?
        if let path = spec.outputPath {
            // Read, then drop the whole directory: it never becomes part of the image.
            if let st = try FileSystem.status(upper + path), st.isRegular {
                output = Array(try FileSystem.readFile(upper + path).prefix(1 << 20))
            } else {
                output = []
            }
            try FileSystem.removeTree(upper + "/" + String(path.split(separator: "/")[0]))
        }
        var record = RunRecord(
            id: lease.id, image: image.uuid, resultImage: nil, command: spec.command,
            termination: outcome.termination, disposable: spec.disposable, backend: backend,
            acceleration: outcome.acceleration, startedAt: prepared.startedAt, metrics: outcome.metrics)

        // A killed run leaves no image; a disposable one never makes one.
        if outcome.termination.changeTooLarge {
            record.discarded =
                "the run's change grew past \(ByteCount.format(spec.limits.layerBytes ?? 0)), the most it may keep (max_layer_bytes): the run was stopped and nothing was kept"
        }
        if spec.disposable || outcome.termination.timedOut || outcome.termination.cancelled
            || outcome.termination.changeTooLarge
        {
            try insert(record)
        } else {
            for path in prepared.addedMountPoints {  // only if still empty
                if rmdir(upper + path) != 0 && errno == ENOTDIR, let st = try? FileSystem.status(upper + path),
                    st.isRegular && st.st_size == 0
                {
                    unlink(upper + path)
                }
            }
            let commitStarted = Monotonic.now
            var committed = record
            // A run resumed from a memory snapshot changed files relative to the snapshot's base.
            var layersOf: ImageRecord?
            if let resumed = prepared.request.memory?.resume {
                guard let base = try store.image(resumed.base) else {
                    throw SandboxError(
                        .corrupt, "the image \(resumed.base) under image \(image.uuid)'s memory snapshot is gone")
                }
                layersOf = base
            }
            do {
                _ = try Snapshotter(store: store).commit(
                    upper, base: image, layersOf: layersOf, config: spec.resultConfig ?? image.config,
                    origin: "run:\(lease.id)", lease: lease,
                    budget: .commit(maxBytes: spec.limits.layerBytes, cancellation: cancellation),
                    newImage: outcome.memoryState != nil
                ) { tx, result, layer in
                    if var state = outcome.memoryState {
                        state.base = (layersOf ?? image).uuid  // what the state's upper disk lies over
                        try self.store.recordState(tx, image: result.uuid, state: state)
                    }
                    if let tag = spec.tag { try self.store.tag(tx, tag, image: result.uuid) }
                    committed.resultImage = result.uuid
                    committed.metrics.commitSeconds = Monotonic.now - commitStarted
                    committed.metrics.diffFiles = layer?.files ?? 0
                    committed.metrics.diffBytes = layer?.bytes ?? 0
                    try SandboxEngine.insert(committed, tx: tx)
                }
                record = committed
            } catch let error as SandboxError where error.code == .limitExceeded || error.code == .cancelled {
                // Nothing was placed: the upper goes with the lease.
                record.discarded = error.message
                record.timedOut = error.message == SandboxEngine.commitTimedOut
                record.cancelled = error.code == .cancelled && !record.timedOut
                record.metrics.commitSeconds = Monotonic.now - commitStarted
                try insert(record)
            }
        }
        Trace.mark("committed and recorded")
        return RunResult(
            record: record, stdout: outcome.stdout, stderr: outcome.stderr, stdoutDropped: outcome.stdoutDropped,
            stderrDropped: outcome.stderrDropped, output: output)
    }

    /// The recorded run with this id.
    public func record(_ id: String) throws -> RunRecord? {
        guard
            let text = try store.database.query("SELECT record FROM runs WHERE id = ?", [.text(id)]).first?["record"]
                .string
        else { return nil }
        return try SandboxEngine.decoder.decode(RunRecord.self, from: Data(text.utf8))
    }

    private func insert(_ record: RunRecord) throws {
        try store.database.transaction { tx in try SandboxEngine.insert(record, tx: tx) }
    }

    static func insert(_ record: RunRecord, tx: Database.Transaction) throws {
        let json = String(decoding: try encoder.encode(record), as: UTF8.self)
        try tx.query(
            "INSERT INTO runs(id, image, result_image, started, record) VALUES(?, ?, ?, ?, ?)",
            [
                .text(record.id), .text(record.image), record.resultImage.sql,
                .real(record.startedAt.timeIntervalSince1970), .text(json),
            ])
    }

    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.dateEncodingStrategy = .deferredToDate  // exact: the stored Double itself
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    static let decoder: JSONDecoder = {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .deferredToDate
        return d
    }()

    /// Mount points the sandbox needs (/proc, /dev) that the image lacks are created in the
    /// upper and removed again before the commit if still empty.
    private func prepareMountPoints(_ fs: ImageFilesystem, upper: String) throws -> [String] {
        var added: [String] = []
        for name in ["proc", "dev"] {
            if let node = try fs.child(of: fs.root, named: name), node.isDirectory { continue }
            if try fs.child(of: fs.root, named: name) != nil {
                throw SandboxError(
                    .invalidArgument, "the image has a /\(name) that is not a directory; it cannot be run")
            }
            try FileSystem.makeDirectory(upper + "/" + name, mode: 0o755)
            added.append("/" + name)
        }
        return added
    }

    /// The mount points of `mounts` that the image lacks, deepest first: contree-init creates
    /// them, and they leave the change after the run (when still empty).
    private func missingMountPoints(_ targets: [String], in fs: ImageFilesystem) throws -> [String] {
        var missing: [String] = []
        for target in targets {
            var node = fs.root
            var path = ""
            for part in target.split(separator: "/") {
                path += "/" + part
                if missing.contains(path) { continue }
                if let child = try fs.child(of: node, named: String(part)) {
                    node = child
                } else {
                    missing.append(path)
                }
            }
        }
        return missing.sorted { $0.count > $1.count }
    }

    /// Rejects specs that cannot run, before anything touches the store.
    static func validate(_ spec: RunSpec) throws {
        guard let program = spec.command.first, !program.isEmpty else {
            throw SandboxError(.invalidArgument, "no command given; pass the command after `--`")
        }
        if let cwd = spec.cwd { try validateSandboxPath(cwd, what: "working directory") }
        if let tag = spec.tag { try Store.validateTag(tag) }
        for mapping in spec.files { try validateSandboxPath(mapping.sandboxPath, what: "file mapping target") }
        for key in spec.env.keys where key.isEmpty || key.contains("=") || key.contains("\0") {
            throw SandboxError(.invalidArgument, "invalid environment variable name '\(key)'")
        }
        // No program can receive a NUL inside an argument or a value; refuse rather than cut.
        if spec.command.contains(where: { $0.contains("\0") }) || spec.env.values.contains(where: { $0.contains("\0") })
        {
            throw SandboxError(.invalidArgument, "an argument or environment value contains a NUL byte; remove it")
        }
        if let timeout = spec.timeout, !(timeout > 0) {
            throw SandboxError(.invalidArgument, "timeout must be a positive number of seconds, got \(timeout)")
        }
        if let memory = spec.limits.memoryBytes, memory < 1 << 20 {
            throw SandboxError(
                .invalidArgument, "memory limit \(memory) bytes is below 1 MiB; a sandbox cannot start in that")
        }
        if let cpus = spec.limits.cpus, !(cpus > 0) {
            throw SandboxError(.invalidArgument, "cpus must be positive, got \(cpus)")
        }
        if let pids = spec.limits.pids, pids < 2 {
            throw SandboxError(.invalidArgument, "pids limit must be at least 2 (the sandbox's init and the command)")
        }
        guard !spec.hostname.isEmpty, spec.hostname.count <= 64,
            spec.hostname.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == ".") })
        else {
            throw SandboxError(.invalidArgument, "invalid hostname '\(spec.hostname)'")
        }
    }

    /// An absolute path inside the sandbox without `..`.
    static func validateSandboxPath(_ path: String, what: String) throws {
        guard path.hasPrefix("/") else {
            throw SandboxError(.invalidArgument, "\(what) \(path) must be an absolute path inside the sandbox")
        }
        guard !path.split(separator: "/").contains("..") else {
            throw SandboxError(.pathEscapes, "\(what) \(path) contains '..'; give a path inside the sandbox")
        }
        guard !path.contains("\0"), path.split(separator: "/").count > 0 || what == "working directory" else {
            throw SandboxError(.invalidArgument, "\(what) \(path) names the root directory")
        }
    }

    /// A command's environment: `env` over the image's (`KEY=VALUE` each), with a default PATH.
    public static func environment(_ env: [String: String], image: [String]) -> [String] {
        var environment = env.sorted(by: { $0.key < $1.key }).map { "\($0.key)=\($0.value)" }
        for entry in image where env[String(entry.prefix { $0 != "=" })] == nil { environment.append(entry) }
        if !environment.contains(where: { $0.hasPrefix("PATH=") }) {
            environment.append("PATH=\(ImageConfig.defaultPath)")
        }
        return environment
    }

    /// The image's user (`uid[:gid]`, or names looked up in the image's /etc/passwd and
    /// /etc/group, as OCI images write them).
    public static func parseUser(_ user: String?, filesystem: ImageFilesystem? = nil) throws -> (UInt32, UInt32) {
        guard let user, !user.isEmpty else { return (0, 0) }
        let parts = user.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count <= 2 else {
            throw SandboxError(.invalidArgument, "image user '\(user)' must be user[:group]")
        }
        func lookup(_ file: String, _ name: String) throws -> (UInt32, UInt32?) {
            if let number = UInt32(name) { return (number, nil) }
            guard let filesystem, let node = try filesystem.lookup(file), node.isRegular else {
                throw SandboxError(
                    .invalidArgument, "image user '\(user)': the image has no \(file) to look '\(name)' up in")
            }
            let text = String(decoding: try filesystem.readFile(node), as: UTF8.self)
            for line in text.split(separator: "\n") {
                let fields = line.split(separator: ":", omittingEmptySubsequences: false)
                if fields.count >= 4, fields[0] == name, let id = UInt32(fields[2]) {
                    return (id, UInt32(fields[3]))
                }
            }
            throw SandboxError(.invalidArgument, "image user '\(user)': '\(name)' is not in the image's \(file)")
        }
        let (uid, primary) = try lookup("/etc/passwd", parts[0])
        let gid = parts.count == 2 ? try lookup("/etc/group", parts[1]).0 : primary ?? uid
        return (uid, gid)
    }
}
