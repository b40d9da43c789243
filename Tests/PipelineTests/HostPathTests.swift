import ContreeTestSupport
import Foundation
import Glibc
import ImageStore
import Testing

@testable import Pipeline

/// A pipeline comes from a repository; what it names on the host stays inside its directory.
@Suite("Host paths a pipeline names stay beneath its directory", .requiresRoot)
struct HostPathTests {
    /// Runs `yaml` and returns the validation error it must fail with.
    func refusal(_ w: Workspace, _ yaml: String, options: RunOptions = RunOptions()) async throws -> String {
        let error = await #expect(throws: PipelineValidationError.self) { _ = try await w.run(yaml, options: options) }
        return error?.description ?? ""
    }

    @Test(
        "an input that is a symlink out of the directory is refused, naming the input's line",
        arguments: ["/proc/self/environ", "/etc/shadow", "../outside.txt"])
    func inputSymlinkOut(_ target: String) async throws {
        let w = try Workspace()
        try w.write("../outside.txt", "host file")
        #expect(symlink(target, w.project + "/leak") == 0)
        let message = try await refusal(
            w,
            """
            steps:
              - id: read
                inputs: [leak]
                run: cat leak
            """)
        #expect(message.contains("pipeline.yaml:3:"), "\(message)")
        #expect(message.contains("leads outside") && message.contains("--allow-host-paths") == true, "\(message)")
        #expect(try StepCache(store: w.store).runs(limit: 10).isEmpty)
    }

    @Test("a symlink to a file inside the directory, or a directory of inputs, is fine")
    func inputSymlinkInside() async throws {
        let w = try Workspace()
        try w.write("src/real.txt", "inside\n")
        #expect(symlink("real.txt", w.project + "/src/alias.txt") == 0)
        let report = try await w.run(
            """
            steps:
              - id: read
                inputs: [src]
                run: cat src/alias.txt src/real.txt
            """)
        #expect(report.status == .passed)
        #expect(report.log("read").contains("inside\ninside"))
    }

    @Test("a secret file outside the directory needs --allow-host-paths")
    func secretOutside() async throws {
        let w = try Workspace()
        try w.write("../token", "s3cr3t\n")
        let yaml = """
            secrets:
              TOKEN: {file: ../token}
            steps:
              - id: use
                secrets: [TOKEN]
                run: test "$TOKEN" = s3cr3t
            """
        let message = try await refusal(w, yaml)
        #expect(message.contains("secret TOKEN") && message.contains("outside"), "\(message)")
        #expect(try await w.run(yaml, options: RunOptions(allowHostPaths: true)).status == .passed)
        try w.write("token", "s3cr3t\n")
        let inside = yaml.replacingOccurrences(of: "../token", with: "token")
        #expect(try await w.run(inside).status == .passed)
        // A secret file that is a symlink to /proc is refused even inside the directory.
        #expect(symlink("/proc/self/environ", w.project + "/environ") == 0)
        let viaProc = yaml.replacingOccurrences(of: "../token", with: "environ")
        #expect(try await refusal(w, viaProc).contains("leads outside"))
    }

    @Test("a local image path outside the directory, or a layout with a symlink in it, is refused")
    func localImageOutside() async throws {
        let w = try Workspace()
        try FileManager.default.createDirectory(
            atPath: w.root + "/layout/blobs/sha256", withIntermediateDirectories: true)
        let outside = try await refusal(w, "image: oci:../layout\nsteps: [{id: a, run: 'true'}]")
        #expect(outside.contains("pipeline.yaml:1:") && outside.contains("outside"), "\(outside)")
        try FileManager.default.createDirectory(
            atPath: w.project + "/layout/blobs/sha256", withIntermediateDirectories: true)
        #expect(symlink("/etc/shadow", w.project + "/layout/blobs/sha256/" + String(repeating: "a", count: 64)) == 0)
        let planted = try await refusal(w, "image: oci:layout\nsteps: [{id: a, run: 'true'}]")
        #expect(planted.contains("symlink"), "\(planted)")
    }
}

@Suite("A run's reports and artifacts stay where they belong", .requiresRoot)
struct RunFilesTests {
    static let yaml = "steps:\n  - id: make\n    run: echo data > /workspace/out.txt\n    artifacts: [out.txt]\n"

    @Test("artifacts --copy refuses a manifest entry outside artifacts/, a planted symlink and a changed file")
    func tamperedManifest() async throws {
        let w = try Workspace()
        try w.write("p.yaml", Self.yaml)
        let home = w.root + "/store"
        let out = w.root + "/r1"
        #expect(try await CLI.run(["run", "p.yaml", "--out", out], home: home, in: w.project).status == 0)
        let manifestPath = out + "/artifacts/manifest.json"
        let original = try String(contentsOfFile: manifestPath, encoding: .utf8)
        let recorded = try #require(original.range(of: "artifacts/make/workspace/out.txt")).isEmpty == false
        #expect(recorded)
        try "keep me\n".write(toFile: w.root + "/victim", atomically: true, encoding: .utf8)
        func copy(_ manifest: String, into target: String) async throws -> (status: Int32, out: String, err: String) {
            try manifest.write(toFile: manifestPath, atomically: true, encoding: .utf8)
            let run = try #require(try StepCache(store: Store(root: home)).runs(limit: 1).first)
            return try await CLI.run(["artifacts", run.id, "--copy", target], home: home, in: w.project)
        }
        // An entry that climbs out of artifacts/ (and a target that would land outside the copy).
        let climbing = try await copy(
            original.replacingOccurrences(of: "artifacts/make/workspace/out.txt", with: "artifacts/../../victim"),
            into: w.root + "/copy1")
        #expect(climbing.status != 0 && climbing.err.contains("not a path beneath artifacts/"), "\(climbing.err)")
        #expect(try String(contentsOfFile: w.root + "/victim", encoding: .utf8) == "keep me\n")
        // A symlink planted where an artifact was.
        try FileManager.default.removeItem(atPath: out + "/artifacts/make/workspace/out.txt")
        #expect(symlink("/etc/shadow", out + "/artifacts/make/workspace/out.txt") == 0)
        let planted = try await copy(original, into: w.root + "/copy2")
        #expect(planted.status != 0 && planted.err.contains("leads outside"), "\(planted.err)")
        #expect(!FileManager.default.fileExists(atPath: w.root + "/copy2/make/workspace/out.txt"))
        // A file changed after the run.
        try FileManager.default.removeItem(atPath: out + "/artifacts/make/workspace/out.txt")
        try "other\n".write(toFile: out + "/artifacts/make/workspace/out.txt", atomically: true, encoding: .utf8)
        let changed = try await copy(original, into: w.root + "/copy3")
        #expect(changed.status != 0 && changed.err.contains("changed after the run"), "\(changed.err)")
    }

    @Test("a .contree symlink in the pipeline's directory does not redirect the reports")
    func contreeSymlink() async throws {
        let w = try Workspace()
        try FileManager.default.createDirectory(atPath: w.root + "/elsewhere", withIntermediateDirectories: true)
        #expect(symlink(w.root + "/elsewhere", w.project + "/.contree") == 0)
        let error = await #expect(throws: PipelineValidationError.self) {
            let plan = PipelinePlan(
                try PipelineParser.parse(Self.yaml, file: w.project + "/p.yaml", directory: w.project))
            _ = try await PipelineRunner(plan: plan, engine: w.engine).run()
        }
        #expect(error?.description.contains("symlink") == true, "\(String(describing: error))")
        #expect(try FileManager.default.contentsOfDirectory(atPath: w.root + "/elsewhere").isEmpty)
    }
}
