import Foundation
import ImageStore
import Pipeline
import Sandbox
import SystemSupport
import Testing

@testable import Cluster

/// How a step's settings become srun arguments (no cluster needed): resources, the timeout's
/// outer bound, VM steps, the lost nodes, the command's words; never a secret.
@Suite("srun arguments from a step's settings")
struct SrunArgumentsTests {
    static let root = "/tmp/contree-srun-args-" + UUID().uuidString.prefix(8).lowercased()

    func executor(
        partition: String? = nil, arguments: [String] = [], command: String = "/usr/bin/contree-pipeline"
    )
        throws -> SlurmStepExecutor
    {
        try SlurmStepExecutor(
            SlurmConfiguration(
                registry: "docker://127.0.0.1:5000/ci", allowHTTP: true, partition: partition, arguments: arguments,
                command: command, version: "1"),
            store: try Store(root: SrunArgumentsTests.root))
    }

    /// A request as a node would decode it, with these settings.
    func request(_ settings: String) throws -> StepRequest {
        let json = """
            {"version": "1", "node": "build", "key": "sha256:00", "parent": "docker://127.0.0.1:5000/ci@sha256:00",
             "input_files": [], "command": ["sh", "-c", "true"], "environment": {}, "secrets": {"TOKEN": "never-in-argv"},
             "workdir": "/", "network": "loopback", "output_path": "/.contree/output", "caches": [],
             "registry": "docker://127.0.0.1:5000/ci", "allow_http": true, \(settings)}
            """
        return try StepFrame.decoder.decode(StepSpec.self, from: Data(json.utf8)).request(parent: "p", inputRoot: nil)
    }

    @Test("defaults: one CPU, no memory, no time bound, nothing of this machine's environment")
    func defaults() throws {
        let argv = try executor().arguments(
            try request(#""limits": {}, "isolation": "container", "attempts": 1"#), job: "contree-x-1", excluding: [])
        #expect(
            argv == [
                "srun", "--job-name=contree-x-1", "--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--export=NONE",
                "--chdir=/", "--kill-on-bad-exit=1", "/usr/bin/contree-pipeline", "step", "--spec", "-",
            ])
    }

    @Test("limits, timeout × attempts, isolation: vm, lost nodes, partition, extra arguments, sudo -n")
    func mapped() throws {
        let argv = try executor(
            partition: "ci", arguments: ["--qos=fast"], command: "sudo -n /usr/local/bin/contree-pipeline"
        ).arguments(
            try request(
                #""limits": {"cpus": 1.5, "memory_bytes": 1073741825}, "timeout": 90, "isolation": "vm", "attempts": 3"#
            ),
            job: "contree-x-2", excluding: ["n1", "n3"])
        #expect(argv.contains("--cpus-per-task=2"))
        #expect(argv.contains("--mem=1537M"))  // 1025 MiB and 512 for the step command
        // 90 s × 3 attempts = 4.5 minutes, rounded up, plus 5: Slurm's limit is an outer bound.
        #expect(argv.contains("--time=10"))
        #expect(argv.contains("--constraint=contree-vm"))
        #expect(argv.contains("--exclude=n1,n3"))
        #expect(argv.contains("--partition=ci"))
        #expect(
            Array(argv.suffix(7)) == [
                "--qos=fast", "sudo", "-n", "/usr/local/bin/contree-pipeline", "step", "--spec", "-",
            ])
        #expect(!argv.joined(separator: " ").contains("never-in-argv"))
    }
}
