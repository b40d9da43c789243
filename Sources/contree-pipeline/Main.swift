import ArgumentParser
import Glibc
import Sandbox

/// contree-pipeline: sandboxes that branch like Git, and CI pipelines on top of them.
@main
struct ContreePipeline: AsyncParsableCommand {
    /// What `--version` prints.
    static let version = "0.11.0"

    static let configuration = CommandConfiguration(
        commandName: "contree-pipeline",
        abstract: "Run code in sandboxes that branch like Git.",
        discussion: """
            Every command runs in an isolated sandbox over an immutable image; its changes become \
            a new image whose parent is the one it started from. The store lives in \
            $CONTREE_HOME (default ~/.local/share/contree).
            """,
        version: version,
        subcommands: [
            RunCommand.self, PlanCommand.self, ValidateCommand.self, GraphCommand.self, ExplainCommand.self,
            ShellCommand.self,
            RunsCommand.self, DiffRunsCommand.self,
            ArtifactsCommand.self, ExecCommand.self, SandboxCommand.self, ImageCommand.self, InspectCommand.self,
            CacheCommand.self, GarbageCollectCommand.self, CheckCommand.self, ServeCommand.self, StepCommand.self,
        ])

    /// As ArgumentParser's, except that a command line it cannot use exits 2 (invalid input,
    /// as every command documents) rather than 64.
    static func main() async {
        // Commands that start sandboxes begin the cgroup grace period (see `Cgroup.prime`)
        // before the command line is even parsed, so that more of it overlaps with their work.
        if let name = CommandLine.arguments.dropFirst().first, ["exec", "run", "shell", "step"].contains(name) {
            ContainerBackend.warmUp()
        }
        do {
            var command = try parseAsRoot()
            if var asynchronous = command as? any AsyncParsableCommand {
                try await asynchronous.run()
            } else {
                try command.run()
            }
        } catch {
            if exitCode(for: error) == .validationFailure {
                printError(fullMessage(for: error))
                Glibc.exit(2)
            }
            exit(withError: error)
        }
    }
}
