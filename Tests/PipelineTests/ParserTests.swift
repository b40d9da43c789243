import Foundation
import Testing

@testable import Pipeline

/// Parses YAML text as `test.yaml`; returns the errors (empty when valid).
func problems(_ yaml: String) -> [PipelineError] {
    do {
        _ = try PipelineParser.parse(yaml, file: "test.yaml", directory: "/tmp")
        return []
    } catch let error as PipelineValidationError {
        return error.errors
    } catch {
        return [PipelineError(.invalid, "unexpected \(error)")]
    }
}

func parse(_ yaml: String) throws -> PipelineDefinition {
    try PipelineParser.parse(yaml, file: "test.yaml", directory: "/tmp")
}

@Suite("Pipeline files: bad input is named by file, line and column")
struct ParserTests {
    /// Expects exactly one problem, at `line:column`, whose message contains `mention`.
    func expectProblem(
        _ yaml: String, at line: Int, _ column: Int?, mentions: [String],
        sourceLocation: Testing.SourceLocation = #_sourceLocation
    ) {
        let found = problems(yaml)
        #expect(found.count == 1, "one problem for:\n\(yaml)\nfound: \(found)", sourceLocation: sourceLocation)
        guard let first = found.first else { return }
        #expect(first.location?.file == "test.yaml", sourceLocation: sourceLocation)
        #expect(first.location?.line == line, "\(first)", sourceLocation: sourceLocation)
        if let column { #expect(first.location?.column == column, "\(first)", sourceLocation: sourceLocation) }
        for mention in mentions {
            #expect(
                first.message.contains(mention), "\(first.message) should mention \(mention)",
                sourceLocation: sourceLocation)
        }
    }

    @Test("a valid pipeline parses, with defaults and steps in order")
    func valid() throws {
        let definition = try parse(
            """
            name: demo
            image: busybox
            env: {A: "1"}
            defaults: {timeout: 2m, shell: bash -e, limits: {memory: 256m}}
            steps:
              - id: one
                run: echo one
              - id: two
                run: [echo two, echo three]
                timeout: 90s
                retries: 2
            """)
        #expect(definition.name == "demo")
        #expect(definition.steps.map(\.id.value) == ["one", "two"])
        #expect(definition.defaults.timeout == 120)
        #expect(definition.defaults.limits.memoryBytes == 256 << 20)
        #expect(definition.steps[1].settings.timeout == 90)
        #expect(definition.steps[1].run?.literal == "echo two\necho three")
    }

    @Test("anchors, aliases and merge keys; x- keys at the top are the file's own")
    func anchorsAndMergeKeys() throws {
        let definition = try parse(
            """
            x-limits: &small {memory: 256m, cpus: 1}
            x-step: &step
              timeout: 30s
              retries: {max: 2, when: [exit:1]}
              env: {MODE: shared}
            steps:
              - id: one
                <<: *step
                limits: *small
                run: echo one
              - id: two
                <<: [*step, {timeout: 5m, workdir: /w}]
                env: {MODE: own}
                run: echo two
            """)
        #expect(definition.steps.map(\.id.value) == ["one", "two"])
        #expect(definition.steps[0].settings.timeout == 30)
        #expect(definition.steps[0].settings.retries == RetryPolicy(max: 2, when: [.exit(1)]))
        #expect(definition.steps[0].settings.limits.memoryBytes == 256 << 20)
        #expect(definition.steps[0].env.map(\.name) == ["MODE"])
        // The first mapping of a merge list wins; the step's own keys win over both.
        #expect(definition.steps[1].settings.timeout == 30)
        #expect(definition.steps[1].settings.workdir?.literal == "/w")
        #expect(definition.steps[1].env.first?.value.literal == "own")
        // A bad value from an anchor is named where the anchor wrote it.
        expectProblem(
            "x-step: &step\n  timeout: soon\nsteps:\n  - id: a\n    <<: *step\n    run: x\n", at: 2, 12,
            mentions: ["duration"])
        // A merge key needs mappings.
        expectProblem("steps:\n  - id: a\n    <<: 5\n    run: x\n", at: 3, 9, mentions: ["merge key (<<)"])
        // Other top-level keys are still checked.
        expectProblem("y-step: 1\nsteps:\n  - id: a\n    run: x\n", at: 1, 1, mentions: ["unknown key 'y-step'"])
    }

    @Test("templates and extends: deep-merged as GitLab merges them; chains, cycles and unknown names")
    func templates() throws {
        let definition = try parse(
            """
            templates:
              base:
                timeout: 30s
                env: {A: "1", B: "2"}
                limits: {memory: 256m}
                inputs: [a.txt]
              c-build:
                extends: base
                env: {B: "3"}
            steps:
              - id: one
                extends: c-build
                env: {C: "4"}
                limits: {cpus: 1}
                inputs: [b.txt]
                run: echo one
              - id: two
                extends: [c-build, base]
                run: echo two
            """)
        let one = definition.steps[0]
        // Mappings merge key by key along the chain; the step's own keys last.
        #expect(one.env.map { "\($0.name)=\($0.value.literal ?? "")" } == ["A=1", "B=3", "C=4"])
        #expect(one.settings.timeout == 30)
        #expect(one.settings.limits.memoryBytes == 256 << 20 && one.settings.limits.cpus == 1)
        // Lists replace.
        #expect(one.inputs.map(\.pattern.value) == ["b.txt"])
        // A list of templates: later ones win.
        #expect(definition.steps[1].env.map { "\($0.name)=\($0.value.literal ?? "")" } == ["A=1", "B=2"])
        #expect(definition.steps[1].inputs.map(\.pattern.value) == ["a.txt"])

        expectProblem(
            "templates:\n  t: {timeout: 1s}\nsteps:\n  - id: a\n    extends: nope\n    run: x\n", at: 5, 14,
            mentions: ["no template nope (templates: t)"])
        expectProblem(
            "templates:\n  a: {extends: b}\n  b: {extends: a}\nsteps:\n  - id: s\n    extends: a\n    run: x\n",
            at: 3, 16, mentions: ["cycle: a → b → a"])
        // A problem inside a template is named at the template's line.
        expectProblem(
            "templates:\n  t:\n    timeout: soon\nsteps:\n  - id: a\n    extends: t\n    run: x\n", at: 3, 14,
            mentions: ["duration"])
        expectProblem(
            "templates:\n  t: {id: x}\nsteps:\n  - id: a\n    run: x\n", at: 2, 7, mentions: ["sets id"])
    }

    @Test("include: files merged in order, the including file's keys last; errors name the included file")
    func include() throws {
        let directory = "/tmp/contree-include-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: directory + "/ci", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func write(_ name: String, _ text: String) throws {
            try text.write(toFile: directory + "/" + name, atomically: true, encoding: .utf8)
        }
        func problems(_ main: String) -> [PipelineError] {
            do {
                _ = try PipelineParser.parse(file: directory + "/" + main)
                return []
            } catch let error as PipelineValidationError {
                return error.errors
            } catch {
                return [PipelineError(.invalid, "\(error)")]
            }
        }
        try write(
            "ci/common.yaml",
            "include: [more.yaml]\nenv: {CC: gcc, OPT: \"-O2\"}\ndefaults: {timeout: 30s}\ntemplates:\n  t: {retries: 1}\nsteps:\n  - id: setup\n    run: echo setup\n"
        )
        try write("ci/more.yaml", "env: {EXTRA: \"1\"}\nsteps:\n  - id: first\n    run: echo first\n")
        try write(
            "main.yaml",
            "include: ci/common.yaml\nenv: {OPT: \"-O0\"}\nsteps:\n  - id: build\n    extends: t\n    run: echo build\n"
        )
        let definition = try PipelineParser.parse(file: directory + "/main.yaml")
        #expect(definition.steps.map(\.id.value) == ["first", "setup", "build"])
        #expect(Set(definition.env.map { "\($0.name)=\($0.value.literal ?? "")" }) == ["CC=gcc", "OPT=-O0", "EXTRA=1"])
        #expect(definition.defaults.timeout == 30)
        #expect(definition.steps[2].settings.retries == RetryPolicy(max: 1))
        #expect(definition.steps[0].location.file == "ci/more.yaml")

        // A problem in an included file names that file, line and column.
        try write("ci/bad.yaml", "steps:\n  - id: b\n    timeout: soon\n    run: x\n")
        try write("bad.yaml", "include: [ci/bad.yaml]\nsteps:\n  - id: a\n    run: y\n")
        let bad = problems("bad.yaml")
        #expect(bad.first?.location?.description == "ci/bad.yaml:3:14", "\(bad)")
        // A step id in two files names both.
        try write("ci/dup.yaml", "steps:\n  - id: a\n    run: x\n")
        try write("dup.yaml", "include: [ci/dup.yaml]\nsteps:\n  - id: a\n    run: y\n")
        let dup = problems("dup.yaml")
        #expect(dup.first?.message.contains("first defined at ci/dup.yaml:2:") == true, "\(dup)")
        #expect(dup.first?.location?.file.hasSuffix("dup.yaml") == true && dup.first?.location?.line == 3)
        // A cycle names the chain; a missing file says what paths are relative to.
        try write("ci/loop.yaml", "include: ../loop.yaml\nsteps:\n  - id: z\n    run: x\n")
        try write("loop.yaml", "include: [ci/loop.yaml]\nsteps:\n  - id: a\n    run: y\n")
        #expect(problems("loop.yaml").first?.message.contains("loop.yaml → ci/loop.yaml → loop.yaml") == true)
        try write("missing.yaml", "include: [ci/nope.yaml]\nsteps:\n  - id: a\n    run: y\n")
        let missing = problems("missing.yaml")
        #expect(missing.first?.message.contains("relative to the file that includes them") == true)
        #expect(missing.first?.location?.line == 1 && missing.first?.location?.column == 11)
    }

    @Test("malformed YAML")
    func malformedYAML() {
        expectProblem("steps:\n  - id: a\n    run: [unclosed\n", at: 4, nil, mentions: ["malformed YAML"])
    }

    @Test("an unknown key, with a suggestion")
    func unknownKey() {
        expectProblem(
            "steps:\n  - id: a\n    rnu: echo\n", at: 3, 5, mentions: ["unknown key 'rnu'", "did you mean 'run'"])
        expectProblem("stpes:\n  - id: a\n", at: 1, 1, mentions: ["'stpes'", "did you mean 'steps'"])
    }

    @Test("duplicate step ids")
    func duplicateIDs() {
        expectProblem(
            "steps:\n  - id: a\n    run: x\n  - id: a\n    run: y\n", at: 4, 9,
            mentions: ["duplicate step id 'a'", "2:9"])
    }

    @Test("a duplicate key in one mapping")
    func duplicateKey() {
        let found = problems("steps:\n  - id: a\n    run: x\n    run: y\n")
        #expect(found.first?.message.contains("duplicate key 'run'") == true, "\(found)")
    }

    @Test("references to missing steps, with a suggestion")
    func missingReference() {
        expectProblem(
            "steps:\n  - id: build\n    run: x\n  - id: test\n    from: biuld\n    run: y\n", at: 5, 11,
            mentions: ["'biuld'", "did you mean 'build'"])
        expectProblem(
            "steps:\n  - id: a\n    run: x\n    needs: [ghost]\n", at: 4, 13, mentions: ["'ghost'", "not a step"])
    }

    @Test("a cycle is named")
    func cycle() {
        expectProblem(
            """
            steps:
              - id: a
                from: c
                run: x
              - id: b
                from: a
                run: y
              - id: c
                from: b
                run: z
            """, at: 2, 5, mentions: ["cycle", "a -> c -> b -> a"])
    }

    @Test(
        "bad expressions",
        arguments: [
            ("    run: echo ${{ matrix.os\n", "'${{' is not closed", 3, 15),
            ("    run: echo ${{ frobnicate() }}\n", "unknown function 'frobnicate'", 3, 19),
            ("    run: echo ${{ matrx.os }}\n", "did you mean 'matrix'", 3, 19),
            ("    run: echo ${{ matrix.os }}\n", "matrix.os is not an axis", 3, 19),
            ("    run: echo ${{ steps.later.outputs.x }}\n", "not one of the steps it comes after", 3, 19),
            ("    run: echo ${{ secrets.TOKEN }}\n", "secrets are not available in expressions", 3, 19),
            ("    run: echo ${{ 'a' == }}\n", "ends too early", 3, 26),
            ("    if: success( && true\n", "unexpected '&'", 3, 18),
        ])
    func badExpressions(line: String, mention: String, row: Int, column: Int) {
        let yaml = "steps:\n  - id: a\n" + line + "  - id: later\n    run: x\n"
        let found = problems(yaml.replacingOccurrences(of: "    if:", with: "    run: x\n    if:"))
        let first = found.first
        #expect(first?.message.contains(mention) == true, "\(found)")
        if !line.contains("if:") {
            #expect(first?.location?.line == row && first?.location?.column == column, "\(String(describing: first))")
        }
    }

    @Test("expressions inside block scalars point at the right line")
    func blockScalarLocation() {
        let found = problems("steps:\n  - id: a\n    run: |\n      echo one\n      echo ${{ nope.x }}\n")
        #expect(found.first?.location?.line == 5)
        #expect(found.first?.location?.column == 16)
    }

    @Test(
        "wrong types",
        arguments: [
            ("    timeout: soon\n", "duration", 3),
            ("    retries: -1\n", "whole number", 3),
            (
                "    retries: {max: 2, when: [exit:1, segfault]}\n",
                "exit:N (0 to 255), timeout or oom, not 'segfault'", 3
            ),
            ("    retries: {when: [timeout]}\n", "retries needs max", 3),
            ("    retries: {max: 2, backoff: soon}\n", "retries.backoff must be a duration", 3),
            ("    retries: {max: 2, every: 1}\n", "every", 3),
            ("    needs: {a: b}\n", "value or a list", 3),
            ("    cache: perhaps\n", "true or false", 3),
            ("    limits: {memory: lots}\n", "memory must be a size", 3),
            ("    isolation: jail\n", "container, vm", 3),
            ("    inputs: /etc/passwd\n", "list of paths", 3),
        ])
    func wrongTypes(line: String, mention: String, row: Int) {
        let found = problems("steps:\n  - id: a\n" + line + "    run: x\n")
        #expect(found.first?.message.contains(mention) == true, "\(found)")
        #expect(found.first?.location?.line == row)
    }

    @Test("a step without id or without anything to run")
    func missingPieces() {
        expectProblem("steps:\n  - run: x\n", at: 2, 5, mentions: ["no id"])
        expectProblem("steps:\n  - id: a\n", at: 2, 5, mentions: ["nothing to run"])
        expectProblem("name: x\n", at: 1, 1, mentions: ["no `steps:`"])
    }

    @Test("inputs may not leave the pipeline's directory")
    func inputEscape() {
        expectProblem("steps:\n  - id: a\n    run: x\n    inputs: [../secret]\n", at: 4, 14, mentions: ["stay inside"])
    }

    @Test("reading one instance of a matrix step from outside its branches is ambiguous")
    func ambiguousReference() {
        expectProblem(
            """
            steps:
              - id: setup
                run: true
              - id: build
                matrix: {x: ["1", "2"]}
                run: echo "v=${{ matrix.x }}" >> $CONTREE_OUTPUT
              - id: report
                from: setup
                needs: [build]
                run: echo ${{ steps.build.outputs.v }}
            """, at: 10, 19, mentions: ["ambiguous", "matrix axis 'x'"])
    }

    @Test("several problems are reported together, in file order")
    func several() {
        let found = problems("steps:\n  - id: a\n    rnu: x\n  - id: b\n    run: y\n    needs: [zz]\n")
        #expect(found.count == 2, "\(found)")
        #expect(found.map { $0.location?.line ?? 0 } == found.map { $0.location?.line ?? 0 }.sorted())
    }
}

@Suite("Expressions")
struct ExpressionTests {
    struct Scope: ExpressionScope {
        var values: [String: String]
        var ok = true
        func resolve(_ path: [String]) -> ExpressionValue {
            values[path.joined(separator: ".")].map { .string($0) } ?? .null
        }
        func status(_ function: String) -> Bool { function == "success" ? ok : function == "always" }
    }

    func eval(_ text: String, _ values: [String: String] = [:], ok: Bool = true) throws -> ExpressionValue {
        let location = SourceLocation(file: "t", line: 1, column: 1)
        return try ExpressionParser.parse(text) { _ in location }.evaluate(in: Scope(values: values, ok: ok))
    }

    @Test("comparisons, logic and functions")
    func semantics() throws {
        #expect(try eval("1 < 2 && 'a' == 'a'") == .bool(true))
        #expect(try eval("matrix.n >= 10", ["matrix.n": "9"]) == .bool(false))
        #expect(try eval("matrix.n >= 10", ["matrix.n": "12"]) == .bool(true))
        #expect(try eval("steps.a.outputs.v || 'default'") == .string("default"))
        #expect(try eval("!success() || always()", ok: false) == .bool(true))
        #expect(try eval("contains('Hello World', 'world')") == .bool(true))
        #expect(try eval("format('{0}-{1}', 'a', 2)") == .string("a-2"))
        #expect(try eval("'it''s'") == .string("it's"))
        #expect(try eval("steps['my-step'].outcome == 'success'", ["steps.my-step.outcome": "success"]) == .bool(true))
    }

    @Test("templates interpolate every expression")
    func templates() throws {
        let location = SourceLocation(file: "t", line: 1, column: 1)
        let template = try Template.parse("cc=${{ matrix.cc }} opt=${{ matrix.opt || '-O0' }}!", at: location) { _ in
            location
        }
        #expect(template.render(in: Scope(values: ["matrix.cc": "gcc"])) == "cc=gcc opt=-O0!")
    }
}

@Suite("Planning")
struct PlanTests {
    @Test("a matrix expands with include and exclude, and steps from it inherit its combinations")
    func matrix() throws {
        let plan = PipelinePlan(
            try parse(
                """
                steps:
                  - id: build
                    matrix:
                      cc: [gcc, clang]
                      opt: ["-O0", "-O2"]
                      exclude: [{cc: clang, opt: "-O0"}]
                      include: [{cc: tcc, opt: "-O1"}]
                    run: echo ${{ matrix.cc }} ${{ matrix.opt }}
                  - id: test
                    run: echo ${{ matrix.cc }}
                  - id: report
                    from: build
                    needs: [test]
                    matrix: {fmt: [txt]}
                    run: echo ${{ matrix.fmt }}
                """))
        let builds = plan.nodes(of: "build").map(\.id)
        #expect(
            builds == [
                "build[cc=gcc,opt=-O0]", "build[cc=gcc,opt=-O2]", "build[cc=clang,opt=-O2]", "build[cc=tcc,opt=-O1]",
            ])
        let tests = plan.nodes(of: "test")
        #expect(tests.count == 4)
        #expect(tests[0].parent == .node("build[cc=gcc,opt=-O0]"))
        let reports = plan.nodes(of: "report")
        #expect(reports.count == 4)
        #expect(reports[0].id == "report[cc=gcc,opt=-O0,fmt=txt]")
        #expect(Set(reports[0].dependencies).isSuperset(of: tests.map(\.id)))
    }

    @Test("keys only matrix.include adds are read as matrix.NAME (empty where a combination lacks them)")
    func matrixIncludeKeys() throws {
        let plan = PipelinePlan(
            try parse(
                """
                steps:
                  - id: build
                    matrix:
                      opt: ["-O0"]
                      include: [{opt: "-O2", extra: -DNDEBUG}]
                    run: cc ${{ matrix.opt }} ${{ matrix.extra }}
                  - id: test
                    run: echo ${{ matrix.extra }}
                """))
        func rendered(_ id: String) throws -> String {
            let node = try #require(plan.node(id))
            let scope = NodeScope(node: node, plan: plan, results: [:], env: [:], pipelineName: "p", cancelled: false)
            return try #require(node.run).render(in: scope)
        }
        #expect(plan.nodes(of: "build").map(\.id) == ["build[opt=-O0]", "build[opt=-O2,extra=-DNDEBUG]"])
        #expect(try rendered("build[opt=-O2,extra=-DNDEBUG]") == "cc -O2 -DNDEBUG")
        #expect(try rendered("build[opt=-O0]") == "cc -O0 ")
        #expect(try rendered("test[opt=-O2,extra=-DNDEBUG]") == "echo -DNDEBUG")
        #expect(problems("steps:\n  - id: a\n    matrix: {x: [1]}\n    run: echo ${{ matrix.extra }}\n").count == 1)
    }

    @Test("fork variants run from one checkpoint; a select node keeps one for what follows")
    func fork() throws {
        let plan = PipelinePlan(
            try parse(
                """
                steps:
                  - id: setup
                    run: echo setup
                  - id: solve
                    fork:
                      a: {run: echo a}
                      b: {run: echo b}
                    select: {score: cat /score, keep: best}
                  - id: next
                    run: echo next
                """))
        #expect(plan.nodes.map(\.id) == ["setup", "solve.a", "solve.b", "solve", "next"])
        #expect(plan.node("solve.a")?.parent == .node("setup"))
        #expect(plan.node("solve")?.kind == .select)
        #expect(plan.node("next")?.parent == .node("solve"))
    }

    @Test("without select, what follows a fork runs once per variant")
    func forkAll() throws {
        let plan = PipelinePlan(
            try parse(
                """
                steps:
                  - id: try
                    fork: {x: {run: echo x}, y: {run: echo y}}
                  - id: check
                    run: echo check
                """))
        #expect(plan.nodes(of: "check").map(\.id) == ["check[try=x]", "check[try=y]"])
        #expect(plan.node("check[try=y]")?.parent == .node("try.y"))
    }

    @Test("the graph renders as Mermaid and DOT")
    func graph() throws {
        let plan = PipelinePlan(
            try parse("steps:\n  - id: a\n    run: x\n  - id: b\n    needs: [a]\n    from: a\n    run: y\n"))
        #expect(GraphRenderer.render(plan, as: .mermaid).contains("n0 --> n1"))
        #expect(GraphRenderer.render(plan, as: .dot).contains("digraph"))
    }
}
