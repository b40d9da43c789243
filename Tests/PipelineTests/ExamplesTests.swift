import ContreeTestSupport
import Foundation
import Glibc
import SystemSupport
import Testing

@testable import Pipeline

enum Repository {
    static var root: String { Paths.packageRoot }

    /// The examples' pipeline files: `examples/*.yaml` and `examples/*/pipeline.yaml`.
    static var examples: [String] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: root + "/examples")) ?? []).sorted()
        return names.filter { $0.hasSuffix(".yaml") }.map { root + "/examples/" + $0 }
            + names.map { root + "/examples/" + $0 + "/pipeline.yaml" }.filter {
                FileManager.default.fileExists(atPath: $0)
            }
    }

    /// Copies the examples directory into `workspace.project` (tests never change the repo).
    static func copyExamples(to workspace: Workspace) throws {
        for name in try FileManager.default.contentsOfDirectory(atPath: root + "/examples") {
            try FileManager.default.copyItem(atPath: root + "/examples/" + name, toPath: workspace.project + "/" + name)
        }
    }
}

@Suite("The examples")
struct ExamplesSchemaTests {
    @Test("every example parses and validates")
    func parse() throws {
        #expect(Repository.examples.count >= 4)
        for path in Repository.examples {
            _ = PipelinePlan(try PipelineParser.parse(file: path))
        }
    }
    // The JSON Schema's verdict on every example: SchemaAgreementTests.
}

@Suite("The examples run", .requiresRoot)
struct ExamplesRunTests {
    @Test("quickstart passes, exports its tarball, and reruns from the cache")
    func quickstart() async throws {
        let w = try Workspace()
        try Repository.copyExamples(to: w)
        let report = try await w.run(file: "quickstart.yaml")
        #expect(report.status == .passed, "\(report.nodes.map { ($0.node, $0.status, $0.reason ?? "") })")
        #expect(report.nodes.flatMap(\.artifacts).contains { $0.path == "/workspace/greet-1.0.0.tar.gz" })
        let again = try await w.run(file: "quickstart.yaml")
        #expect(again.hits.count == 4)
    }

    @Test("tree search keeps the best of four approaches and continues from it")
    func treeSearch() async throws {
        let w = try Workspace()
        try Repository.copyExamples(to: w)
        let report = try await w.run(file: "tree-search.yaml")
        #expect(report.status == .passed)
        #expect(report.node("approach")?.variants?.filter(\.kept).map(\.variant) == ["newton"])
        #expect(report.log("refine").contains("kept newton: 1.414213562373"))
    }

    @Test("monorepo: include, templates, anchors and a dynamic matrix; one package more is one instance more")
    func monorepo() async throws {
        let w = try Workspace()
        try Repository.copyExamples(to: w)
        let file = "monorepo/pipeline.yaml"
        let first = try await w.run(file: file)
        #expect(first.status == .passed, "\(first.nodes.map { ($0.node, $0.status, $0.reason ?? "") })")
        #expect(Set(first.ran) == ["discover", "tools", "test[pkg=cli]", "test[pkg=core]", "summary"])
        #expect(first.log("summary").contains("tested cli, core"))
        #expect(first.log("test[pkg=core]").contains("core: 2 tests, 0 failed"))
        #expect(first.node("test[pkg=core]")?.tests?.passed == 2, "reports: junit, from the template")
        #expect(
            Set(first.nodes.flatMap(\.artifacts).map(\.path)) == [
                "/workspace/build/test-results/cli.xml", "/workspace/build/test-results/core.xml",
            ])
        #expect(try await w.run(file: file).ran.isEmpty)

        // A new package: discover lists it, and only its instance (and the summary) run.
        try w.write("monorepo/packages/web/test.sh", "echo web ok\n")
        let grown = try await w.run(file: file)
        #expect(Set(grown.ran) == ["discover", "test[pkg=web]", "summary"])
        #expect(Set(grown.hits) == ["tools", "test[pkg=cli]", "test[pkg=core]"])
        // A change in one package reruns its instance alone.
        try w.write("monorepo/packages/cli/main.sh", "greet() { echo \"hello, $1\"; }\n")
        let edited = try await w.run(file: file)
        #expect(Set(edited.ran) == ["test[pkg=cli]"])
    }

    @Test("triage: a flaky step is found flaky from one snapshot; --verify names what is not reproducible")
    func triage() async throws {
        let w = try Workspace()
        try Repository.copyExamples(to: w)
        let first = try await w.run(file: "triage.yaml")
        #expect(first.status == .passed, "\(first.nodes.map { ($0.node, $0.status, $0.reason ?? "") })")
        let check = try #require(first.node("integration")?.flakeCheck)
        #expect(check.verdict == .flaky && check.passed == 2 && check.reruns == 3 && check.allowed)

        var options = RunOptions(keepGoing: true)
        options.verify = ["build", "stamp"]
        let verified = try await w.run(options: options, file: "triage.yaml")
        #expect(
            verified.status == .failed, "\(verified.nodes.map { ($0.node, $0.status, $0.cached, $0.reason ?? "") })")
        #expect(
            [.identical, .sameFiles].contains(verified.node("build")?.verification?.verdict), "\(verified.log("build"))"
        )
        #expect(
            verified.node("stamp")?.verification?.changes == ["M /workspace/out/build-id.txt"],
            "\(verified.log("stamp"))")
        #expect(verified.node("integration")?.cached == true && verified.node("integration")?.verification == nil)
    }

    @Test("fix-and-rerun fails, is fixed, and reruns only the failed step and what follows")
    func fixAndRerun() async throws {
        let w = try Workspace()
        try Repository.copyExamples(to: w)
        let failed = try await w.run(file: "fix-and-rerun.yaml")
        #expect(failed.status == .failed)
        #expect(failed.node("check")?.status == .failed)
        #expect(failed.log("check").contains("expected 5000, computed 5050"))
        try w.write("fix-and-rerun/expected.txt", "5050\n")
        let fixed = try await w.run(file: "fix-and-rerun.yaml")
        #expect(fixed.status == .passed)
        #expect(fixed.hits == ["fetch", "compute"])
        #expect(fixed.ran == ["check", "publish"])
    }

    @Test("the C project builds and tests in a matrix on debian:bookworm with gcc", .timeLimit(.minutes(10)))
    func cMatrix() async throws {
        let w = try Workspace()
        try Repository.copyExamples(to: w)
        let report = try await w.run(file: "c-matrix.yaml")
        #expect(report.status == .passed, "\(report.nodes.map { ($0.node, $0.status, $0.reason ?? "") })")
        #expect(report.nodes.filter { $0.step == "test" && $0.status == .passed }.count == 4)
        #expect(report.log("test[opt=-O2,std=c11]").contains("all tests passed"))
        let binaries = report.nodes.flatMap(\.artifacts).filter { $0.path == "/src/wordcount" }
        #expect(binaries.count == 4)
        #expect(binaries.allSatisfy { $0.size > 1000 })
        // The image with packages is one apt layer over debian:bookworm, not a second debootstrap.
        let debian = try #require(try w.store.findImage("debian:bookworm"))
        let tools = try #require(try w.store.findImage("debian:bookworm+gcc,libc6-dev,make"))
        #expect(tools.parent == debian.uuid && tools.layers.count == debian.layers.count + 1)
        #expect(tools.layers.starts(with: debian.layers))
    }
}

/// The slow path of the examples: a real project's CI on Debian images (debootstrap and three
/// package layers on first use), so one focused test covers it.
@Suite("The web-service example", .requiresRoot, .timeLimit(.minutes(10)))
struct WebServiceExampleTests {
    @Test(
        "egress to a package index on the host, the pip cache kept, Redis beside the tests, lint on a second image, a matrix packed with copy; a rerun is all hits; an edit reruns only what depends on it"
    )
    func webService() async throws {
        let w = try Workspace()
        try Repository.copyExamples(to: w)
        let project = w.project + "/web-service"
        let index = try ChildProcess.spawn(
            ["python3", "-u", project + "/serve_packages.py", "18631"], captureStdout: true)
        defer {
            kill(index.pid, SIGKILL)
            _ = try? ChildProcess.wait(index.pid, "serve_packages.py")
            close(index.stdout!)
            close(index.stderr)
        }
        var line = [UInt8](repeating: 0, count: 64)
        let n = read(index.stdout!, &line, line.count)
        #expect(n > 0 && String(decoding: line[0..<max(0, n)], as: UTF8.self).hasPrefix("serving 18631"))

        let first = try await w.run(file: "web-service/pipeline.yaml")
        #expect(first.status == .passed, "\(first.nodes.map { ($0.node, $0.status, $0.reason ?? "") })")
        #expect(first.ran.count == 7)
        #expect(first.log("deps").contains("http://10.0.2.2:18631/packages/kvclient-1.0.0-py3-none-any.whl"))
        #expect(first.log("integration").contains("Ran 2 tests") && first.log("integration").contains("\nOK"))
        #expect(first.log("integration").contains("service redis ready"))
        #expect(first.log("lint").contains("lint clean"))
        #expect(first.log("package").contains("./cli/counter-cli.pyz\n./service/counter-service.pyz"))
        #expect(first.nodes.flatMap(\.artifacts).contains { $0.path == "/release.tar.gz" })
        #expect(FileManager.default.fileExists(atPath: w.store.root + "/caches/pip/http"), "pip filled its cache")

        let second = try await w.run(file: "web-service/pipeline.yaml")
        #expect(second.hits.count == 7 && second.ran.isEmpty)

        // One source file edited: what reads it reruns, deps stays cached.
        let source = project + "/app/counter.py"
        try (try String(contentsOfFile: source, encoding: .utf8) + "# edited\n").write(
            toFile: source, atomically: true, encoding: .utf8)
        let third = try await w.run(file: "web-service/pipeline.yaml")
        #expect(third.status == .passed)
        #expect(third.hits == ["deps"])
        #expect(
            Set(third.ran) == ["unit", "lint", "integration", "build[flavor=service]", "build[flavor=cli]", "package"])

        // deps run again finds the wheel in the warm cache.
        var options = RunOptions()
        options.forceSteps = ["deps"]
        let forced = try await w.run(options: options, file: "web-service/pipeline.yaml")
        #expect(forced.log("deps").contains("Using cached"), "\(forced.log("deps"))")
    }
}
