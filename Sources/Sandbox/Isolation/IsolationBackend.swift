import ImageStore
import SystemSupport

/// Everything a backend needs to run one command over an overlay of layers. The engine has
/// resolved the image, taken a lease and prepared the upper; the backend only isolates, runs
/// and measures.
public struct LaunchRequest: Sendable {
    /// The lease id: names the work dir and the cgroup.
    public var id: String
    public var storeRoot: String
    /// Layer directories relative to the store root, top-most first.
    public var lowers: [String]
    /// The run's own directory, relative to the store root: the backend leaves the run's
    /// change in `upper` inside it and may keep what else it needs there (the container
    /// backend its overlay's work directory and the mount point of the root).
    public var directory: String
    public var argv: [String]
    /// `KEY=VALUE`, the image's environment merged with the run's.
    public var environment: [String]
    public var cwd: String
    public var uid: UInt32
    public var gid: UInt32
    public var hostname: String
    public var network: NetworkMode
    /// A network to join (its mode wins over `network`); nil: the backend makes one for the run.
    public var sharedNetwork: SandboxNetwork?
    /// Host paths mounted for the run; what is written there is not part of the change.
    public var mounts: [BindMount]
    public var limits: ResourceLimits
    public var timeout: Double?
    /// Host files to copy in, already opened (the fds stay owned by the caller).
    public var files: [(fd: Int32, mapping: FileMapping)]
    public var stdin: InputSource
    public var stdout: OutputSink
    public var stderr: OutputSink
    public var terminal: TerminalSession?
    public var control: RunControl?
    /// Memory snapshots (the VM backend only): resume the run from one, keep one of it, or both.
    public var memory: MemoryRun?
}

/// A run that starts from, or ends in, a memory snapshot: its processes go on where a snapshot
/// left them, and those it leaves running are saved with its files.
public struct MemoryRun: Sendable {
    /// Keep the command's processes (what it left running) with its changes: the outcome
    /// carries the state, placed in the store, for the engine to record with the image.
    public var persist: Bool
    /// The snapshot the run resumes (its processes running before the command starts); the
    /// run's `lowers` are then the snapshot's base's, and its change is relative to them.
    public var resume: ImageState?
}

extension LaunchRequest {
    /// Where the change goes, relative to the store root: what the engine commits.
    public var upper: String { directory + "/upper" }
}

/// An isolation technology: the container backend (namespaces, overlayfs, seccomp, cgroups)
/// or the VM backend. Both read layers from the same store and leave their changes in the
/// request's upper directory, so their images are interchangeable.
public protocol IsolationBackend: Sendable {
    var kind: IsolationKind { get }
    /// Runs the request to completion. Cancelling the calling task kills the sandbox.
    /// - Throws: `sandboxSetup` when the sandbox could not be started.
    func run(_ request: LaunchRequest) async throws -> CommandOutcome
}
