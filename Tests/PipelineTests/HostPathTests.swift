import Foundation
import Glibc
import Sandbox
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
        try FileManager.default.createDirectory(atPath: w.root + "/layout/blobs/sha256", withIntermediateDirectories: true)
        let outside = try await refusal(w, "image: oci:../layout\nsteps: [{id: a, run: 'true'}]")
        #expect(outside.contains("pipeline.yaml:1:") && outside.contains("outside"), "\(outside)")
        try FileManager.default.createDirectory(atPath: w.project + "/layout/blobs/sha256", withIntermediateDirectories: true)
        #expect(symlink("/etc/shadow", w.project + "/layout/blobs/sha256/" + String(repeating: "a", count: 64)) == 0)
        let planted = try await refusal(w, "image: oci:layout\nsteps: [{id: a, run: 'true'}]")
        #expect(planted.contains("symlink"), "\(planted)")
    }
}
