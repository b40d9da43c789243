import ContreeTestSupport
import Foundation
import Glibc
import SystemSupport

/// A real Slurm cluster for one test (`scripts/slurm-cluster`): a controller, N nodes each with
/// its own store, a registry, all in network namespaces with no route from the host's. The
/// coordinator (`contree-pipeline run`) runs in the controller's namespace, as on a login node.
final class SlurmTestCluster: Sendable {
    let dir: String
    let nodes: Int
    /// `docker://10.201.0.2:5000/contree`
    let registry: String
    static let script = Paths.packageRoot + "/scripts/slurm-cluster"

    static var available: Bool {
        geteuid() == 0 && ChildProcess.lookup("slurmctld") != nil && ChildProcess.lookup("docker-registry") != nil
            && FileSystem.exists(Paths.cli)
    }

    init(nodes: Int = 3) throws {
        dir = "/tmp/contree-cluster-" + UUID().uuidString.prefix(8).lowercased()
        self.nodes = nodes
        let up = try ChildProcess.run([SlurmTestCluster.script, "up", dir, String(nodes)])
        guard up.succeeded else {
            _ = try? ChildProcess.run([SlurmTestCluster.script, "down", dir])
            throw SandboxError(.childProcess, "slurm-cluster up failed: \(up.stderrText)")
        }
        let env = try String(contentsOfFile: dir + "/env", encoding: .utf8)
        registry =
            env.split(separator: "\n").first { $0.hasPrefix("CONTREE_CLUSTER_REGISTRY=") }
            .map { String($0.dropFirst("CONTREE_CLUSTER_REGISTRY=".count)) } ?? ""
    }

    /// Stops the cluster and removes its namespaces and files.
    func down() {
        _ = try? ChildProcess.run([SlurmTestCluster.script, "down", dir])
        try? FileSystem.removeTree(dir)
    }

    var nodeNames: [String] { (1...nodes).map { "n\($0)" } }
    func nodeHome(_ node: String) -> String { dir + "/nodes/" + node }

    /// `argv` where the coordinator runs: the controller's namespace, the cluster's env loaded.
    func command(_ argv: [String], in directory: String = "/") -> [String] {
        [SlurmTestCluster.script, "exec", dir, "--", "sh", "-c", "cd \"$0\" && exec \"$@\"", directory] + argv
    }

    /// Runs contree-pipeline as a coordinator with its store at `home`.
    func cli(
        _ arguments: [String], home: String, in directory: String = "/", environment extra: [String] = []
    ) throws -> (status: Int32, out: String, err: String) {
        let result = try ChildProcess.run(
            command([Paths.cli] + arguments, in: directory), environment: environment(home: home) + extra)
        return (result.status, String(decoding: result.stdout, as: UTF8.self), result.stderrText)
    }

    func environment(home: String) -> [String] {
        ChildProcess.hostEnvironment().filter {
            !$0.hasPrefix("CONTREE_HOME=") && !$0.hasPrefix("GITHUB_ACTIONS=") && !$0.hasPrefix("GITLAB_CI=")
        } + ["CONTREE_HOME=" + home]
    }

    /// `run FILE --executor slurm --cache-to REGISTRY --allow-http --out OUT --json`, plus `extra`.
    func runPipeline(
        _ file: String, home: String, out: String, extra: [String] = [], environment: [String] = []
    ) throws -> (status: Int32, report: [String: Any]?, err: String) {
        let result = try cli(
            ["run", file, "--executor", "slurm", "--cache-to", registry, "--allow-http", "--out", out, "--json"]
                + extra,
            home: home, environment: environment)
        return (result.status, SlurmTestCluster.report(out), result.err)
    }

    /// The run's report.json, parsed.
    static func report(_ out: String) -> [String: Any]? {
        (try? JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/report.json"))))
            as? [String: Any]
    }

    /// A Slurm client command's output (squeue, scontrol) in the controller's namespace.
    func slurm(_ argv: [String]) throws -> String {
        let result = try ChildProcess.run(command(argv))
        return String(decoding: result.stdout, as: UTF8.self)
    }

    /// Every job the controller knows (finished ones stay listed: MinJobAge=600).
    func jobs() throws -> [(id: String, name: String, state: String)] {
        try slurm(["scontrol", "--oneliner", "show", "job"]).split(separator: "\n").compactMap { line in
            func field(_ name: String) -> String? {
                line.split(separator: " ").first { $0.hasPrefix(name + "=") }.map {
                    String($0.dropFirst(name.count + 1))
                }
            }
            guard let id = field("JobId") else { return nil }
            return (id, field("JobName") ?? "", field("JobState") ?? "")
        }
    }

    func cut(_ node: String) throws { _ = try ChildProcess.run([SlurmTestCluster.script, "cut", dir, node]) }
    func mend(_ node: String) throws { _ = try ChildProcess.run([SlurmTestCluster.script, "mend", dir, node]) }

    /// `fsck` of every node's store: (node, its last line) for those not consistent.
    func inconsistentStores() throws -> [(String, String)] {
        try nodeNames.filter { FileSystem.exists(nodeHome($0)) }.compactMap { node in
            let result = try ChildProcess.run(
                [Paths.cli, "fsck"], environment: environment(home: nodeHome(node)))
            let text = String(decoding: result.stdout + result.stderr, as: UTF8.self)
            return result.succeeded && text.contains("consistent") ? nil : (node, text)
        }
    }
}

/// A temporary project directory with files.
struct Project {
    let root: String

    init() throws {
        root = "/tmp/contree-cluster-project-" + UUID().uuidString.prefix(8).lowercased()
        try FileSystem.makeDirectories(root)
    }

    func write(_ name: String, _ text: String) throws {
        try text.write(toFile: root + "/" + name, atomically: true, encoding: .utf8)
    }

    func remove() { try? FileSystem.removeTree(root) }
}

extension [String: Any] {
    /// report.json's steps.
    var steps: [[String: Any]] { self["steps"] as? [[String: Any]] ?? [] }

    func step(_ node: String) -> [String: Any]? { steps.first { $0["node"] as? String == node } }
}
