import CSandbox
import Glibc
import ImageStore
import Synchronization
import SystemSupport

/// Which isolation backend runs a sandbox.
public enum IsolationKind: String, Codable, Sendable, CaseIterable {
    case container
    case vm
}

/// The sandbox's network.
public enum NetworkMode: String, Codable, Sendable, CaseIterable {
    /// A network namespace with no interface up.
    case none
    /// A network namespace with only `lo`, up.
    case loopback
    /// `lo` and a NAT uplink to the outside (see `SandboxNetwork`); the host's own loopback
    /// stays out of reach.
    case egress
    /// Egress, and the host's loopback reachable at `SandboxNetwork.hostAddress` (`$CONTREE_HOST`).
    case egressHostLoopback = "egress+host-loopback"
}

/// A host directory (or file) mounted read-write (or read-only) into the sandbox for the run;
/// what is written there is not part of the run's change (a dependency cache).
public struct BindMount: Sendable, Equatable {
    public var source: String
    public var target: String
    public var readOnly: Bool
    public var isFile: Bool

    public init(source: String, target: String, readOnly: Bool = false, isFile: Bool = false) {
        self.source = source
        self.target = target
        self.readOnly = readOnly
        self.isFile = isFile
    }
}

/// A host file copied into the sandbox before the command starts (it becomes part of the
/// run's image unless the run is disposable).
public struct FileMapping: Sendable, Equatable {
    public var hostPath: String
    public var sandboxPath: String
    /// Permission bits; nil keeps the host file's.
    public var mode: UInt32?
    public var uid: UInt32
    public var gid: UInt32
    /// How `hostPath` is opened: `.beneath(root)` for a path a pipeline named (see `HostPaths`).
    public var hostPaths: HostPaths

    public init(
        hostPath: String, sandboxPath: String, mode: UInt32? = nil, uid: UInt32 = 0, gid: UInt32 = 0,
        hostPaths: HostPaths = .anywhere
    ) {
        self.hostPath = hostPath
        self.sandboxPath = sandboxPath
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.hostPaths = hostPaths
    }
}

/// Where the command's stdin comes from.
public enum InputSource: Sendable {
    case null
    /// A host file descriptor the sandbox reads directly (not closed by the engine).
    case fileDescriptor(Int32)
    case bytes([UInt8])
}

/// Where one of the command's output streams goes.
public enum OutputSink: Sendable {
    /// Straight into a host file descriptor (the terminal, a log file), live.
    case fileDescriptor(Int32)
    /// Into memory (up to `limit` bytes kept; the rest counted), each chunk also passed to
    /// `onChunk` as it arrives.
    case capture(limit: Int, onChunk: (@Sendable ([UInt8]) -> Void)? = nil)
    case discard
}

/// An interactive session: the command runs on a pseudo-terminal whose input and output are
/// relayed to these descriptors (put the caller's terminal in raw mode around the run).
public struct TerminalSession: Sendable, Equatable {
    public var inputFD: Int32
    public var outputFD: Int32

    public init(inputFD: Int32 = 0, outputFD: Int32 = 1) {
        self.inputFD = inputFD
        self.outputFD = outputFD
    }
}

/// One more command to start in a running sandbox (`RunControl.exec`): same root, namespaces,
/// cgroup, credentials and system call filter as the sandbox's own command.
public struct ExecSpec: Sendable {
    /// argv; `command[0]` is looked up in PATH from `environment`.
    public var command: [String]
    /// `KEY=VALUE`; nothing is inherited.
    public var environment: [String]
    public var cwd: String
    public var uid: UInt32
    public var gid: UInt32
    public var stdin: InputSource
    public var stdout: OutputSink
    public var stderr: OutputSink
    /// Seconds; nil for none (it ends with the sandbox at the latest).
    public var timeout: Double?
    /// Signals the command once it runs (its `exec` is refused).
    public var control: RunControl?

    public init(
        command: [String], environment: [String], cwd: String = "/", uid: UInt32 = 0, gid: UInt32 = 0,
        stdin: InputSource = .null, stdout: OutputSink = .capture(limit: 1 << 20),
        stderr: OutputSink = .capture(limit: 1 << 20), timeout: Double? = nil
    ) {
        self.command = command
        self.environment = environment
        self.cwd = cwd
        self.uid = uid
        self.gid = gid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.timeout = timeout
    }
}

/// What a running sandbox offers its control: signals to its command, and more commands.
/// What a backend hands `RunControl` while its command runs.
public protocol RunningSandbox: Sendable {
    func signal(_ signal: Int32)
    func exec(_ spec: ExecSpec) async throws -> CommandOutcome
    /// Saves the running sandbox's memory and processes with its files (it goes on
    /// afterwards): its changes as a layer tar at the returned path (in `directory`), its state
    /// placed in the store.
    func snapshotMemory(in directory: String) async throws -> (changes: ChangesFile, state: PlacedState)
}

extension RunningSandbox {
    public func snapshotMemory(in directory: String) async throws -> (changes: ChangesFile, state: PlacedState) {
        throw SandboxError(
            .unsupported,
            "memory snapshots need isolation vm: this host's CRIU cannot checkpoint a container; run the instance with isolation vm"
        )
    }
}

/// A handle on a running sandbox: signal its command, start more commands in it, and learn
/// when it has started.
public final class RunControl: Sendable {
    private let state = Mutex<(sandbox: (any RunningSandbox)?, pending: [Int32], ended: Bool)>((nil, [], false))
    private let onStart: Mutex<(@Sendable () -> Void)?>

    /// - Parameter onStart: called once the command has been started (after the sandbox is set up).
    public init(onStart: (@Sendable () -> Void)? = nil) {
        self.onStart = Mutex(onStart)
    }

    /// Replaces the start callback (before the run starts).
    public func whenStarted(_ body: @escaping @Sendable () -> Void) {
        onStart.withLock { $0 = body }
    }

    /// Sends `signal` to the command's process group (pid 1 of the sandbox forwards it).
    /// SIGKILL stops the whole sandbox. A signal sent before the start is delivered at the start.
    public func signal(_ signal: Int32) {
        let sandbox = state.withLock { state -> (any RunningSandbox)? in
            if state.sandbox == nil && !state.ended { state.pending.append(signal) }
            return state.sandbox
        }
        sandbox?.signal(signal)
    }

    /// Whether the command runs now.
    public var isRunning: Bool { state.withLock { $0.sandbox != nil } }

    /// The running sandbox (nil before it runs and after).
    var running: (any RunningSandbox)? { state.withLock { $0.sandbox } }

    /// Starts `spec` in the running sandbox and waits for it. Cancelling the task kills it.
    /// - Throws: `conflict` when the sandbox is not running (not yet, or no more).
    public func exec(_ spec: ExecSpec) async throws -> CommandOutcome {
        guard let sandbox = state.withLock({ $0.sandbox }) else {
            throw SandboxError(.conflict, "the sandbox is not running, so nothing can be started in it")
        }
        return try await sandbox.exec(spec)
    }

    /// Records the running sandbox's memory, processes and files as a new image (it goes on).
    /// - Throws: `conflict` when it is not running; `unsupported` for a container.
    public func snapshotMemory() async throws -> ImageRecord {
        guard let sandbox = state.withLock({ $0.sandbox }), let committer = committer.withLock({ $0 }) else {
            throw SandboxError(.conflict, "the sandbox is not running, so its memory cannot be saved")
        }
        return try await committer(sandbox)
    }

    /// How the engine turns a running sandbox's memory snapshot into an image.
    private let committer = Mutex<(@Sendable (any RunningSandbox) async throws -> ImageRecord)?>(nil)

    /// Set by the engine before the run starts.
    public func setCommitter(_ body: @escaping @Sendable (any RunningSandbox) async throws -> ImageRecord) {
        committer.withLock { $0 = body }
    }

    /// Called by the backend once the command runs.
    public func attach(_ sandbox: any RunningSandbox) {
        let pending = state.withLock { state in
            state.sandbox = sandbox
            defer { state.pending = [] }
            return state.pending
        }
        onStart.withLock { $0 }?()
        for s in pending { sandbox.signal(s) }
    }

    /// Called by the backend when the sandbox ends (before its resources go).
    public func detach() {
        state.withLock {
            $0.sandbox = nil
            $0.ended = true
        }
    }
}

/// One command to run in a sandbox over an image.
public struct RunSpec: Sendable {
    /// An image reference: UUID, UUID prefix, tag, or built-in name (`busybox`).
    public var image: String
    /// argv; `command[0]` is looked up in the sandbox's PATH.
    public var command: [String]
    /// Added to (and overriding) the image's environment.
    public var env: [String: String]
    /// Working directory; nil uses the image's. Created if missing.
    public var cwd: String?
    public var files: [FileMapping]
    /// Seconds; nil for no limit.
    public var timeout: Double?
    public var limits: ResourceLimits
    public var network: NetworkMode
    /// A network to join instead of a new one (a step's services share the step's); its mode
    /// then wins over `network`.
    public var sharedNetwork: SandboxNetwork?
    /// Host directories mounted for the run (dependency caches).
    public var mounts: [BindMount] = []
    public var hostname: String
    /// Discard the changes instead of committing them as an image.
    public var disposable: Bool
    public var stdin: InputSource
    public var stdout: OutputSink
    public var stderr: OutputSink
    public var isolation: IsolationKind
    /// A file the command may write results to (`$CONTREE_OUTPUT` in pipelines), in a
    /// top-level directory of its own that the image lacks. Created empty before the run; its
    /// content comes back in `RunResult.output`, and the directory never lands in the image.
    public var outputPath: String?
    /// Run on a terminal (stdin, stdout and stderr are ignored then).
    public var terminal: TerminalSession?
    /// Whether the command sees the image's environment under `env` (false: only `env`, plus
    /// a default PATH when `env` has none).
    public var inheritImageEnv = true
    /// The config of the image the run commits; nil keeps the base image's. An image is made
    /// even when only the config changed.
    public var resultConfig: ImageConfig?
    /// A tag the result image gets in the transaction that records it: there is no instant
    /// at which `gc --prune-untagged` could take it for an untagged image.
    public var tag: String?
    /// Signals the running command and learns when it starts.
    public var control: RunControl?
    /// The uid and gid the command runs as; nil uses the image's user.
    public var user: (uid: UInt32, gid: UInt32)?
    /// Keep the processes the command leaves running with its image: a memory snapshot
    /// (isolation vm; `persist: memory` in a pipeline).
    public var persistMemory = false
    /// Whether the run resumes the memory snapshot its image holds (its processes running).
    public var resume = ResumeMode.never

    public enum ResumeMode: Sendable {
        case never
        /// When the image holds a memory snapshot and the run is a VM's (a pipeline step `from`
        /// a `persist: memory` step); otherwise from its files.
        case ifHeld
        /// Refused when the image holds none (`exec --resume`).
        case required
    }

    public init(
        image: String = "busybox", command: [String], env: [String: String] = [:], cwd: String? = nil,
        files: [FileMapping] = [], timeout: Double? = nil, limits: ResourceLimits = ResourceLimits(),
        network: NetworkMode = .loopback, hostname: String = "sandbox", disposable: Bool = false,
        stdin: InputSource = .null, stdout: OutputSink = .capture(limit: 1 << 20),
        stderr: OutputSink = .capture(limit: 1 << 20), isolation: IsolationKind = .container,
        outputPath: String? = nil, terminal: TerminalSession? = nil
    ) {
        self.image = image
        self.command = command
        self.env = env
        self.cwd = cwd
        self.files = files
        self.timeout = timeout
        self.limits = limits
        self.network = network
        self.hostname = hostname
        self.disposable = disposable
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.isolation = isolation
        self.outputPath = outputPath
        self.terminal = terminal
    }
}
