import ArgumentParser
import FoundationEssentials
import Glibc
import ImageStore
import LiveSandbox
import Sandbox
import SystemSupport
import VirtualMachine

/// `sandbox`: sandboxes that keep running between commands, snapshotted with their memory and
/// forked. See docs/memory-snapshots.md.
struct SandboxCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandbox",
        abstract: "Live sandboxes: keep one running, run more commands in it, snapshot its memory, fork it.",
        discussion: """
            A live sandbox keeps running after the command that started it: its main command runs \
            in the background, `exec` runs more commands in it. In a VM (--isolation vm, the \
            default) the main command's output is in /scratch/main.log of the guest (outside the \
            image); `snapshot` records its files and its memory and processes as a new image, and \
            `fork` starts children from such an image with their processes running where they were. \
            A container sandbox (--isolation container) takes exec and stop; its main command's \
            output is in live/ID/main.log of the store, it ends when its main command does, and its \
            memory cannot be snapshotted on this host.
            """,
        subcommands: [
            SandboxStart.self, SandboxExec.self, SandboxSnapshot.self, SandboxFork.self, SandboxList.self,
            SandboxStop.self, SandboxHold.self,
        ])
}

extension LiveSandboxes {
    /// Over the store of `options`, with the VM backend.
    static func open(_ options: StoreOptions) throws -> LiveSandboxes {
        let store = try options.open()
        let progress = ProgressReporter()
        // A live container sandbox is held by a process of this program.
        return try LiveSandboxes(
            store: store, baseImages: BaseImages(store: store, progress: progress, sources: .commands),
            backend: VMBackend(progress: progress), holder: [try FileSystem.readLink("/proc/self/exe")])
    }
}

/// `sandbox hold ID`: runs a live container sandbox until it is stopped (started by `sandbox
/// start --isolation container`, never by hand).
struct SandboxHold: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hold", abstract: "Run a live container sandbox (started by `sandbox start`).",
        shouldDisplay: false)

    @OptionGroup var storeOptions: StoreOptions

    @Argument(help: "The live sandbox's id.")
    var id: String

    func run() async throws {
        try await reportingErrors {
            try await LiveSandboxes.open(storeOptions).hold(id)
        }
    }
}

/// The command after `--` (ArgumentParser keeps the separator when it comes first).
private func passedCommand(_ command: [String]) -> [String] {
    command.first == "--" ? Array(command.dropFirst()) : command
}

/// `--help` (or `-h`, `--version`) before a `--` is a question to this tool, not a command.
private func answerHelp(_ command: [String], _ asker: any ParsableCommand) throws {
    switch command.first {
    case "--help", "-h", "-help": throw CleanExit.helpRequest(asker)
    case "--version": throw CleanExit.message(ContreePipeline.version)
    default: break
    }
}

struct SandboxStart: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "start",
        abstract: "Start a live sandbox and print its id; COMMAND (optional) keeps running in it.")

    @OptionGroup var storeOptions: StoreOptions

    @Option(help: "Image: a UUID, a UUID prefix, a tag, or a built-in (busybox, debian:bookworm).")
    var image = BaseImages.defaultImage

    @Option(
        help: "vm (the default: a QEMU microvm, which can be snapshotted and forked) or container (exec and stop only)."
    )
    var isolation: IsolationKind = .vm

    @Option(name: .customLong("env"), help: "Set KEY=VALUE in the sandbox (KEY alone copies the host's value).")
    var env: [String] = []

    @Option(help: "Working directory in the sandbox (created if missing).")
    var cwd: String?

    @Option(help: "The user to run as (user[:group], a name or a number); default: the image's.")
    var user: String?

    @Option(help: "The guest's memory (bytes, or with a k/m/g suffix; default 256m).")
    var memory: String?

    @Option(help: "none, or loopback (lo up; the default).")
    var network: NetworkMode = .loopback

    @Option(help: "The sandbox's hostname.")
    var hostname = "sandbox"

    @Flag(help: "Print the sandbox's record as JSON.")
    var json = false

    @Argument(parsing: .captureForPassthrough, help: "The main command and its arguments (after --).")
    var command: [String] = []

    func validate() throws { try answerHelp(command, self) }

    func run() async throws {
        var options = LiveSandboxes.StartOptions(image: image)
        options.command = passedCommand(command)
        options.env = ExecCommand.parseEnvironment(env)
        options.cwd = cwd
        options.user = user
        options.hostname = hostname
        options.network = network
        options.isolation = isolation
        if let memory {
            guard let bytes = ByteCount.parse(memory) else {
                throw ValidationError("--memory \(memory): give bytes or a number with k, m or g")
            }
            options.memoryBytes = bytes
        }
        let chosen = options
        let sandbox = try await reportingErrors {
            let sandboxes = try LiveSandboxes.open(storeOptions)
            return try await BlockingPool.shared.run { try sandboxes.start(chosen) }
        }
        if json { try printJSON(sandbox) } else { print(sandbox.id) }
    }
}

struct SandboxExec: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command in a live sandbox; exits with its exit code.",
        discussion: """
            What the command leaves running keeps running in the sandbox. Ctrl-C sends it SIGTERM; \
            a second one ends this process, and the command with it.
            """)

    @OptionGroup var storeOptions: StoreOptions

    @Argument(help: "The live sandbox: its id or a unique prefix.")
    var id: String

    @Option(name: .customLong("env"), help: "Set KEY=VALUE (over the sandbox's environment).")
    var env: [String] = []

    @Option(help: "Working directory (default: the sandbox's).")
    var cwd: String?

    @Option(help: "Kill the command after this many seconds.")
    var timeout: Double = 24 * 3600

    @Flag(name: [.short, .long], help: "Pass this process's stdin to the command.")
    var interactive = false

    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments (after --).")
    var command: [String] = []

    func validate() throws {
        if id == "--help" || id == "-h" { throw CleanExit.helpRequest(self) }
        try answerHelp(command, self)
    }

    func run() async throws {
        let argv = passedCommand(command)
        guard !argv.isEmpty else {
            throw ValidationError("no command given: contree-pipeline sandbox exec ID -- COMMAND [ARGS...]")
        }
        let termination = try await reportingErrors {
            let sandboxes = try LiveSandboxes.open(storeOptions)
            let sandbox = try sandboxes.resolve(id)
            var environment = sandbox.env.filter { entry in
                !env.contains { $0.hasPrefix(String(entry.prefix { $0 != "=" }) + "=") }
            }
            environment += ExecCommand.parseEnvironment(env).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
            if sandbox.isolation == .container {
                var spec = ExecSpec(
                    command: argv, environment: environment, cwd: cwd ?? sandbox.workdir, uid: sandbox.uid,
                    gid: sandbox.gid, stdin: interactive ? .fileDescriptor(0) : .null, stdout: .fileDescriptor(1),
                    stderr: .fileDescriptor(2), timeout: timeout)
                let control = RunControl()
                spec.control = control
                let signals = Termination.onSignal { control.signal(SIGTERM) }
                defer { signals.forEach { $0.cancel() } }
                return try await sandboxes.execContainer(sandbox, spec).termination
            }
            let session = try sandboxes.session(sandbox)
            defer { session.close() }
            let signals = Termination.onSignal { session.signal(SIGTERM) }
            defer { signals.forEach { $0.cancel() } }
            let workdir = cwd ?? sandbox.workdir
            let stdin: MicroVM.Input = interactive ? .fileDescriptor(0) : .bytes([])
            let timeout = timeout
            let environmentGiven = environment
            return try await BlockingPool.shared.run {
                try session.exec(
                    argv: argv, env: environmentGiven, workdir: workdir, uid: sandbox.uid, gid: sandbox.gid,
                    stdin: stdin,
                    timeout: timeout, onStdout: { try? FileSystem.writeAll(fd: 1, $0, path: "stdout") },
                    onStderr: { try? FileSystem.writeAll(fd: 2, $0, path: "stderr") })
            }.termination
        }
        if termination.timedOut {
            printError("contree: the command timed out after \(timeout) s and was killed")
        }
        let status = termination.shellStatus
        if status != 0 { throw ExitCode(status) }
    }
}

struct SandboxSnapshot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Record a live sandbox's files, memory and processes as a new image; print its UUID.",
        discussion: """
            The sandbox's processes are frozen while its files are taken and its memory saved, then \
            go on. `sandbox fork IMAGE` starts children from the image with their processes \
            running; `exec --image IMAGE` starts from its files only.
            """)

    @OptionGroup var storeOptions: StoreOptions

    @Argument(help: "The live sandbox: its id or a unique prefix.")
    var id: String

    @Option(help: "Tag the image.")
    var tag: String?

    @Flag(help: "Print the image's record as JSON.")
    var json = false

    func run() async throws {
        let image = try await reportingErrors {
            let sandboxes = try LiveSandboxes.open(storeOptions)
            let sandbox = try sandboxes.resolve(id)
            let tag = tag
            return try await BlockingPool.shared.run { try sandboxes.snapshot(sandbox, tag: tag) }
        }
        if json { try printJSON(image) } else { print(image.uuid) }
    }
}

struct SandboxFork: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fork",
        abstract: "Start live sandboxes from an image's memory snapshot; print their ids, one a line.",
        discussion: """
            Each child goes on from the snapshot's processes with its own clock, random state and \
            memory (copy on write: it costs what it writes). An image without a memory snapshot is \
            refused.
            """)

    @OptionGroup var storeOptions: StoreOptions

    @Argument(help: "The image: a UUID, a UUID prefix or a tag (made by `sandbox snapshot`).")
    var image: String

    @Option(help: "How many children.")
    var count = 1

    @Option(help: "The children's hostname (default: the snapshot's).")
    var hostname: String?

    @Flag(help: "Print the children's records as JSON.")
    var json = false

    func validate() throws {
        guard (1...256).contains(count) else { throw ValidationError("--count \(count): give 1 to 256") }
    }

    func run() async throws {
        let children = try await reportingErrors {
            let sandboxes = try LiveSandboxes.open(storeOptions)
            let (image, count, hostname) = (image, count, hostname)
            return try await BlockingPool.shared.run { try sandboxes.fork(image, count: count, hostname: hostname) }
        }
        if json { try printJSON(children) } else { for child in children { print(child.id) } }
    }
}

struct SandboxList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls", abstract: "List the live sandboxes: running or not, their image and main command.")

    @OptionGroup var storeOptions: StoreOptions

    @Flag(help: "Print JSON.")
    var json = false

    struct Entry: Encodable {
        var sandbox: LiveSandbox
        var running: Bool
        var main: String?
    }

    func run() async throws {
        let entries = try reportingErrors {
            let sandboxes = try LiveSandboxes.open(storeOptions)
            return try sandboxes.list().map { sandbox in
                Entry(sandbox: sandbox, running: sandboxes.isRunning(sandbox), main: sandboxes.mainState(sandbox))
            }
        }
        if json {
            try printJSON(entries)
            return
        }
        print(
            Format.table(
                ["ID", "STATE", "ISOLATION", "IMAGE", "MEMORY", "MAIN", "COMMAND"],
                entries.map { entry in
                    [
                        String(entry.sandbox.id.prefix(12)), entry.running ? "running" : "ended",
                        entry.sandbox.isolation.rawValue, String(entry.sandbox.image.prefix(12)),
                        entry.sandbox.isolation == .vm ? "\(entry.sandbox.memoryMiB) MiB" : "-", entry.main ?? "-",
                        entry.sandbox.command.joined(separator: " "),
                    ]
                }))
    }
}

struct SandboxStop: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop", abstract: "Stop live sandboxes (everything in them ends; nothing is kept) and forget them."
    )

    @OptionGroup var storeOptions: StoreOptions

    @Argument(help: "Live sandboxes: ids or unique prefixes.")
    var ids: [String] = []

    @Flag(help: "Stop every live sandbox of the store.")
    var all = false

    func validate() throws {
        guard all != !ids.isEmpty else { throw ValidationError("name the sandboxes to stop, or give --all") }
    }

    func run() async throws {
        try reportingErrors {
            let sandboxes = try LiveSandboxes.open(storeOptions)
            let chosen = all ? try sandboxes.list() : try ids.map(sandboxes.resolve)
            for sandbox in chosen { try sandboxes.stop(sandbox) }
        }
    }
}
