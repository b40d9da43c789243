import Testing

@testable import Pipeline
@testable import Sandbox

/// The pipeline keys a real project's CI needs: egress, caches, services, per-step images, copy.
@Suite("Pipeline files: egress, caches, services, images and copy")
struct RealProjectParserTests {
    let shape = ParserTests()

    @Test("network: egress, or a mapping with host-loopback; the mode is in the settings the key reads")
    func network() throws {
        let definition = try parse(
            """
            defaults: {network: egress}
            steps:
              - {id: a, run: "true"}
              - {id: b, run: "true", network: {mode: egress, host-loopback: true}}
              - {id: c, run: "true", network: {mode: loopback}}
            """)
        #expect(definition.defaults.network == .egress)
        #expect(definition.steps.map(\.settings.network) == [nil, .egressHostLoopback, .loopback])
        shape.expectProblem(
            """
            steps:
              - id: a
                run: "true"
                network: {mode: loopback, host-loopback: true}
            """, at: 4, 46, mentions: ["host-loopback needs mode: egress"])
        shape.expectProblem(
            """
            steps:
              - id: a
                run: "true"
                network: egres
            """, at: 4, 14, mentions: ["network must be one of", "did you mean 'egress'"])
        shape.expectProblem(
            """
            steps:
              - id: a
                run: "true"
                network: {host-loopback: true}
            """, at: 4, 14, mentions: ["network needs a mode"])
    }
}
