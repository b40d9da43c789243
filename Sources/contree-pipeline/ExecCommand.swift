import ArgumentParser
import Dispatch
import FoundationEssentials
import Glibc
import ImageStore
import Sandbox
import Synchronization
import SystemSupport

extension NetworkMode: ExpressibleByArgument {}
extension IsolationKind: ExpressibleByArgument {}

struct ExecCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command in a sandbox over an image.",
        discussion: """
            Streams the command's output live and exits with its exit code (124 on timeout, 128+N \
            when killed by signal N, 125 when the sandbox could not start). Unless --disposable, \
            the changes become a new image whose parent is IMAGE (the same image if nothing \
            changed); --json prints the run's record with its metrics.
            """)

    @OptionGroup var storeOptions: StoreOptions

    @Option(help: "Image: a UUID, a UUID prefix, a tag, or a built-in (busybox, debian:bookworm).")
    var image = BaseImages.defaultImage

    @Flag(help: "Discard the changes instead of making an image.")
    var disposable = false

    @Option(name: .customLong("env"), help: "Set KEY=VALUE in the sandbox (KEY alone copies the host's value).")
    var env: [String] = []

    @Option(help: "Working directory in the sandbox (created if missing).")
    var cwd: String?

    @Option(name: .customLong("file"), help: "Copy a host file in: HOST:SANDBOX[:MODE].")
    var files: [String] = []

    @Option(help: "Kill the sandbox after this many seconds.")
    var timeout: Double?

    @Option(help: "Memory limit (bytes, or with a k/m/g suffix).")
    var memory: String?

    @Option(help: "CPU quota in cores.")
    var cpus: Double?

    @Option(help: "Maximum number of processes and threads (default 4096).")
    var pids: Int?

    @Option(
        help:
            "none: no interface up; loopback: lo only (default); egress: lo and a NAT uplink to the outside (pasta), never the host's own loopback; egress+host-loopback: egress, and the host's 127.0.0.1 reachable at $CONTREE_HOST (10.0.2.2)."
    )
    var network: NetworkMode = .loopback

    @Flag(help: "With --network egress: reach the host's loopback at $CONTREE_HOST.")
    var hostLoopback = false

    @Option(help: "The sandbox's hostname.")
    var hostname = "sandbox"

    @Option(
        help: "container (namespaces, the default) or vm (a QEMU microvm; under emulation where KVM cannot run it).")
    var isolation: IsolationKind = .container

    @Option(help: "Tag the resulting image.")
    var tag: String?

    @Flag(
        help:
            "Resume the memory snapshot IMAGE holds (made by `sandbox snapshot` or a persist: memory step): its processes run when the command starts. Needs --isolation vm."
    )
    var resume = false

    @Flag(name: [.short, .long], help: "Pass this process's stdin to the command.")
    var interactive = false

    @Flag(help: "Print the run's record as JSON on stdout (the command's output goes to stderr).")
    var json = false

    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments (after --).")
    var command: [String] = []

    /// The command is captured as it is, options and all; `--help` (or `-h`, `--version`) before
    /// a `--` is a question to this tool, not a command to run (`exec -- --help` runs one).
    func validate() throws {
        switch command.first {
        case "--help", "-h", "-help": throw CleanExit.helpRequest(self)
        case "--version": throw CleanExit.message(ContreePipeline.version)
        default: break
        }
        if hostLoopback && !network.isEgress {
            throw ValidationError("--host-loopback needs --network egress; add it, or drop --host-loopback")
        }
    }

    /// `--network egress --host-loopback` is `egress+host-loopback`.
    var effectiveNetwork: NetworkMode { hostLoopback && network == .egress ? .egressHostLoopback : network }

    func run() async throws {
        Trace.mark("exec: arguments parsed")
        ContainerBackend.warmUp()
        let argv = command.first == "--" ? Array(command.dropFirst()) : command
        let spec: RunSpec
        let store: Store
        do {
            spec = try makeSpec(argv)
            store = try storeOptions.open()
            Trace.mark("store opened")
        } catch {
            _ = fail(error)
            throw ExitCode(125)
        }
        let engine = SandboxEngine.withAllBackends(store: store, progress: ProgressReporter())
        let task = Task { try await engine.run(spec) }
        let signals = Termination.cancelOnSignal(task)
        defer { signals.forEach { $0.cancel() } }
        let result: RunResult
        do {
            result = try await task.value
        } catch let error as SandboxError where error.code == .cancelled {
            printError("contree: \(error.message)")
            throw ExitCode(130)
        } catch {
            _ = fail(error)
            throw ExitCode(125)
        }
        let record = result.record
        if json {
            try printJSON(record)
        } else if record.timedOut {
            printError("contree: the command timed out after \(timeout ?? 0) s and was killed")
        } else if record.cancelled {
            printError("contree: cancelled")
        } else if record.oomKilled {
            printError("contree: the sandbox ran out of memory (limit \(memory ?? "none")); a process was killed")
        }
        if record.shellStatus != 0 { throw ExitCode(record.shellStatus) }
    }

    private func makeSpec(_ argv: [String]) throws -> RunSpec {
        guard !argv.isEmpty else {
            throw SandboxError(
                .invalidArgument, "no command given: contree-pipeline exec [options] -- COMMAND [ARGS...]")
        }
        let environment = ExecCommand.parseEnvironment(env)
        var limits = ResourceLimits()
        if let memory {
            guard let bytes = ByteCount.parse(memory) else {
                throw SandboxError(.invalidArgument, "--memory \(memory): give bytes or a number with k, m or g")
            }
            limits.memoryBytes = bytes
        }
        limits.cpus = cpus
        if let pids { limits.pids = pids }
        let output: OutputSink = .fileDescriptor(json ? 2 : 1)
        var spec = RunSpec(
            image: image, command: argv, env: environment, cwd: cwd, files: try files.map(ExecCommand.parseMapping),
            timeout: timeout, limits: limits, network: effectiveNetwork, hostname: hostname, disposable: disposable,
            stdin: interactive ? .fileDescriptor(0) : .null, stdout: output, stderr: .fileDescriptor(2),
            isolation: isolation)
        spec.tag = tag
        if resume { spec.resume = .required }
        return spec
    }

    /// `--env` entries: KEY=VALUE, or KEY alone for the host's value (left out when unset).
    static func parseEnvironment(_ entries: [String]) -> [String: String] {
        var environment: [String: String] = [:]
        for entry in entries {
            if let eq = entry.firstIndex(of: "=") {
                environment[String(entry[..<eq])] = String(entry[entry.index(after: eq)...])
            } else if let value = getenv(entry) {
                environment[entry] = String(cString: value)
            }
        }
        return environment
    }

    /// HOST:SANDBOX[:MODE], SANDBOX absolute.
    static func parseMapping(_ text: String) throws -> FileMapping {
        var body = Substring(text)
        var mode: UInt32?
        if let last = body.lastIndex(of: ":"), let m = UInt32(body[body.index(after: last)...], radix: 8),
            !body[body.index(after: last)...].contains("/")
        {
            mode = m
            body = body[..<last]
        }
        let chars = Array(body)
        guard let split = (0..<max(0, chars.count - 1)).last(where: { chars[$0] == ":" && chars[$0 + 1] == "/" }),
            split > 0
        else {
            throw SandboxError(
                .invalidArgument, "--file \(text): use HOST:SANDBOX[:MODE] with an absolute SANDBOX path")
        }
        return FileMapping(hostPath: String(chars[..<split]), sandboxPath: String(chars[(split + 1)...]), mode: mode)
    }
}

/// Ctrl-C and SIGTERM cancel the running work instead of killing the process, so the run is
/// recorded and the store stays tidy.
enum Termination {
    /// The first signal cancels `task`; a second one ends the process at once (its sandboxes die
    /// with it, and the next command cleans up what they leave).
    static func cancelOnSignal<T>(_ task: Task<T, Error>) -> [DispatchSourceSignal] {
        onSignal { task.cancel() }
    }

    /// The first SIGINT, SIGTERM or SIGHUP calls `cancel`; a second one ends the process, unless
    /// `repeatEnds` is false (a cluster node's step: Slurm, or sudo relaying it, may send SIGTERM
    /// twice, and the step must still clean up; Slurm's own SIGKILL is the hard stop).
    static func onSignal(repeatEnds: Bool = true, _ cancel: @escaping @Sendable () -> Void) -> [DispatchSourceSignal] {
        let received = Mutex(0)
        return [SIGINT, SIGTERM, SIGHUP].map { sig in
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler {
                let count = received.withLock { n -> Int in
                    n += 1
                    return n
                }
                if count > 1 {
                    guard repeatEnds else { return }
                    printError("contree: interrupted again; stopping now")
                    exit(130)
                }
                cancel()
            }
            source.resume()
            return source
        }
    }
}
