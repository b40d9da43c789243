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
    /// Upper and work directories relative to the store root; `rootMount` is an absolute
    /// empty directory the root is mounted on.
    public var upper: String
    public var work: String
    public var rootMount: String
    public var argv: [String]
    /// `KEY=VALUE`, the image's environment merged with the run's.
    public var environment: [String]
    public var cwd: String
    public var uid: UInt32
    public var gid: UInt32
    public var hostname: String
    public var network: NetworkMode
    public var limits: ResourceLimits
    public var timeout: Double?
    /// Host files to copy in, already opened (the fds stay owned by the caller).
    public var files: [(fd: Int32, mapping: FileMapping)]
    public var stdin: InputSource
    public var stdout: OutputSink
    public var stderr: OutputSink
    public var terminal: TerminalSession?
    public var control: RunControl?
}

/// How a launched sandbox ended.
public struct LaunchOutcome: Sendable {
    public var exitCode: Int32?
    public var signal: Int32?
    public var timedOut = false
    public var cancelled = false
    public var oomKilled = false
    /// The run was stopped because its change grew past `ResourceLimits.layerBytes`.
    public var changeTooLarge = false
    public var metrics = RunMetrics()
    public var stdout: [UInt8] = []
    public var stderr: [UInt8] = []
    public var stdoutDropped = 0
    public var stderrDropped = 0
    /// For the VM backend: `kvm` or `tcg`.
    public var acceleration: String?

    public init() {}
}

/// An isolation technology: the container backend (namespaces, overlayfs, seccomp, cgroups)
/// or the VM backend. Both read layers from the same store and leave their changes in the
/// request's upper directory, so their images are interchangeable.
public protocol IsolationBackend: Sendable {
    var kind: IsolationKind { get }
    /// Runs the request to completion. Cancelling the calling task kills the sandbox.
    /// - Throws: `sandboxSetup` when the sandbox could not be started.
    func run(_ request: LaunchRequest) async throws -> LaunchOutcome
}
