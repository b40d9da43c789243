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

    public init(hostPath: String, sandboxPath: String, mode: UInt32? = nil, uid: UInt32 = 0, gid: UInt32 = 0) {
        self.hostPath = hostPath
        self.sandboxPath = sandboxPath
        self.mode = mode
        self.uid = uid
        self.gid = gid
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
