import ContreeTestSupport
import Foundation
import Testing

@testable import Pipeline

enum Repository {
    static var root: String { Paths.packageRoot }

    static var examples: [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: root + "/examples")) ?? [])
            .filter { $0.hasSuffix(".yaml") }.sorted().map { root + "/examples/" + $0 }
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
