import ArgumentParser
import Cluster
import Foundation
import Glibc
import Sandbox
import SystemSupport

/// `contree-pipeline step --spec -`: runs one step a coordinator rendered (`run --executor
/// slurm` starts it on a node with srun). Not for people: the spec comes on stdin.
struct StepCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "step",
        abstract: "Run one rendered step on this machine (what run --executor slurm starts on each node).",
        discussion: """
            Reads the step's spec (JSON, with its secrets) from stdin, imports the snapshot it \
            starts from from the registry it names, runs it in this machine's store \
            ($CONTREE_HOME), pushes the snapshot it leaves, and writes one JSON line when it \
            starts and one when it ends on stdout; the step's output goes to stderr. Exit \
            status: the step's, 75 when this machine could not run it (registry, store, \
            version, root), 143 when cancelled.
            """)

    @OptionGroup var storeOptions: StoreOptions
    @Option(help: ArgumentHelp("Where the spec is: - for stdin (the only place it may come from).", valueName: "-"))
    var spec: String

    func validate() throws {
        // A spec holds secrets: never in a file name or an argument Slurm would show.
        guard spec == "-" else { throw ValidationError("--spec takes - (the spec comes on stdin)") }
    }

    func run() async throws {
        // Jobs started with --export=NONE have no PATH; helpers (pasta, mkfs.ext4, qemu) need one.
        if getenv("PATH") == nil { setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1) }
        let input: [UInt8]
        do {
            input = try FileSystem.readAll(fd: 0, path: "stdin")
        } catch {
            printError("\(NodeStep.messagePrefix)the spec could not be read from stdin: \(error)")
            throw ExitCode(NodeStep.infrastructureStatus)
        }
        ContainerBackend.warmUp()
        let task = Task {
            await NodeStep.run(
                input: input, version: ContreePipeline.version, openStore: { try storeOptions.open() },
                engine: { SandboxEngine.withAllBackends(store: $0) })
        }
        let signals = Termination.onSignal(repeatEnds: false) { task.cancel() }
        defer { signals.forEach { $0.cancel() } }
        let status = await task.value
        if status != 0 { throw ExitCode(status) }
    }
}
