import ContreeTestSupport
import Foundation
import SystemSupport
import Testing

@testable import Pipeline

@Suite(
    "Targets and plan", .requiresRoot, .serialized,
    .enabled(if: FileManager.default.fileExists(atPath: CLI.binary), "needs `swift build` first"))
struct PlanCommandTests {
    static let yaml = """
        steps:
          - id: setup
            run: echo setup > /workspace/s
          - id: build
            matrix: {os: [debian, alpine]}
            run: sleep 0.2; echo ${{ matrix.os }} > /workspace/b
          - id: lint
            from: setup
            run: echo lint
          - id: pack
            image: busybox
            copy: [{from: build, path: /workspace/b, to: "/dist/${{ matrix.os }}"}]
            run: cat /dist/*
        """

    @Test("run FILE TARGET runs only the target and what it depends on; a node may be a target")
    func targets() async throws {
        let w = try Workspace()
        try w.write("pipeline.yaml", PlanCommandTests.yaml)
        let home = w.root + "/home"
        let one = try await CLI.run(["run", "pipeline.yaml", "build[os=alpine]"], home: home, in: w.project)
        #expect(one.status == 0, "\(one.err)")
        let ran = one.out + one.err
        #expect(ran.contains("build[os=alpine]") && ran.contains("setup"), "\(ran)")
        #expect(!ran.contains("build[os=debian]") && !ran.contains("lint") && !ran.contains("pack"))
        let packed = try await CLI.run(["run", "pipeline.yaml", "pack"], home: home, in: w.project)
        #expect(packed.status == 0)
        let all = packed.out + packed.err
        #expect(all.contains("build[os=debian]") && !all.contains("lint"), "copy pulls its sources in")
        let bad = try await CLI.run(["run", "pipeline.yaml", "biuld"], home: home, in: w.project)
        #expect(bad.status == 2 && bad.err.contains("did you mean 'build'"), "\(bad.err)")
    }

    @Test("plan starts no sandbox: 3 with what would run, why, and its last cost; 0 when all hit; 2 when invalid")
    func plan() async throws {
        let w = try Workspace()
        try w.write("pipeline.yaml", PlanCommandTests.yaml)
        let home = w.root + "/home"
        let cold = try await CLI.run(["plan", "pipeline.yaml"], home: home, in: w.project)
        #expect(cold.status == 3, "\(cold.err)")
        #expect(cold.out.contains("5 would run") || cold.out.contains("0 hit, 5 would run"), "\(cold.out)")
        #expect(try await CLI.run(["run", "pipeline.yaml"], home: home, in: w.project).status == 0)
        let warm = try await CLI.run(["plan", "pipeline.yaml"], home: home, in: w.project)
        #expect(warm.status == 0 && warm.out.contains("5 hit, 0 would run"), "\(warm.out)\(warm.err)")
        try w.write("pipeline.yaml", PlanCommandTests.yaml.replacingOccurrences(of: "sleep 0.2;", with: "sleep 0.21;"))
        let changed = try await CLI.run(["plan", "pipeline.yaml", "--json"], home: home, in: w.project)
        #expect(changed.status == 3)
        let summary = try JSONSerialization.jsonObject(with: Data(changed.out.utf8)) as? [String: Any]
        let nodes = summary?["nodes"] as? [[String: Any]] ?? []
        let debian = nodes.first { $0["node"] as? String == "build[os=debian]" }
        #expect(debian?["state"] as? String == "miss")
        #expect(debian?["reason"] as? String == "command: the script or shell changed")
        #expect((debian?["last_wall_seconds"] as? Double ?? 0) >= 0.2, "the last run's time of the step")
        #expect(debian?["last_peak_memory_bytes"] != nil)
        #expect(nodes.first { $0["node"] as? String == "lint" }?["state"] as? String == "hit")
        let images = try await CLI.run(["image", "ls"], home: home, in: w.project)
        let invalid = try await CLI.run(["plan", "missing.yaml"], home: home, in: w.project)
        #expect(invalid.status == 2)
        #expect(try await CLI.run(["image", "ls"], home: home, in: w.project).out == images.out, "nothing ran")
    }

    @Test("network: egress without pasta installed is invalid input naming the line; nothing runs")
    func egressWithoutPasta() async throws {
        let w = try Workspace()
        try w.write(
            "pipeline.yaml",
            """
            steps:
              - id: fetch
                network: {mode: egress}
                run: echo should-not-run
            """)
        let environment =
            ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") && !$0.hasPrefix("PATH=") }
            + ["CONTREE_HOME=\(w.root)/home", "PATH=/nonexistent"]
        for command in ["validate", "run"] {
            let result = try ChildProcess.run(
                [CLI.binary, command, w.project + "/pipeline.yaml"], environment: environment)
            #expect(result.status == 2, "\(command): \(result.stderrText)")
            #expect(result.stderrText.contains("pipeline.yaml:3:14"), "\(result.stderrText)")
            #expect(result.stderrText.contains("apt-get install passt"))
        }
    }
}
