#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// What a run measured.
public struct RunMetrics: Codable, Sendable, Equatable {
    public var wallSeconds: Double = 0
    public var cpuUserSeconds: Double = 0
    public var cpuSystemSeconds: Double = 0
    /// Peak memory of the whole sandbox (the cgroup's peak; the largest process's RSS if the
    /// host has no memory cgroup).
    public var peakMemoryBytes: Int64 = 0
    /// Block I/O of the sandbox's processes.
    public var bytesRead: Int64 = 0
    public var bytesWritten: Int64 = 0
    /// Tasks (processes and threads) created in the sandbox.
    public var processes: Int64 = 0
    /// Most tasks alive at once, where the host's pids cgroup reports it.
    public var peakProcesses: Int64?
    /// Entries (not directories) and bytes in the run's change set.
    public var diffFiles: Int = 0
    public var diffBytes: Int64 = 0
    /// Time spent turning the changes into an image.
    public var commitSeconds: Double = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case wallSeconds = "wall_seconds"
        case cpuUserSeconds = "cpu_user_seconds"
        case cpuSystemSeconds = "cpu_system_seconds"
        case peakMemoryBytes = "peak_memory_bytes"
        case bytesRead = "bytes_read"
        case bytesWritten = "bytes_written"
        case processes
        case peakProcesses = "peak_processes"
        case diffFiles = "diff_files"
        case diffBytes = "diff_bytes"
        case commitSeconds = "commit_seconds"
    }
}

/// The durable record of one run.
public struct RunRecord: Codable, Sendable, Equatable {
    public var id: String
    /// The image the run started from.
    public var image: String
    /// The image it produced: the same UUID when nothing changed; nil when disposable,
    /// killed, or failed to start.
    public var resultImage: String?
    public var command: [String]
    public var exitCode: Int32?
    public var signal: Int32?
    public var timedOut: Bool
    public var oomKilled: Bool
    public var cancelled: Bool
    public var disposable: Bool
    public var backend: IsolationKind
    /// For the VM backend: `kvm` or `tcg`.
    public var acceleration: String?
    public var startedAt: Date
    public var metrics: RunMetrics
    /// Why the run's change was not kept although the run ended (a limit, a timeout or a
    /// cancel during the commit); nil otherwise.
    public var discarded: String? = nil

    public init(
        id: String, image: String, resultImage: String?, command: [String], termination: Termination,
        disposable: Bool, backend: IsolationKind, acceleration: String? = nil, startedAt: Date,
        metrics: RunMetrics = RunMetrics()
    ) {
        self.id = id
        self.image = image
        self.resultImage = resultImage
        self.command = command
        self.exitCode = termination.exitCode
        self.signal = termination.signal
        self.timedOut = termination.timedOut
        self.oomKilled = termination.oomKilled
        self.cancelled = termination.cancelled
        self.disposable = disposable
        self.backend = backend
        self.acceleration = acceleration
        self.startedAt = startedAt
        self.metrics = metrics
    }

    /// How the run's command ended (the record keeps its fields flat: they are its JSON).
    public var termination: Termination {
        var termination = Termination(exitCode: exitCode, signal: signal)
        termination.timedOut = timedOut
        termination.oomKilled = oomKilled
        termination.cancelled = cancelled
        return termination
    }

    /// The exit status a shell would report: the code, 128+signal, or 124 for a timeout.
    public var shellStatus: Int32 { termination.shellStatus }

    enum CodingKeys: String, CodingKey {
        case id, image
        case resultImage = "result_image"
        case command
        case exitCode = "exit_code"
        case signal
        case timedOut = "timed_out"
        case oomKilled = "oom_killed"
        case cancelled, disposable, backend, acceleration
        case startedAt = "started_at"
        case metrics, discarded
    }
}

/// A run's record plus the output it captured.
public struct RunResult: Sendable {
    public var record: RunRecord
    public var stdout: [UInt8]
    public var stderr: [UInt8]
    /// Bytes produced beyond the capture limit.
    public var stdoutDropped: Int
    public var stderrDropped: Int
    /// What the command wrote to `RunSpec.outputPath` (at most 1 MiB), if one was asked for.
    public var output: [UInt8]?
}
