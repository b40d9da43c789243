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

    @Test("caches: defined at the top, used by steps; unknown names and bad paths are named")
    func caches() throws {
        let definition = try parse(
            """
            caches:
              pip: {path: /root/.cache/pip}
              npm: {path: /root/.npm}
            steps:
              - {id: a, run: "true", caches: [pip, {name: npm, sharing: shared}]}
            """)
        #expect(definition.caches.map(\.name.value) == ["pip", "npm"])
        #expect(definition.steps[0].caches.map(\.sharing) == [.locked, .shared])
        shape.expectProblem(
            """
            caches:
              pip: {path: /root/.cache/pip}
            steps:
              - id: a
                run: "true"
                caches: [pip, pipp]
            """, at: 6, 19, mentions: ["cache 'pipp'", "not defined under `caches:`", "did you mean 'pip'"])
        shape.expectProblem(
            """
            caches:
              pip: {path: relative}
            steps:
              - {id: a, run: "true"}
            """, at: 2, 15, mentions: ["absolute directory"])
        shape.expectProblem(
            """
            caches:
              pip: {path: /p}
            steps:
              - {id: a, run: "true", caches: [{name: pip, sharing: sometimes}]}
            """, at: 4, 56, mentions: ["sharing must be one of locked, shared, private"])
    }

    @Test("image with from, copies from missing steps or axes, relative paths: named by line and column")
    func imageAndCopy() throws {
        let definition = try parse(
            """
            steps:
              - {id: build, matrix: {os: [a, b]}, run: "true"}
              - id: pack
                image: debian:bookworm+zip
                copy: [{from: build, path: /out, to: "/dist/${{ matrix.os }}/"}, {from: "build[os=a]", path: /x, to: /y}]
                run: "true"
            """)
        #expect(definition.steps[1].image?.value == "debian:bookworm+zip")
        #expect(definition.steps[1].copies.map(\.step) == ["build", "build"])
        #expect(definition.steps[1].copies[1].instance == ["os": "a"])
        let plan = PipelinePlan(definition)
        #expect(plan.node("pack")?.copies.map(\.sources) == [["build[os=a]", "build[os=b]"], ["build[os=a]"]])
        #expect(plan.node("pack")?.parent == .image)
        shape.expectProblem(
            """
            steps:
              - {id: a, run: "true"}
              - {id: b, run: "true", from: a, image: busybox}
            """, at: 3, 42, mentions: ["both `image:` and `from:`"])
        shape.expectProblem(
            """
            steps:
              - {id: build, run: "true"}
              - {id: b, run: "true", copy: [{from: biuld, path: /o, to: /p}]}
            """, at: 3, 40, mentions: ["copies from 'biuld'", "did you mean 'build'"])
        shape.expectProblem(
            """
            steps:
              - {id: build, run: "true"}
              - {id: b, run: "true", copy: [{from: "build[os=x]", path: /o, to: /p}]}
            """, at: 3, 40, mentions: ["no matrix axis 'os'"])
        shape.expectProblem(
            """
            steps:
              - {id: build, run: "true"}
              - {id: b, run: "true", copy: [{from: build, path: o, to: /p}]}
            """, at: 3, 53, mentions: ["must be absolute"])
    }

    @Test("services: defined at the top with image or from, run, ready and env; unknown names are named")
    func services() throws {
        let definition = try parse(
            """
            services:
              db:
                image: "debian:bookworm+redis-server"
                run: redis-server --port 6379
                ready: {run: redis-cli ping, timeout: 30s}
                env: {A: "1"}
            steps:
              - {id: a, run: "true", services: [db]}
            """)
        let db = try #require(definition.services.first)
        #expect(db.image?.value == "debian:bookworm+redis-server" && db.ready == "redis-cli ping")
        #expect(db.readyTimeout == 30 && db.env.map(\.name) == ["A"])
        #expect(definition.steps[0].services.map(\.value) == ["db"])
        shape.expectProblem(
            """
            services:
              db: {run: x}
            steps:
              - {id: a, run: "true", services: [bd]}
            """, at: 4, 37, mentions: ["service 'bd'", "did you mean 'db'"])
        shape.expectProblem(
            """
            services:
              db: {run: x, from: nowhere}
            steps:
              - {id: a, run: "true"}
            """, at: 2, 22, mentions: ["starts from 'nowhere'"])
        shape.expectProblem(
            """
            services:
              db: {image: busybox}
            steps:
              - {id: a, run: "true"}
            """, at: 2, 7, mentions: ["needs `run:`"])
    }
}
