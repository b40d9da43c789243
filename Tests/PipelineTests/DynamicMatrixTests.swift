import ContreeTestSupport
import Foundation
import Testing

@testable import Pipeline

/// `matrix: {pkg: "${{ fromJSON(steps.discover.outputs.pkgs) }}"}`: planned as one node, expanded
/// by the scheduler when `discover` ends.
@Suite("Dynamic matrices", .timeLimit(.minutes(5)))
struct DynamicMatrixTests {
    static let yaml = """
        steps:
          - id: discover
            run: echo 'pkgs=["a","b"]' >> $CONTREE_OUTPUT
          - id: test
            matrix:
              pkg: ${{ fromJSON(steps.discover.outputs.pkgs) }}
              opt: ["-O0"]
            run: echo ${{ matrix.pkg }} ${{ matrix.opt }}
          - id: after
            run: echo after ${{ matrix.pkg }}
          - id: report
            needs: [test]
            from: discover
            run: echo ${{ join(fromJSON(steps.discover.outputs.pkgs), ' ') }}
        """

    @Test("the plan holds one dynamic node, and what comes from it waits for it")
    func planned() throws {
        let plan = try ScheduleTests.plan(Self.yaml)
        #expect(plan.nodes.map(\.id) == ["discover", "test[*]", "after", "report"])
        #expect(plan.node("test[*]")?.kind == .dynamic)
        #expect(plan.node("after")?.parent == .node("test[*]"))
        #expect(plan.node("report")?.dependencies == ["discover", "test[*]"])
        #expect(plan.isDynamic)
        #expect(GraphRenderer.render(plan, as: .mermaid).contains("[/\"test[*] dynamic\"/]"))
        #expect(GraphRenderer.render(plan, as: .dot).contains("test[*] dynamic\", style=\"rounded,dashed\""))
    }

    @Test("it expands when discover ends: each instance and what follows it, keyed by their values")
    func expands() async throws {
        let executor = FakeExecutor(outputs: ["discover": ["pkgs": #"["a", "b", "a", 3]"#]])
        let (results, recorded) = try await ScheduleTests.run(Self.yaml, executor)
        #expect(
            Set(results.keys) == [
                "discover", "test[pkg=a,opt=-O0]", "test[pkg=b,opt=-O0]", "test[pkg=3,opt=-O0]",
                "after[pkg=a,opt=-O0]", "after[pkg=b,opt=-O0]", "after[pkg=3,opt=-O0]", "report",
            ])
        #expect(results.values.allSatisfy { $0.status == .passed })
        #expect(Set(recorded) == Set(results.keys), "the dynamic node itself is not a result")
        // `report` waited for every instance.
        let reportAt = try #require(executor.started.firstIndex(of: "report"))
        for id in ["test[pkg=a,opt=-O0]", "test[pkg=b,opt=-O0]", "test[pkg=3,opt=-O0]"] {
            #expect(try #require(executor.started.firstIndex(of: id)) < reportAt)
        }
        #expect(results["after[pkg=b,opt=-O0]"]?.parentImage == "image-of-test[pkg=b,opt=-O0]")
    }

    @Test("below a matrix, each branch expands from what its own instance wrote")
    func perBranch() async throws {
        let yaml = """
            steps:
              - id: discover
                matrix: {os: [debian, alpine]}
                run: echo 'pkgs=["x"]' >> $CONTREE_OUTPUT
              - id: test
                matrix:
                  pkg: ${{ fromJSON(steps.discover.outputs.pkgs) }}
                run: echo ${{ matrix.os }} ${{ matrix.pkg }}
            """
        let plan = try ScheduleTests.plan(yaml)
        #expect(plan.nodes.map(\.id).filter { $0.hasPrefix("test") } == ["test[os=debian,*]", "test[os=alpine,*]"])
        let executor = FakeExecutor(outputs: ["discover": ["pkgs": #"["x", "y"]"#]])
        let (results, _) = try await ScheduleTests.run(yaml, executor)
        #expect(
            Set(results.keys.filter { $0.hasPrefix("test") }) == [
                "test[os=debian,pkg=x]", "test[os=debian,pkg=y]", "test[os=alpine,pkg=x]", "test[os=alpine,pkg=y]",
            ])
    }

    @Test("include: ${{ }} adds combinations; an empty list runs no instance and says so")
    func includeAndEmpty() async throws {
        let yaml = """
            steps:
              - id: discover
                run: "true"
              - id: test
                matrix:
                  include: ${{ fromJSON(steps.discover.outputs.combos) }}
                run: echo ${{ matrix.os }}-${{ matrix.cc }}
              - id: after
                run: "true"
            """
        let executor = FakeExecutor(
            outputs: ["discover": ["combos": #"[{"os": "debian", "cc": "gcc"}, {"os": "alpine", "cc": "clang"}]"#]])
        let (results, _) = try await ScheduleTests.run(yaml, executor)
        #expect(results["test[cc=gcc,os=debian]"]?.status == .passed)
        #expect(results["after[cc=clang,os=alpine]"]?.status == .passed)

        var schedule = Schedule(
            plan: try ScheduleTests.plan(yaml), jobs: 2, keepGoing: false, baseImage: "base")
        let empty = FakeExecutor(outputs: ["discover": ["combos": "[]"]])
        await PipelineRunner.drive(&schedule, execute: empty.execute, observer: nil) { _ in }
        #expect(Set(schedule.results.keys) == ["discover"])
        #expect(schedule.notes.contains { $0.contains("test has no instances") })
        #expect(schedule.notes.contains { $0.contains("after has no instances") })
    }

    @Test(
        "what does not expand fails the dynamic node, naming the step and the output; what follows is skipped",
        arguments: [
            (#"["a", "b"#, "output pkgs of step discover is not JSON"),
            ("", "it is empty (did the step write it to $CONTREE_OUTPUT?)"),
            (#"{"a": 1}"#, "must be a list, and its expression gave an object"),
            (#"[["a"]]"#, "item 1 is a list; an axis takes strings, numbers or booleans"),
        ])
    func badOutput(output: String, message: String) async throws {
        let executor = FakeExecutor(outputs: ["discover": ["pkgs": output]])
        let (results, _) = try await ScheduleTests.run(Self.yaml, executor)
        let failed = try #require(results["test[*]"])
        #expect(failed.status == .failed)
        #expect(failed.reason?.contains("step test: matrix axis 'pkg'") == true, "\(failed.reason ?? "")")
        #expect(failed.reason?.contains(message) == true, "\(failed.reason ?? "")")
        #expect(results["after"]?.status == .skipped)
        #expect(results["report"]?.status == .skipped)
    }

    @Test("when discover fails, the dynamic node and what follows are skipped")
    func discoverFails() async throws {
        let (results, _) = try await ScheduleTests.run(Self.yaml, FakeExecutor(["discover": .failed]))
        #expect(results["test[*]"]?.status == .skipped)
        #expect(results["after"]?.status == .skipped)
    }

    @Test("a target names an instance before it exists; a target that never appears fails the dynamic node")
    func targets() async throws {
        let plan = try ScheduleTests.plan(Self.yaml).restricted(to: ["after[pkg=b,opt=-O0]"])
        #expect(plan.nodes.map(\.id) == ["discover", "test[*]", "after"])
        var schedule = Schedule(plan: plan, jobs: 2, keepGoing: false, baseImage: "base")
        let executor = FakeExecutor(outputs: ["discover": ["pkgs": #"["a", "b"]"#]])
        await PipelineRunner.drive(&schedule, execute: executor.execute, observer: nil) { _ in }
        #expect(Set(schedule.results.keys) == ["discover", "test[pkg=b,opt=-O0]", "after[pkg=b,opt=-O0]"])

        var missing = Schedule(
            plan: try ScheduleTests.plan(Self.yaml).restricted(to: ["test[pkg=zz,opt=-O0]"]), jobs: 2,
            keepGoing: false, baseImage: "base")
        await PipelineRunner.drive(&missing, execute: executor.execute, observer: nil) { _ in }
        #expect(missing.results["test[*]"]?.status == .failed)
        #expect(missing.results["test[*]"]?.reason?.contains("no step or node 'test[pkg=zz,opt=-O0]'") == true)
    }

    @Test(
        "values that would name two instances alike, and includes that set inherited values, fail the dynamic node",
        arguments: [
            (#"["a,b"]"#, "holds \",\"; a matrix value names its instance"),
            (#"["x=1"]"#, "holds \"=\""),
        ])
    func unnameable(output: String, message: String) async throws {
        let (results, _) = try await ScheduleTests.run(Self.yaml, FakeExecutor(outputs: ["discover": ["pkgs": output]]))
        #expect(results["test[*]"]?.reason?.contains(message) == true, "\(results["test[*]"]?.reason ?? "")")
    }

    @Test("an include may not set a value the step inherits")
    func includeInherited() async throws {
        let yaml = """
            steps:
              - id: discover
                matrix: {os: [linux]}
                run: "true"
              - id: test
                matrix:
                  include: ${{ fromJSON(steps.discover.outputs.combos) }}
                run: "true"
            """
        let executor = FakeExecutor(outputs: ["discover": ["combos": #"[{"os": "a"}, {"os": "b"}]"#]])
        let (results, _) = try await ScheduleTests.run(yaml, executor)
        #expect(
            results["test[os=linux,*]"]?.reason?.contains("sets 'os', which this step inherits") == true,
            "\(results.mapValues { $0.reason ?? "" })")
    }

    @Test("a condition on matrix values is judged per instance, after the expansion")
    func conditionPerInstance() async throws {
        let yaml = """
            steps:
              - id: discover
                run: "true"
              - id: test
                matrix:
                  pkg: ${{ fromJSON(steps.discover.outputs.pkgs) }}
                if: matrix.pkg == 'b'
                run: "true"
            """
        let (results, recorded) = try await ScheduleTests.run(
            yaml, FakeExecutor(outputs: ["discover": ["pkgs": #"["a", "b"]"#]]))
        #expect(results["test[pkg=a]"]?.status == .skipped)
        #expect(results["test[pkg=b]"]?.status == .passed)
        #expect(!recorded.contains("test[*]"))
    }

    @Test("a dynamic node that cannot expand stops the others (fail-fast), or not with continue-on-error")
    func failFast() async throws {
        let yaml = """
            steps:
              - id: discover
                run: "true"
              - id: slow
                needs: []
                image: busybox
                run: sleep 100
              - id: test
                from: discover
                CONTINUE
                matrix:
                  pkg: ${{ fromJSON(steps.discover.outputs.pkgs) }}
                run: "true"
            """
        let executor = FakeExecutor(hanging: ["slow"], outputs: ["discover": ["pkgs": "not json"]])
        let (results, _) = try await ScheduleTests.run(yaml.replacing("CONTINUE", with: ""), executor)
        #expect(results["test[*]"]?.status == .failed)
        #expect(results["slow"]?.status == .cancelled, "fail-fast stopped it")

        let tolerant = FakeExecutor(outputs: ["discover": ["pkgs": "not json"]])
        let (tolerated, _) = try await ScheduleTests.run(
            yaml.replacing("CONTINUE", with: "continue-on-error: true"), tolerant)
        #expect(tolerated["test[*]"]?.toleratedFailure == true)
        #expect(tolerated["test[*]"]?.failsPipeline == false)
    }

    @Test("copying one instance of a dynamic step waits for its expansion")
    func copyFromDynamic() async throws {
        let yaml = """
            steps:
              - id: discover
                run: "true"
              - id: build
                matrix:
                  pkg: ${{ fromJSON(steps.discover.outputs.pkgs) }}
                run: "true"
              - id: pack
                image: busybox
                copy: [{from: "build[pkg=b]", path: /out, to: /dist/}]
                run: "true"
            """
        let plan = try ScheduleTests.plan(yaml)
        #expect(plan.node("pack")?.dependencies.contains("build[*]") == true)
        let executor = FakeExecutor(outputs: ["discover": ["pkgs": #"["a", "b"]"#]])
        let (results, _) = try await ScheduleTests.run(yaml, executor)
        #expect(results["pack"]?.status == .passed)
        let packAt = try #require(executor.started.firstIndex(of: "pack"))
        #expect(try #require(executor.started.firstIndex(of: "build[pkg=b]")) < packAt)
    }

    @Test("published tags: a node id maps to one tag, never another node's")
    func publishedTags() {
        #expect(PipelineRunner.publishedTag(runID: "R", node: "test[os=debian]") == "run/R/test@os:debian")
        #expect(PipelineRunner.publishedTag(runID: "R", node: "unit_tests") == "run/R/unit+tests")
        #expect(PipelineRunner.publishedTag(runID: "R", node: "unit-tests") == "run/R/unit-tests")
        let odd = ["t[v=a b]", "t[v=a/b]", "t[v=a+b]", "t[v=a_b]"].map {
            PipelineRunner.publishedTag(runID: "R", node: $0)
        }
        #expect(Set(odd).count == 4, "\(odd)")
        let long = PipelineRunner.publishedTag(runID: "R", node: "t[v=" + String(repeating: "x", count: 400) + "]")
        #expect(long.count < 256)
    }

    @Test("a dynamic matrix that expands past the limit fails, naming the limit")
    func tooMany() async throws {
        let many = "[" + (0..<300).map { "\"p\($0)\"" }.joined(separator: ",") + "]"
        let (results, _) = try await ScheduleTests.run(Self.yaml, FakeExecutor(outputs: ["discover": ["pkgs": many]]))
        #expect(results["test[*]"]?.reason?.contains("300 instances, more than 256") == true)
    }

    @Test(
        "bad dynamic matrices are refused with file:line:col",
        arguments: [
            ("matrix:\n      pkg: \"x ${{ steps.discover.outputs.pkgs }}\"", "6:12", "must be a list, or one ${{ }}"),
            ("matrix:\n      pkg: ${{ fromJSON(steps.nothere.outputs.pkgs) }}", "6:25", "steps.nothere names no step"),
            ("matrix:\n      pkg: ${{ fromJSON(matrix.pkg) }}", "6:25", "matrix.pkg is not an axis"),
            ("matrix:\n      pkg: ${{ fromJSON(1, 2) }}", "6:16", "fromJSON takes 1 argument, got 2"),
            ("matrix:\n      include: \"plain\"", "6:16", "matrix include must be a list"),
            (
                "matrix: {pkg: [a]}\n    inputs: [\"p/${{ matrix.nope }}/*\"]", "6:14",
                "names matrix.nope, which is not an axis"
            ),
            ("matrix: {pkg: [a]}\n    inputs: [\"p/${{ env.X }}/*\"]", "6:14", "may name matrix values"),
        ])
    func refused(matrix: String, place: String, message: String) throws {
        let yaml = """
            steps:
              - id: discover
                run: "true"
              - id: test
                \(matrix)
                run: "true"
            """
        do {
            _ = try parse(yaml)
            Issue.record("accepted: \(matrix)")
        } catch let error as PipelineValidationError {
            #expect(error.description.contains("test.yaml:\(place)"), "\(error.description)")
            #expect(error.description.contains(message), "\(error.description)")
        }
    }

    @Test("fromJSON, toJSON, join and contains on lists")
    func functions() throws {
        struct Scope: ExpressionScope {
            func resolve(_ path: [String]) -> ExpressionValue { .string(#"{"b": [1, true, null], "a": "x/y"}"#) }
            func status(_ function: String) -> Bool { true }
        }
        func value(_ text: String) throws -> String {
            try ExpressionParser.parse(text) { _ in SourceLocation(file: "t", line: 1, column: 1) }
                .evaluate(in: Scope()).text
        }
        #expect(try value("toJSON(fromJSON(env.X))") == #"{"a":"x/y","b":[1,true,null]}"#)
        #expect(try value("join(fromJSON('[1, 2.5, \"c\"]'), ', ')") == "1, 2.5, c")
        #expect(try value("join('plain')") == "plain")
        #expect(try value("contains(fromJSON('[\"Debian\", \"alpine\"]'), 'debian')") == "true")
        #expect(try value("contains(fromJSON('[\"debian-slim\"]'), 'debian')") == "false")
        #expect(try value("toJSON('a\"b')") == #""a\"b""#)
        #expect(try value("fromJSON('not json')") == "", "not strict: null")
    }
}

@Suite("Dynamic matrices in real runs", .requiresRoot)
struct DynamicMatrixRunTests {
    static func pipeline(_ matrix: String) -> String {
        """
        name: packages
        steps:
          - id: setup
            run: echo base > /workspace/base
          - id: discover
            inputs: [pkgs.json]
            run: echo "pkgs=$(cat pkgs.json)" >> $CONTREE_OUTPUT
          - id: test
            from: setup
            needs: [discover]
            matrix:
              pkg: \(matrix)
            run: echo tested ${{ matrix.pkg }} > /workspace/out-${{ matrix.pkg }}.txt; cat /workspace/base
            artifacts: ["out-*.txt"]
        """
    }

    @Test("instances are keyed as a static matrix's are: a rerun is all hits, one more package is one more miss")
    func keys() async throws {
        let w = try Workspace()
        try w.write("pkgs.json", #"["a", "b"]"#)
        let dynamic = Self.pipeline("${{ fromJSON(steps.discover.outputs.pkgs) }}")
        let first = try await w.run(dynamic)
        #expect(first.status == .passed)
        #expect(Set(first.ran) == ["setup", "discover", "test[pkg=a]", "test[pkg=b]"])
        #expect(first.log("test[pkg=b]").contains("base"))
        #expect(Set(first.nodes.flatMap(\.artifacts).map(\.path)) == ["/workspace/out-a.txt", "/workspace/out-b.txt"])
        let report = try String(contentsOfFile: first.outDir + "/report.json", encoding: .utf8)
        #expect(!report.contains("test[*]"), "the dynamic node gave way to its instances")

        let again = try await w.run()
        #expect(again.ran.isEmpty && again.hits.count == 4)
        // --from reaches instances that exist only once the matrix expands.
        let forced = try await w.run(options: RunOptions(forceSteps: ["test"]))
        #expect(Set(forced.ran) == ["test[pkg=a]", "test[pkg=b]"], "\(forced.ran)")
        // The same matrix written out: the same keys.
        let fixed = try await w.run(Self.pipeline("[a, b]"), file: "static.yaml")
        #expect(fixed.ran.isEmpty && fixed.hits.count == 4)
        #expect(fixed.node("test[pkg=a]")?.key == first.node("test[pkg=a]")?.key)

        try w.write("pkgs.json", #"["a", "b", "c"]"#)
        let grown = try await w.run(dynamic)
        #expect(Set(grown.ran) == ["discover", "test[pkg=c]"])
        #expect(Set(grown.hits) == ["setup", "test[pkg=a]", "test[pkg=b]"])

        try w.write("pkgs.json", #"["a", "b""#)
        let broken = try await w.run(dynamic)
        #expect(broken.status == .failed)
        let reason = broken.node("test[*]")?.reason ?? ""
        #expect(reason.contains("output pkgs of step discover is not JSON"), "\(reason)")
        #expect(RunViews.summary(broken).contains("test[*]"))
    }
}
