import ContreeTestSupport
import Foundation
import ImageStore
import SystemSupport
import Testing

@testable import Pipeline

enum CLI {
    static var binary: String { Paths.cli }

    /// Runs the CLI in `directory` with the store at `home`; `stdin` is fed as input.
    static func run(
        _ arguments: [String], home: String, in directory: String, stdin: String? = nil
    ) async throws
        -> (status: Int32, out: String, err: String)
    {
        try await BlockingPool.shared.run { try blocking(arguments, home: home, in: directory, stdin: stdin) }
    }

    static func blocking(
        _ arguments: [String], home: String, in directory: String, stdin: String?
    ) throws
        -> (status: Int32, out: String, err: String)
    {
        var env = ChildProcess.hostEnvironment().filter {
            !$0.hasPrefix("CONTREE_HOME=") && !$0.hasPrefix("GITHUB_ACTIONS=") && !$0.hasPrefix("GITLAB_CI=")
        }
        env.append("CONTREE_HOME=\(home)")
        let input = "/tmp/contree-stdin-\(UUID().uuidString.prefix(8))"
        try (stdin ?? "").write(toFile: input, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: input) }
        let fd = open(input, O_RDONLY)
        defer { close(fd) }
        // The child changes directory itself: the test process's working directory is shared by
        // every test running at the same time (a child spawned elsewhere would inherit it).
        let result = try ChildProcess.run(
            ["sh", "-c", "cd \"$0\" && exec \"$@\"", directory, binary] + arguments, environment: env, stdinFD: fd)
        return (result.status, String(decoding: result.stdout, as: UTF8.self), result.stderrText)
    }
}

@Suite(
    "The pipeline commands", .requiresRoot, .serialized,
    .enabled(if: FileManager.default.fileExists(atPath: CLI.binary), "needs `swift build` first"))
struct PipelineCLITests {
    @Test("run exits 0 on success, 1 on a failed step, 2 on invalid input (naming file, line and column)")
    func exitStatus() async throws {
        let w = try Workspace()
        try w.write("ok.yaml", "steps:\n  - id: a\n    run: echo fine\n")
        try w.write("fails.yaml", "steps:\n  - id: a\n    run: exit 4\n")
        try w.write("bad.yaml", "steps:\n  - id: a\n    run: echo ${{ steps.nope.outcome }}\n")
        let ok = try await CLI.run(["run", "ok.yaml"], home: w.root + "/store", in: w.project)
        #expect(ok.status == 0, "\(ok.err)")
        #expect(ok.out.contains("PASSED"))
        let fails = try await CLI.run(["run", "fails.yaml"], home: w.root + "/store", in: w.project)
        #expect(fails.status == 1)
        #expect(fails.out.contains("exited with status 4"))
        let bad = try await CLI.run(["run", "bad.yaml"], home: w.root + "/store", in: w.project)
        #expect(bad.status == 2)
        #expect(bad.err.contains("bad.yaml:3:19: error: steps.nope names no step"))
        let validate = try await CLI.run(["validate", "bad.yaml"], home: w.root + "/store", in: w.project)
        #expect(validate.status == 2)
        // Reports land next to the pipeline file by default.
        let runs = try FileManager.default.contentsOfDirectory(atPath: w.project + "/.contree/runs")
        #expect(runs.count == 2)
    }

    @Test("runs, artifacts, explain and graph read past runs")
    func history() async throws {
        let w = try Workspace()
        try w.write(
            "p.yaml",
            "steps:\n  - id: make\n    run: echo data > /workspace/out.txt\n    artifacts: [out.txt]\n  - id: use\n    run: cat out.txt\n"
        )
        let home = w.root + "/store"
        #expect(try await CLI.run(["run", "p.yaml", "--out", w.root + "/r1"], home: home, in: w.project).status == 0)
        let runs = try await CLI.run(["runs", "--json"], home: home, in: w.project)
        let list = try JSONDecoder.iso.decode([PipelineRunSummary].self, from: Data(runs.out.utf8))
        #expect(list.count == 1 && list[0].status == "passed")
        let artifacts = try await CLI.run(["artifacts", list[0].id], home: home, in: w.project)
        #expect(artifacts.out.contains("/workspace/out.txt"))
        let copied = try await CLI.run(
            ["artifacts", String(list[0].id.prefix(12)), "--copy", w.root + "/copy"], home: home, in: w.project)
        #expect(copied.status == 0, "\(copied.err)")
        #expect(try String(contentsOfFile: w.root + "/copy/make/workspace/out.txt", encoding: .utf8) == "data\n")
        let hit = try await CLI.run(["explain", "p.yaml", "use"], home: home, in: w.project)
        #expect(hit.out.contains("HIT"))
        try w.write(
            "p.yaml",
            "env: {MODE: fast}\nsteps:\n  - id: make\n    run: echo data > /workspace/out.txt\n    artifacts: [out.txt]\n  - id: use\n    run: cat out.txt\n"
        )
        let miss = try await CLI.run(["explain", "p.yaml", "make"], home: home, in: w.project)
        #expect(miss.out.contains("MISS") && miss.out.contains("env: MODE added"), "\(miss.out)")
        let downstream = try await CLI.run(["explain", "p.yaml", "use"], home: home, in: w.project)
        #expect(downstream.out.contains("not cached"), "\(downstream.out)")
        let graph = try await CLI.run(["graph", "p.yaml", "--format", "dot"], home: home, in: w.project)
        #expect(graph.out.contains("digraph") && graph.out.contains("->"))
    }

    @Test("small things: ambiguous run ids, --jobs 0, JSON with plain slashes, counts in the singular, untag confirms")
    func smallThings() async throws {
        let w = try Workspace()
        let home = w.root + "/store"
        try w.write("ci.yaml", "steps:\n  - id: a\n    run: echo /x > /y\n")
        var ids: [String] = []
        for _ in 0..<2 {
            let run = try await CLI.run(["run", "ci.yaml", "--json"], home: home, in: w.project)
            #expect(run.status == 0 && !run.out.contains("\\/"), "JSON escapes no slash: \(run.out.prefix(300))")
            let report = try JSONSerialization.jsonObject(with: Data(run.out.utf8)) as? [String: Any]
            ids.append(try #require(report?["run_id"] as? String))
        }
        let common = String(zip(ids[0], ids[1]).prefix { $0 == $1 }.map(\.0))
        let ambiguous = try await CLI.run(["artifacts", common], home: home, in: w.project)
        #expect(ambiguous.status == 2 && ambiguous.err.contains("ambiguous"), "\(ambiguous.err)")
        #expect(try await CLI.run(["artifacts", ids[0]], home: home, in: w.project).status == 0)
        let jobs = try await CLI.run(["run", "ci.yaml", "--jobs", "0"], home: home, in: w.project)
        #expect(jobs.status == 2 && jobs.err.contains("--jobs must be at least 1"))
        let validated = try await CLI.run(["validate", "ci.yaml"], home: home, in: w.project)
        #expect(validated.out.contains("1 step, 1 node"), "\(validated.out)")
        let fsck = try await CLI.run(["fsck", "--quick"], home: home, in: w.project)
        #expect(fsck.out.contains("0 problems") && !fsck.out.contains(" 1 problems"), "\(fsck.out)")
        let image = try #require(
            (try JSONSerialization.jsonObject(
                with: Data(try await CLI.run(["image", "ls", "--json"], home: home, in: w.project).out.utf8))
                as? [[String: Any]])?.first?["uuid"] as? String)
        #expect(try await CLI.run(["image", "tag", image, "keep"], home: home, in: w.project).status == 0)
        let untag = try await CLI.run(["image", "untag", "keep"], home: home, in: w.project)
        #expect(untag.status == 0 && untag.out.contains("untagged keep (image \(image) stays)"), "\(untag.out)")
    }

    @Test("validate --print shows the resolved pipeline, itself a valid pipeline file")
    func validatePrint() async throws {
        let w = try Workspace()
        try w.write(
            "ci/common.yaml",
            "templates:\n  c: {timeout: 30s, env: {CC: gcc}}\nsteps:\n  - id: setup\n    run: echo setup\n")
        try w.write(
            "p.yaml",
            "include: [ci/common.yaml]\nx-more: &more {OPT: \"-O2\"}\nsteps:\n  - id: build\n    extends: c\n    env: *more\n    from: setup\n    run: echo build\n"
        )
        let home = w.root + "/store"
        let printed = try await CLI.run(["validate", "--print", "p.yaml"], home: home, in: w.project)
        #expect(printed.status == 0, "\(printed.err)")
        for gone in ["include", "extends", "templates", "x-more"] {
            #expect(!printed.out.contains(gone), "\(printed.out)")
        }
        for kept in ["- id: setup", "- id: build", "timeout: 30s", "CC: gcc", "OPT: \"-O2\""] {
            #expect(printed.out.contains(kept), "\(printed.out)")
        }
        try w.write("resolved.yaml", printed.out)
        let again = try await CLI.run(["validate", "resolved.yaml"], home: home, in: w.project)
        #expect(again.status == 0, "\(again.err)")
        #expect(again.out.contains("2 steps"))
    }

    @Test("shell opens in the failed step's snapshot, where it ran, as a new branch")
    func shell() async throws {
        let w = try Workspace()
        try w.write(
            "p.yaml",
            "defaults: {workdir: /job}\nsteps:\n  - id: setup\n    run: echo state > s\n  - id: broken\n    run: echo half > h; exit 1\n"
        )
        let home = w.root + "/store"
        #expect(try await CLI.run(["run", "p.yaml"], home: home, in: w.project).status == 1)
        let session = try await CLI.run(
            ["shell", "p.yaml"], home: home, in: w.project, stdin: "pwd; cat s h; echo $CONTREE_STEP; touch debugged\n")
        #expect(session.status == 0, "\(session.err)")
        #expect(session.out == "/job\nstate\nhalf\nbroken\n")
        #expect(session.err.contains("the session's changes are image"))
        let named = try await CLI.run(
            ["shell", "p.yaml", "setup"], home: home, in: w.project, stdin: "ls h 2>/dev/null || echo no-h\n")
        #expect(named.out == "no-h\n")
    }
}

@Suite(
    "What a run shows", .requiresRoot,
    .enabled(if: FileManager.default.fileExists(atPath: CLI.binary), "needs `swift build` first"))
struct RunOutputTests {
    static let yaml = "steps:\n  - id: hello\n    run: echo hello-from-step\n  - id: after\n    run: echo done\n"

    /// Runs `contree-pipeline run` with extra environment and stdout on `stdout` (a pty or a pipe).
    func spawn(_ w: Workspace, env extra: [String], stdout: Int32?) throws -> ChildProcess.Spawned {
        var env = ChildProcess.hostEnvironment().filter {
            !$0.hasPrefix("CONTREE_HOME=") && !$0.hasPrefix("GITHUB_ACTIONS=") && !$0.hasPrefix("GITLAB_CI=")
        }
        env += ["CONTREE_HOME=\(w.root)/store"] + extra
        return try ChildProcess.spawn(
            [CLI.binary, "run", w.project + "/p.yaml"], environment: env, captureStdout: stdout == nil, stdoutFD: stdout
        )
    }

    func readAll(_ fd: Int32) -> String {
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            out += buffer[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    @Test("inside GitHub Actions and GitLab CI, each step's log is a collapsible group")
    func ciGroups() async throws {
        let w = try Workspace()
        try w.write("p.yaml", RunOutputTests.yaml)
        let (github, gitlab) = try await BlockingPool.shared.run { () -> (String, String) in
            let a = try spawn(w, env: ["GITHUB_ACTIONS=true"], stdout: nil)
            let githubOut = readAll(a.stdout!)
            _ = try ChildProcess.wait(a.pid, "run")
            let b = try spawn(w, env: ["GITLAB_CI=true"], stdout: nil)
            let gitlabOut = readAll(b.stdout!)
            _ = try ChildProcess.wait(b.pid, "run")
            return (githubOut, gitlabOut)
        }
        #expect(github.contains("::group::") && github.contains("hello-from-step") && github.contains("::endgroup::"))
        #expect(gitlab.contains("section_start:") && gitlab.contains("section_end:"))
    }

    @Test("on a terminal, a live view redraws each step's state, then the summary")
    func terminal() async throws {
        let w = try Workspace()
        try w.write("p.yaml", RunOutputTests.yaml)
        let text = try await BlockingPool.shared.run { () -> String in
            var primary: Int32 = -1
            var secondary: Int32 = -1
            guard openpty(&primary, &secondary, nil, nil, nil) == 0 else { return "" }
            let child = try spawn(w, env: [], stdout: secondary)
            close(secondary)
            let out = readAll(primary)  // EIO once the CLI exits
            _ = try ChildProcess.wait(child.pid, "run")
            close(primary)
            return out
        }
        #expect(text.contains("\u{1B}[J"), "the view redraws in place")
        #expect(text.contains("hello") && text.contains("PASSED"))
    }

    @Test("SIGINT cancels the running sandbox, writes the reports and exits 130")
    func interrupt() async throws {
        let w = try Workspace()
        // A duration no other test sleeps: its process says the sandbox runs.
        try w.write("p.yaml", "steps:\n  - id: long\n    run: sleep 61.25\n")
        let status = try await BlockingPool.shared.run { () -> Int32 in
            let child = try spawn(w, env: [], stdout: nil)
            let deadline = Date().addingTimeInterval(300)
            while try processCount(commandLine: ["sleep", "61.25"]) == 0 && Date() < deadline { usleep(20_000) }
            #expect(try processCount(commandLine: ["sleep", "61.25"]) == 1, "the step's sandbox started")
            kill(child.pid, SIGINT)
            _ = readAll(child.stdout!)
            return try ChildProcess.wait(child.pid, "run")
        }
        #expect(status == 130)
        let runs = try FileManager.default.contentsOfDirectory(atPath: w.project + "/.contree/runs")
        let report = try JSONDecoder.iso.decode(
            RunReport.self,
            from: Data(contentsOf: URL(fileURLWithPath: w.project + "/.contree/runs/\(runs[0])/report.json")))
        #expect(report.status == .cancelled)
        #expect(try Store(root: w.root + "/store").checkConsistency(verifyContent: false).isConsistent)
    }
}
