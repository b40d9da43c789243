import Foundation
import SystemSupport
import Testing

@testable import Pipeline

/// `schemas/pipeline.schema.json` (what editors and CI linters check) and the binary judge every
/// file alike: a corpus of files each of them must refuse, files each must accept, the examples.
@Suite(
    "The JSON Schema agrees with the binary",
    .enabled(if: FileManager.default.fileExists(atPath: CLI.binary), "needs `swift build` first"))
struct SchemaAgreementTests {
    static let fixtures = Repository.root + "/Tests/Fixtures/pipelines"

    static func files(_ folder: String) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: folder).filter { $0.hasSuffix(".yaml") }.sorted().map {
            folder + "/" + $0
        }
    }

    /// The schema's verdict on each file (Debian's python3-jsonschema, from scripts/setup).
    static func schemaVerdicts(_ files: [String]) throws -> [String: String] {
        let result = try ChildProcess.run(
            [
                "/usr/bin/python3", Repository.root + "/Tests/Fixtures/schema-check.py",
                Repository.root + "/schemas/pipeline.schema.json",
            ] + files)
        #expect(
            result.status == 0,
            "the schema check did not run (scripts/setup installs python3-jsonschema): \(result.stderrText)")
        var verdicts: [String: String] = [:]
        for line in String(decoding: result.stdout, as: UTF8.self).split(separator: "\n") {
            let fields = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
            if fields.count >= 2 { verdicts[fields[0]] = fields[1] + (fields.count > 2 ? ": " + fields[2] : "") }
        }
        return verdicts
    }

    @Test("a file either refuses is refused by both; a file either accepts is accepted by both")
    func agreement() async throws {
        let invalid = try Self.files(Self.fixtures + "/invalid")
        let valid = try Self.files(Self.fixtures + "/valid") + (try Self.files(Repository.root + "/examples"))
        #expect(invalid.count >= 20 && valid.count >= 8)
        let verdicts = try Self.schemaVerdicts(invalid + valid)
        let w = try Workspace()
        for file in invalid + valid {
            let binary = try await CLI.run(["validate", file], home: w.root + "/store", in: w.project)
            let expected = invalid.contains(file) ? "invalid" : "valid"
            let schema = verdicts[file] ?? "no verdict"
            #expect(schema.hasPrefix(expected), "schema on \(file): \(schema)")
            #expect(binary.status == (expected == "valid" ? 0 : 2), "binary on \(file): \(binary.err)")
            if expected == "invalid" {
                #expect(
                    binary.err.contains(#/\.yaml:\d+:\d+: error: /#), "the binary names file:line:col: \(binary.err)")
            }
        }
    }

    @Test("validate checks the host too, running nothing: inputs that match nothing, secrets without a source")
    func preflight() async throws {
        let w = try Workspace()
        try w.write(
            "ci.yaml",
            """
            secrets:
              KEY: {file: missing.pem}
              TOKEN: {env: CONTREE_TEST_UNSET_VARIABLE}
            steps:
              - id: build
                inputs: [src/*.c]
                secrets: [KEY, TOKEN]
                run: echo
            """)
        let result = try await CLI.run(["validate", "ci.yaml"], home: w.root + "/unused-store", in: w.project)
        #expect(result.status == 2)
        #expect(result.err.contains("ci.yaml:2:3: error: secret KEY"), "\(result.err)")
        #expect(
            result.err.contains(
                "ci.yaml:3:3: error: secret TOKEN: the host variable CONTREE_TEST_UNSET_VARIABLE is not set"))
        #expect(result.err.contains("ci.yaml:6:14: error: input 'src/*.c' matches no file"))
        #expect(!FileManager.default.fileExists(atPath: w.root + "/unused-store"), "validate opened no store")
    }
}
