// contree-bench slurm: a 64-step fan-out of 0.5 s steps (after one 0.5 s step) on a real 3-node
// Slurm cluster (scripts/slurm-cluster), against the same pipeline run locally with the same
// parallelism and against bare `srun sleep 0.5` calls with the same parallelism, all in one
// run: wall time against the critical-path ideal, each step's time above its own 0.5 s, and a
// fully cached rerun (no job).
import ContreeTestSupport
import Foundation
import Glibc
import SystemSupport

struct SlurmBench {
    let home: String
    let rounds: Int
    let cli: String
    var work: String { home + "/slurm-bench" }
    var clusterDir: String { work + "/cluster" }
    static let width = 64
    static let stepSeconds = 0.5

    func pipeline(salt: String, width: Int = SlurmBench.width) -> String {
        var yaml = "name: bench-slurm\nimage: busybox\nenv: {SALT: \(salt)}\nsteps:\n"
        yaml += "  - id: base\n    run: sleep \(SlurmBench.stepSeconds); echo base > /base\n"
        for i in 1...width {
            yaml += "  - id: s\(i)\n    from: base\n    run: sleep \(SlurmBench.stepSeconds); echo \(i) > /f\n"
        }
        return yaml
    }

    /// `argv` in the cluster's network, its env loaded (where a coordinator runs).
    func inCluster(_ argv: [String]) -> [String] {
        [Paths.packageRoot + "/scripts/slurm-cluster", "exec", clusterDir, "--"] + argv
    }

    func environment(home: String) -> [String] {
        ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=" + home]
    }

    /// Runs the pipeline; returns its wall time, the steps' times above their own, and hits.
    func run(
        _ file: String, home: String, extra: [String]
    ) throws -> (
        seconds: Double, overheads: [Double], hits: Int, steps: Int
    ) {
        let start = now()
        let result = try ChildProcess.run(
            inCluster([cli, "run", file, "--json", "--out", work + "/out", "--junit", work + "/junit.xml"] + extra),
            environment: environment(home: home))
        let seconds = now() - start
        guard result.succeeded else {
            throw SandboxError(.childProcess, "the bench pipeline failed: \(result.stderrText)")
        }
        let report = try JSONSerialization.jsonObject(with: Data(result.stdout)) as? [String: Any]
        let steps = report?["steps"] as? [[String: Any]] ?? []
        // Each step's time, to the millisecond, from the JUnit report (report.json has whole seconds).
        let junit = try String(contentsOfFile: work + "/junit.xml", encoding: .utf8)
        let overheads =
            steps.contains { $0["cached"] as? Bool != true }
            ? junit.split(separator: "\n").filter { $0.contains("<testcase ") }.compactMap { line -> Double? in
                guard let range = line.range(of: "time=\"") else { return nil }
                return Double(line[range.upperBound...].prefix { $0 != "\"" }).map { $0 - SlurmBench.stepSeconds }
            } : []
        return (seconds, overheads, steps.filter { $0["cached"] as? Bool == true }.count, steps.count)
    }

    func jobCount() throws -> Int {
        let out = try ChildProcess.run(inCluster(["scontrol", "--oneliner", "show", "job"]))
        return String(decoding: out.stdout, as: UTF8.self).split(separator: "\n").filter { $0.hasPrefix("JobId=") }
            .count
    }

    func measure() async throws {
        guard geteuid() == 0 else { throw SandboxError(.unsupported, "the benchmark needs root") }
        try? FileSystem.removeTree(work)
        try FileSystem.makeDirectories(work)
        let up = try ChildProcess.run([Paths.packageRoot + "/scripts/slurm-cluster", "up", clusterDir, "3"])
        guard up.succeeded else { throw SandboxError(.childProcess, "slurm-cluster up failed: \(up.stderrText)") }
        defer { _ = try? ChildProcess.run([Paths.packageRoot + "/scripts/slurm-cluster", "down", clusterDir]) }
        let env = try String(contentsOfFile: clusterDir + "/env", encoding: .utf8)
        let registry =
            env.split(separator: "\n").first { $0.hasPrefix("CONTREE_CLUSTER_REGISTRY=") }
            .map { String($0.dropFirst("CONTREE_CLUSTER_REGISTRY=".count)) } ?? ""
        let cpus = 3 * Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        let waves = (SlurmBench.width + cpus - 1) / cpus
        let ideal = Double(1 + waves) * SlurmBench.stepSeconds
        let slurm = ["--executor", "slurm", "--cache-to", registry, "--allow-http"]

        var cluster: [Double] = []
        var clusterOverheads: [Double] = []
        var cached: [Double] = []
        var cachedJobs: [Int] = []
        var local: [Double] = []
        var localOverheads: [Double] = []
        var bare: [Double] = []
        var bareOverheads: [Double] = []
        var alone: [Double] = []
        for round in 1...rounds {
            let file = work + "/p\(round).yaml"
            try pipeline(salt: UUID().uuidString).write(toFile: file, atomically: true, encoding: .utf8)
            let cold = try run(file, home: work + "/coordinator", extra: slurm)
            cluster.append(cold.seconds)
            clusterOverheads += cold.overheads
            // One step alone after its parent: the dispatch with nothing beside it.
            let single = work + "/one\(round).yaml"
            try pipeline(salt: UUID().uuidString, width: 1).write(toFile: single, atomically: true, encoding: .utf8)
            alone += try run(single, home: work + "/coordinator", extra: slurm).overheads.suffix(1)
            let before = try jobCount()
            let rerun = try run(file, home: work + "/coordinator", extra: slurm)
            guard rerun.hits == rerun.steps else {
                throw SandboxError(.childProcess, "the rerun was not all hits (\(rerun.hits) of \(rerun.steps))")
            }
            cached.append(rerun.seconds)
            cachedJobs.append(try jobCount() - before)
            // The same pipeline here alone, as many at once as the cluster has CPUs.
            let here = try run(file, home: work + "/local-\(round)", extra: ["--jobs", String(cpus)])
            local.append(here.seconds)
            localOverheads += here.overheads
            // Slurm alone: one srun per step, as many at once, no contree.
            let srun = "srun --export=NONE --chdir=/ /bin/sleep \(SlurmBench.stepSeconds)"
            let start = now()
            let all = try ChildProcess.run(
                inCluster([
                    "sh", "-c", "\(srun) && seq \(SlurmBench.width) | xargs -P \(cpus) -I{} \(srun)",
                ]))
            guard all.succeeded else { throw SandboxError(.childProcess, "bare srun failed: \(all.stderrText)") }
            bare.append(now() - start)
            for _ in 0..<3 {
                let one = now()
                _ = try ChildProcess.run(inCluster(["sh", "-c", srun]))
                bareOverheads.append(now() - one - SlurmBench.stepSeconds)
            }
            print(
                "round \(round): cluster \(String(format: "%.2f", cold.seconds)) s, cached \(ms(rerun.seconds)), local \(String(format: "%.2f", here.seconds)) s, srun \(String(format: "%.2f", bare.last!)) s"
            )
        }
        print(
            "\n\(SlurmBench.width)-step fan-out of \(SlurmBench.stepSeconds) s steps after one such step; 3 nodes, \(cpus) CPUs; ideal (critical path over \(cpus) CPUs): \(String(format: "%.1f", ideal)) s; medians of \(rounds) rounds"
        )
        print(pad("", 38) + pad("wall", 10) + pad("/ ideal", 9) + "each step above its 0.5 s (median, p90)")
        func row(_ name: String, _ walls: [Double], _ overheads: [Double]) {
            print(
                pad(name, 38) + pad(String(format: "%.2f s", median(walls)), 10)
                    + pad(String(format: "%.2fx", median(walls) / ideal), 9)
                    + "\(ms(median(overheads))), \(ms(percentile(overheads, 0.9)))")
        }
        row("contree run --executor slurm", cluster, clusterOverheads)
        row("contree run, local (--jobs \(cpus))", local, localOverheads)
        row("srun sleep (xargs -P \(cpus)), no contree", bare, bareOverheads)
        print(
            "one step alone after its parent, --executor slurm: \(ms(median(alone))) above its \(SlurmBench.stepSeconds) s; bare srun one at a time: \(ms(median(bareOverheads)))"
        )
        print(
            String(
                format: "cluster / local wall: %.2f; contree's dispatch above bare srun, per step: %@",
                median(cluster) / median(local), ms(median(clusterOverheads) - median(bareOverheads))))
        print(
            "fully cached rerun (\(SlurmBench.width + 1) steps, --executor slurm): \(ms(median(cached))), jobs submitted: \(cachedJobs.max() ?? 0)"
        )
    }
}
