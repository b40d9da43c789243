import ImageStore

/// How a command in a sandbox ended, whichever backend ran it and whether it was the
/// sandbox's own command or one started in it later (`RunControl.exec`).
public struct Termination: Sendable, Equatable {
    /// The exit code, if the command exited.
    public var exitCode: Int32?
    /// The signal that ended it, if one did.
    public var signal: Int32?
    /// Killed at its timeout.
    public var timedOut = false
    /// Killed because its caller cancelled the run.
    public var cancelled = false
    /// Killed by the kernel's OOM killer inside its memory limit.
    public var oomKilled = false
    /// Stopped because its change grew past `ResourceLimits.layerBytes` (the sandbox's own
    /// command only).
    public var changeTooLarge = false

    public init(exitCode: Int32? = nil, signal: Int32? = nil) {
        self.exitCode = exitCode
        self.signal = signal
    }

    /// The exit status a shell would report: the code, 128+signal, or 124 for a timeout.
    public var shellStatus: Int32 {
        if timedOut { return 124 }
        if let exitCode { return exitCode }
        if let signal { return 128 + signal }
        return 125
    }
}

/// What a backend's run, or a command started in a running sandbox, gives back: how it ended,
/// what it printed (as far as captured) and what it used.
public struct CommandOutcome: Sendable {
    public var termination = Termination()
    /// A command started in a running sandbox measures its wall time only.
    public var metrics = RunMetrics()
    public var stdout: [UInt8] = []
    public var stderr: [UInt8] = []
    /// Bytes produced beyond the capture limit.
    public var stdoutDropped = 0
    public var stderrDropped = 0
    /// For the VM backend: `kvm` or `tcg`.
    public var acceleration: String?
    /// The memory snapshot of a run asked to persist its memory, placed in the store.
    public var memoryState: PlacedState?

    public init() {}
}
