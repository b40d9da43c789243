import ContreeTestSupport
import Foundation
import Glibc
import SystemSupport
import Testing

/// Twelve builds of a prepared checkpoint, each writing an artifact: enough to land on every node.
private let fanOut = """
    name: fan
    image: busybox
    steps:
      - id: prepare
        inputs: [data.txt]
        run: |
          cp data.txt /base.txt
          echo "lines=$(wc -l < data.txt)" >> $CONTREE_OUTPUT
      - id: build
        from: prepare
        matrix:
          n: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        run: |
          sleep 0.5
          echo "build ${{ matrix.n }} of $(cat /base.txt), ${{ steps.prepare.outputs.lines }} line" > out-${{ matrix.n }}.txt
        artifacts: [out-*.txt]
    """

@Suite(
    "Steps on a real Slurm cluster (--executor slurm)", .serialized,
    .enabled(if: SlurmTestCluster.available, "needs root, Slurm and docker-registry (scripts/setup) and `swift build`"))
struct SlurmExecutorTests {
    @Test(
        "the quickstart and a 12-way matrix run on 3 nodes with the artifacts and report of a local run; a rerun submits no job"
    )
    func matrixOnEveryNode() throws {
        let cluster = try SlurmTestCluster()
        defer { cluster.down() }
        let project = try Project()
        defer { project.remove() }
        try project.write("data.txt", "the data\n")
        try project.write("fan.yaml", fanOut)
        let home = project.root + "/coordinator"

        let quickstart = try cluster.runPipeline(
            Paths.packageRoot + "/examples/quickstart.yaml", home: home, out: project.root + "/quickstart")
        #expect(quickstart.status == 0, "\(quickstart.err)")
        #expect(quickstart.report?.steps.count == 4)
        #expect(quickstart.report?.steps.allSatisfy { $0["executor"] as? String == "slurm" } == true)
        #expect(FileSystem.exists(project.root + "/quickstart/artifacts/package"))

        let run = try cluster.runPipeline(project.root + "/fan.yaml", home: home, out: project.root + "/cluster")
        #expect(run.status == 0, "\(run.err)")
        let report = try #require(run.report)
        #expect(report.steps.count == 13)
        let placed = report.steps.compactMap { $0["executor_node"] as? String }
        #expect(Set(placed) == Set(cluster.nodeNames), "steps ran on \(placed)")
        #expect(report.steps.allSatisfy { ($0["slurm_job_id"] as? String)?.isEmpty == false })
        #expect(report.step("prepare")?["outputs"] as? [String: String] == ["lines": "1"])

        // The same pipeline on this machine alone: the same artifacts, byte for byte.
        let local = try cluster.cli(
            ["run", project.root + "/fan.yaml", "--out", project.root + "/local"], home: project.root + "/local-store")
        #expect(local.status == 0, "\(local.err)")
        for n in 1...12 {
            let name = "/artifacts/build_n=\(n)_/workspace/out-\(n).txt"
            let remote = try? String(contentsOfFile: project.root + "/cluster" + name, encoding: .utf8)
            #expect(remote == "build \(n) of the data, 1 line\n", "\(name)")
            #expect(remote == (try? String(contentsOfFile: project.root + "/local" + name, encoding: .utf8)))
        }

        // A rerun: every step a hit, no job submitted.
        let jobsBefore = try cluster.jobs().count
        let rerun = try cluster.runPipeline(project.root + "/fan.yaml", home: home, out: project.root + "/rerun")
        #expect(rerun.status == 0, "\(rerun.err)")
        #expect(rerun.report?.steps.allSatisfy { $0["cached"] as? Bool == true } == true)
        #expect(rerun.report?.steps.allSatisfy { $0["executor"] == nil } == true)
        #expect(try cluster.jobs().count == jobsBefore)
        #expect(try cluster.inconsistentStores().isEmpty)
    }

    @Test(
        "a failing step: failure() and always() steps run, dependents skip, exit 1; shell opens the failed snapshot here"
    )
    func failingStep() throws {
        let cluster = try SlurmTestCluster()
        defer { cluster.down() }
        let project = try Project()
        defer { project.remove() }
        try project.write(
            "fail.yaml",
            """
            image: busybox
            defaults: {workdir: /job}
            steps:
              - id: setup
                run: echo state > s
              - id: broken
                from: setup
                run: echo half > h; exit 3
              - id: after
                from: broken
                run: echo never
              - id: report-failure
                needs: [broken]
                if: failure()
                run: echo reporting
              - id: cleanup
                needs: [broken]
                if: always()
                run: echo cleaning
            """)
        let home = project.root + "/coordinator"
        let run = try cluster.runPipeline(project.root + "/fail.yaml", home: home, out: project.root + "/out")
        #expect(run.status == 1, "\(run.err)")
        let report = try #require(run.report)
        #expect(report.step("broken")?["status"] as? String == "failed")
        #expect(report.step("broken")?["exit_code"] as? Int == 3)
        #expect(report.step("broken")?["executor"] as? String == "slurm")
        #expect(report.step("after")?["status"] as? String == "skipped")
        #expect(report.step("report-failure")?["status"] as? String == "passed")
        #expect(report.step("cleanup")?["status"] as? String == "passed")
        let log = try String(contentsOfFile: project.root + "/out/logs/cleanup.log", encoding: .utf8)
        #expect(log.contains("cleaning"))

        // The failed snapshot came back through the registry: shell opens it on this machine.
        let input = project.root + "/stdin"
        try "pwd; cat s h; echo $CONTREE_STEP\n".write(toFile: input, atomically: true, encoding: .utf8)
        let fd = open(input, O_RDONLY)
        defer { close(fd) }
        let shell = try ChildProcess.run(
            [Paths.cli, "shell", project.root + "/fail.yaml", "--run", report["run_id"] as? String ?? ""],
            environment: cluster.environment(home: home), stdinFD: fd)
        #expect(shell.status == 0, "\(shell.stderrText)")
        #expect(String(decoding: shell.stdout, as: UTF8.self) == "/job\nstate\nhalf\nbroken\n")

        // A step that always runs (cache: false) gets its own snapshot back each time, not the
        // entry the registry holds for its key from the first run.
        try project.write(
            "always.yaml",
            "image: busybox\nsteps:\n  - id: stamp\n    cache: false\n    run: cat /proc/sys/kernel/random/uuid > /stamp\n    artifacts: [/stamp]\n"
        )
        var stamps: [String] = []
        for round in 1...2 {
            let out = project.root + "/always-\(round)"
            let run = try cluster.runPipeline(project.root + "/always.yaml", home: home, out: out)
            #expect(run.status == 0, "\(run.err)")
            stamps.append((try? String(contentsOfFile: out + "/artifacts/stamp/stamp", encoding: .utf8)) ?? "")
        }
        #expect(stamps.count == 2 && !stamps[0].isEmpty && stamps[0] != stamps[1], "\(stamps)")
    }

    @Test("Ctrl-C cancels every job within 1 s; every node's store stays consistent and no sandbox is left")
    func interrupt() async throws {
        let cluster = try SlurmTestCluster()
        defer { cluster.down() }
        let project = try Project()
        defer { project.remove() }
        try project.write(
            "long.yaml",
            """
            image: busybox
            steps:
              - id: work
                matrix:
                  n: [1, 2, 3, 4, 5, 6]
                run: echo running; sleep 60
            """)
        let spawned = try ChildProcess.spawn(
            cluster.command(
                [
                    Paths.cli, "run", project.root + "/long.yaml", "--executor", "slurm", "--cache-to",
                    cluster.registry,
                    "--allow-http", "--out", project.root + "/out",
                ]),
            environment: cluster.environment(home: project.root + "/coordinator") + ["CONTREE_TRACE=1"],
            captureStdout: true,
            ownProcessGroup: true)
        defer {
            close(spawned.stdout!)
            close(spawned.stderr)
        }
        // Every step's command running on the cluster (its output in its log here): a Ctrl-C
        // in the middle of long steps. (A node still importing the step's snapshot stops at the
        // import's next checkpoint, and Slurm shows the job COMPLETING until it has.)
        var running: [(id: String, name: String, state: String)] = []
        for _ in 0..<300 {
            let logs = (1...6).map {
                (try? String(contentsOfFile: project.root + "/out/logs/work_n=\($0)_.log", encoding: .utf8)) ?? ""
            }
            running = try cluster.jobs().filter { $0.state == "RUNNING" }
            if running.count == 6 && logs.allSatisfy({ $0.contains("running") }) { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(running.count == 6)
        // The jobs' states, sampled by a loop inside the cluster's network (no process start per
        // sample from here), each line stamped when its answer came: an upper bound.
        let samples = project.root + "/samples"
        let watcher = try ChildProcess.spawn(
            cluster.command([
                "sh", "-c",
                "while :; do s=$(scontrol --oneliner show job | grep -o 'JobId=[0-9]*\\|JobState=[A-Z_]*' | paste -sd' '); echo \"$(date +%s.%N) $s\" >> \(samples); done",
            ]), captureStdout: false, ownProcessGroup: true)
        defer {
            kill(-watcher.pid, SIGKILL)
            _ = try? ChildProcess.wait(watcher.pid, "watcher")
            close(watcher.stderr)
        }
        try await Task.sleep(for: .milliseconds(200))
        // As a terminal's Ctrl-C does: SIGINT to the whole process group (srun included, were
        // it in the coordinator's group; a signalled srun kills its step at once).
        let sent = Date().timeIntervalSince1970
        #expect(kill(-spawned.pid, SIGINT) == 0)
        var cancelledAt: [String: Double] = [:]
        while cancelledAt.count < running.count, Date().timeIntervalSince1970 - sent < 10 {
            try await Task.sleep(for: .milliseconds(100))
            let lines = ((try? String(contentsOfFile: samples, encoding: .utf8)) ?? "").split(separator: "\n")
            for line in lines {
                let words = line.split(separator: " ")
                guard let stamp = words.first.flatMap({ Double($0) }), stamp >= sent else { continue }
                for (i, word) in words.enumerated() where word.hasPrefix("JobId=") && i + 1 < words.count {
                    let id = String(word.dropFirst("JobId=".count))
                    if words[i + 1] == "JobState=CANCELLED", cancelledAt[id] == nil { cancelledAt[id] = stamp - sent }
                }
            }
            cancelledAt = cancelledAt.filter { id, _ in running.contains { $0.id == id } }
        }
        #expect(
            cancelledAt.count == running.count, "jobs not cancelled: \(running.filter { cancelledAt[$0.id] == nil })")
        let cancelled = cancelledAt.values.max() ?? .infinity
        let status = try await BlockingPool.shared.run { try ChildProcess.wait(spawned.pid, "run") }
        let said = String(decoding: (try? FileSystem.readAll(fd: spawned.stderr, path: "stderr")) ?? [], as: UTF8.self)
        #expect(
            cancelled < 1,
            "the jobs were cancelled \(cancelledAt) s after the interrupt: \(said.split(separator: "\n").filter { $0.contains("slurm:") })"
        )
        #expect(
            status == 130,
            "\(said) \(SlurmTestCluster.report(project.root + "/out")?.steps.map { $0["reason"] as? String ?? "" } ?? [])"
        )
        // The nodes' step commands clean up and end (KillWait is 2 s: they must not need it).
        for _ in 0..<100 {
            if try processes(containing: "step\u{0}--spec").isEmpty { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(try processes(containing: "step\u{0}--spec").isEmpty)
        #expect(try processes(containing: "contree-init").isEmpty)
        #expect(try cluster.inconsistentStores().isEmpty)
    }

    @Test(
        "a node cut off: its step runs again elsewhere, the run passes, and the duplicate finishing later spoils nothing"
    )
    func nodeLost() async throws {
        let cluster = try SlurmTestCluster()
        defer { cluster.down() }
        let project = try Project()
        defer { project.remove() }
        try project.write(
            "cut.yaml",
            """
            image: busybox
            steps:
              - id: work
                matrix:
                  n: [1, 2, 3]
                run: |
                  sleep 8
                  echo "work ${{ matrix.n }}" > /result
                artifacts: [/result]
            """)
        let home = project.root + "/coordinator"
        let out = project.root + "/out"
        let run = Task {
            try await BlockingPool.shared.run { () throws -> (Int32, String) in
                let result = try cluster.runPipeline(project.root + "/cut.yaml", home: home, out: out)
                return (result.status, result.err)
            }
        }
        var running: [(id: String, name: String, state: String)] = []
        for _ in 0..<300 {
            running = try cluster.jobs().filter { $0.state == "RUNNING" }
            if running.count == 3 { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(running.count == 3)
        let node = try #require(
            try cluster.slurm(["squeue", "--noheader", "--format=%N", "--jobs=" + running[0].id])
                .trimmingCharacters(in: .whitespacesAndNewlines).nilIfEmpty)
        try cluster.cut(node)
        // The run goes on without the node: Slurm gives up on it (SlurmdTimeout=10: ~27 s) and
        // the step is dispatched again elsewhere. Mended only after the run has passed: the
        // duplicate on the cut-off node, its command long done, has been waiting to push its
        // snapshot, and pushes it now, after the run (write-once: it finds the entry there).
        let (status, err) = try await run.value
        try cluster.mend(node)
        #expect(status == 0, "\(err)")
        let report = try #require(SlurmTestCluster.report(out))
        let moved = report.steps.filter { step in
            let log = (try? String(contentsOfFile: out + "/" + (step["log"] as? String ?? ""), encoding: .utf8)) ?? ""
            return log.contains("node \(node) was lost")
        }
        #expect(moved.count == 1)
        #expect(moved.allSatisfy { $0["executor_node"] as? String != node && $0["status"] as? String == "passed" })
        for n in 1...3 {
            #expect(
                (try? String(contentsOfFile: out + "/artifacts/work_n=\(n)_/result", encoding: .utf8)) == "work \(n)\n")
        }

        // The duplicate on the mended node finishes (or gives up) by itself.
        for _ in 0..<600 {
            if try processes(containing: "step\u{0}--spec").isEmpty { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(try processes(containing: "step\u{0}--spec").isEmpty)
        // What the registry holds still serves a fresh machine: every step a hit, the same results.
        let fresh = try cluster.cli(
            [
                "run", project.root + "/cut.yaml", "--cache-from", cluster.registry, "--allow-http",
                "--fail-on-cache-miss", "--out", project.root + "/fresh",
            ], home: project.root + "/fresh-store")
        #expect(fresh.status == 0, "\(fresh.err)")
        for n in 1...3 {
            #expect(
                (try? String(contentsOfFile: project.root + "/fresh/artifacts/work_n=\(n)_/result", encoding: .utf8))
                    == "work \(n)\n")
        }
        #expect(try cluster.inconsistentStores().isEmpty)
    }

    @Test("secrets travel on stdin: in no scontrol show job output, no log, no report")
    func secrets() throws {
        let cluster = try SlurmTestCluster()
        defer { cluster.down() }
        let project = try Project()
        defer { project.remove() }
        let secret = "s3cr3t-" + UUID().uuidString.prefix(8)
        try project.write(
            "secret.yaml",
            """
            image: busybox
            secrets:
              TOKEN: {env: CLUSTER_TOKEN}
            steps:
              - id: use
                secrets: [TOKEN]
                run: |
                  echo "the token is $TOKEN"
                  echo "$TOKEN" >&2
            """)
        let run = try cluster.runPipeline(
            project.root + "/secret.yaml", home: project.root + "/coordinator", out: project.root + "/out",
            environment: ["CLUSTER_TOKEN=" + secret])
        #expect(run.status == 0, "\(run.err)")
        #expect(run.report?.step("use")?["executor"] as? String == "slurm")
        let log = try String(contentsOfFile: project.root + "/out/logs/use.log", encoding: .utf8)
        #expect(log.contains("the token is ***"))
        let jobs = try cluster.slurm(["scontrol", "--details", "show", "job"])
        #expect(jobs.contains("JobName=contree-"), "\(jobs)")
        #expect(!jobs.contains(secret))
        #expect(!run.err.contains(secret))
        // Every file the run, the cluster's daemons and the registry wrote (the nodes' stores aside:
        // the step's own snapshot is the step's business).
        for root in [project.root + "/out", cluster.dir + "/log", cluster.dir + "/state"] {
            for file in try files(under: root) {
                let bytes = (try? FileSystem.readFile(file)) ?? []
                #expect(!String(decoding: bytes, as: UTF8.self).contains(secret), "\(file) holds the secret")
            }
        }
    }

    @Test("bad set-up: no Slurm, no --cache-to, a partition or registry that is not there, a node of another version")
    func badSetup() throws {
        let cluster = try SlurmTestCluster()
        defer { cluster.down() }
        let project = try Project()
        defer { project.remove() }
        try project.write(
            "p.yaml",
            "image: busybox\nsteps:\n  - id: a\n    run: echo a > /a\n  - id: b\n    from: a\n    run: cat /a\n")
        let file = project.root + "/p.yaml"
        let home = project.root + "/coordinator"
        let jobsBefore = try cluster.jobs().count

        let noSlurm = try ChildProcess.run(
            cluster.command([
                "/usr/bin/env", "PATH=/nonexistent", Paths.cli, "run", file, "--executor", "slurm", "--cache-to",
                cluster.registry, "--allow-http",
            ]), environment: cluster.environment(home: home))
        #expect(noSlurm.status == 2)
        #expect(noSlurm.stderrText.contains("is not on PATH"), "\(noSlurm.stderrText)")

        let noRegistry = try cluster.cli(["run", file, "--executor", "slurm"], home: home)
        #expect(noRegistry.status == 2)
        #expect(noRegistry.err.contains("add --cache-to"), "\(noRegistry.err)")

        let partition = try cluster.cli(
            [
                "run", file, "--executor", "slurm", "--cache-to", cluster.registry, "--allow-http", "--slurm-partition",
                "gpu",
            ],
            home: home)
        #expect(partition.status == 2)
        #expect(partition.err.contains("no partition gpu (it has: ci)"), "\(partition.err)")

        let unreachable = try cluster.cli(
            ["run", file, "--executor", "slurm", "--cache-to", "docker://127.0.0.1:9/contree", "--allow-http"],
            home: home)
        #expect(unreachable.status == 75)
        #expect(unreachable.err.contains("cannot be reached"), "\(unreachable.err)")
        #expect(try cluster.jobs().count == jobsBefore, "nothing was submitted")

        // Every node "of another version": the spec's version rewritten on its way in.
        let wrapper = project.root + "/other-version"
        try project.write(
            "other-version",
            "#!/bin/sh\n/bin/sed 's/\"version\":\"[^\"]*\"/\"version\":\"0.0.1-other\"/' | exec \(Paths.cli) \"$@\"\n")
        chmod(wrapper, 0o755)
        let mismatch = try cluster.runPipeline(
            file, home: home, out: project.root + "/mismatch", extra: ["--slurm-command", wrapper])
        #expect(mismatch.status == 75, "\(mismatch.err)")
        let a = mismatch.report?.step("a")
        #expect(a?["status"] as? String == "failed")
        #expect(a?["infrastructure_failure"] as? Bool == true)
        #expect(
            (a?["reason"] as? String)?.contains("the coordinator 0.0.1-other: install the same version on every node")
                == true, "\(a ?? [:])")
        #expect(mismatch.report?.step("b")?["status"] as? String == "skipped")
        #expect(try cluster.inconsistentStores().isEmpty)
        // Nothing half-run: no entry for the step in the registry (a rerun would still run it).
        let rerun = try cluster.cli(
            [
                "run", file, "--cache-from", cluster.registry, "--allow-http", "--fail-on-cache-miss", "--out",
                project.root + "/rerun",
            ],
            home: project.root + "/fresh-store")
        #expect(rerun.status == 1)
    }
}

/// Pids whose command line contains `text` (arguments separated by NUL).
func processes(containing text: String) throws -> [String] {
    try FileSystem.list("/proc").filter { $0.allSatisfy(\.isNumber) }.filter { pid in
        let cmdline = (try? FileSystem.readFile("/proc/\(pid)/cmdline")) ?? []
        return String(decoding: cmdline, as: UTF8.self).contains(text)
    }
}

/// Every regular file beneath `root`.
func files(under root: String) throws -> [String] {
    guard FileSystem.exists(root) else { return [] }
    var found: [String] = []
    for name in try FileSystem.list(root) {
        let path = root + "/" + name
        guard let status = try FileSystem.status(path) else { continue }
        if status.isDirectory { found += try files(under: path) } else { found.append(path) }
    }
    return found
}

extension String {
    var nilIfEmpty: String? { isEmpty ? nil : self }
}
