import Foundation
import Testing

@testable import Pipeline

/// A pipeline file must not cost gigabytes to plan: combinations and nodes are counted before
/// anything is expanded.
@Suite("Plan size limits")
struct PlanSizeTests {
    static func matrix(axes: Int, values: Int) -> String {
        let list = (0..<values).map(String.init).joined(separator: ", ")
        let lines = (0..<axes).map { "      a\($0): [\(list)]" }.joined(separator: "\n")
        return "steps:\n  - id: big\n    matrix:\n\(lines)\n    run: echo\n"
    }

    @Test("a 7-axis matrix of 10 values is refused at its line, at once", arguments: [6, 7, 12])
    func hugeMatrix(_ axes: Int) {
        let found = problems(Self.matrix(axes: axes, values: 10))
        #expect(found.count == 1)
        #expect(found.first?.location?.line == 4)
        #expect(found.first?.message.contains("more than 256") == true, "\(found)")
    }

    @Test("matrices that multiply along from past 10,000 nodes are refused")
    func multipliedNodes() {
        let values = (0..<30).map(String.init).joined(separator: ", ")
        let yaml = """
            steps:
              - id: one
                matrix: {a: [\(values)]}
                run: echo
              - id: two
                matrix: {b: [\(values)]}
                run: echo
              - id: three
                matrix: {c: [\(values)]}
                run: echo
            """
        let found = problems(yaml)
        #expect(found.first?.message.contains("more than 10000 nodes at step three") == true, "\(found)")
        #expect(problems(yaml.components(separatedBy: "  - id: three")[0]).isEmpty)
    }

    @Test("a matrix within the limit still plans")
    func withinLimit() throws {
        let plan = PipelinePlan(try parse(Self.matrix(axes: 2, values: 16)))
        #expect(plan.nodes.count == 256)
    }
}
