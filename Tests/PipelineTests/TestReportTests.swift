import ContreeTestSupport
import Foundation
import Testing

@testable import Pipeline

@Suite("JUnit files a step's tests write")
struct JUnitReadingTests {
    @Test("suites nested or not; failures, errors and skips with their messages and text; the worst outcome wins")
    func reads() {
        let xml = """
            <?xml version="1.0" encoding="UTF-8"?>
            <testsuites>
              <testsuite name="outer">
                <testsuite name="math" tests="4">
                  <testcase classname="math.Add" name="adds" time="0.25"/>
                  <testcase classname="math.Add" name="overflows" time="0.5">
                    <failure message="expected 0, got 1" type="AssertionError"><![CDATA[at add.py:3 <here>]]></failure>
                  </testcase>
                  <testcase name="crashes"><error type="Segfault">core &amp; dump</error><failure message="also"/></testcase>
                  <testcase name="later"><skipped message="not yet"/></testcase>
                </testsuite>
                <testcase name="loose"/>
              </testsuite>
            </testsuites>
            """
        var results = TestResults()
        results.read(Data(xml.utf8), file: "/workspace/out/a.xml")
        #expect(results.notes == nil)
        #expect((results.total, results.passed, results.failed, results.errors, results.skipped) == (5, 2, 1, 1, 1))
        let overflow = results.cases[1]
        #expect(overflow.suite == "math" && overflow.classname == "math.Add" && overflow.seconds == 0.5)
        #expect(overflow.message == "expected 0, got 1" && overflow.detail == "at add.py:3 <here>")
        #expect(results.cases[2].outcome == .error && results.cases[2].message == "Segfault")
        #expect(results.cases[2].detail == "core & dump")
        #expect(results.cases[3].message == "not yet")
        #expect(results.cases[4].suite == "outer")
        #expect(results.failing.map(\.name) == ["overflows", "crashes"])
    }

    @Test(
        "what is not well-formed names its line",
        arguments: [
            ("<a>\n<b></a>", "line 2: not well-formed XML: </a> closes <b>"),
            ("<a>&nope;</a>", "line 1: not well-formed XML: unknown entity &nope;"),
            ("<a></a>\n<b/>", "line 2: not well-formed XML: a second root element <b>"),
            ("<a x=1/>", "line 1: not well-formed XML: the value of x is not quoted"),
            ("<a><!-- never closed", "line 1: not well-formed XML: --> is missing"),
            ("<a x='1'", "it ends inside <a>: cut short?"),
        ])
    func malformed(xml: String, why: String) {
        var results = TestResults()
        results.read(Data(xml.utf8), file: "f.xml")
        #expect(
            results.notes == ["f.xml is not a JUnit report (\(why)); its tests are not counted"],
            "\(results.notes ?? [])")
    }

    @Test("declarations, comments, a DOCTYPE, numeric entities and single quotes are read")
    func wellFormed() {
        let xml = """
            <?xml version="1.0"?>
            <!DOCTYPE testsuite [ <!ELEMENT testsuite ANY> ]>
            <!-- made by a runner -->
            <testsuite name='s&#x20;1'><testcase name="caf&#233;"><failure message="a &lt; b">x &gt; y</failure></testcase></testsuite>
            """
        var results = TestResults()
        results.read(Data(xml.utf8), file: "f.xml")
        #expect(results.notes == nil)
        #expect(results.cases.first?.suite == "s 1" && results.cases.first?.name == "café")
        #expect(results.cases.first?.message == "a < b" && results.cases.first?.detail == "x > y")
    }

    @Test("bad XML, or XML that is not JUnit, is a note naming the file; the other files still count")
    func badFiles() {
        var results = TestResults()
        results.read(Data("<testsuite><testcase name='a'>".utf8), file: "/w/broken.xml")
        results.read(Data("<coverage line-rate='1'/>".utf8), file: "/w/coverage.xml")
        results.read(Data("not xml at all".utf8), file: "/w/text.xml")
        results.read(Data("<testsuite name='s'><testcase name='ok'/></testsuite>".utf8), file: "/w/good.xml")
        #expect(results.total == 1 && results.passed == 1)
        #expect(results.files.count == 4)
        let notes = results.notes ?? []
        #expect(notes.count == 3)
        #expect(
            notes[0]
                == "/w/broken.xml is not a JUnit report (it ends inside <testcase>: cut short?); its tests are not counted"
        )
        #expect(
            notes[1]
                == "/w/coverage.xml is not a JUnit report (it has no <testsuite> or <testcase>); its tests are not counted"
        )
        #expect(
            notes[2]
                == "/w/text.xml is not a JUnit report (line 1: not well-formed XML: text outside the root element); its tests are not counted"
        )
    }
}

@Suite("Test reports in runs", .requiresRoot)
struct TestReportRunTests {
    @Test("a failing step's JUnit files reach report.json, report.html, the summary and --junit; bad XML is a note")
    func failingTests() async throws {
        let w = try Workspace()
        let junit = w.root + "/junit.xml"
        let yaml = #"""
            name: reports
            steps:
              - id: unit
                matrix: {py: ["3.12"]}
                run: |
                  mkdir -p build/test-results
                  cat > build/test-results/a.xml <<'XML'
                  <testsuite name="core"><testcase classname="core.Math" name="adds" time="0.1"/>
                  <testcase classname="core.Math" name="divides"><failure message="ZeroDivisionError">Traceback: x/0</failure></testcase></testsuite>
                  XML
                  echo '<testsuite name="io"><testcase name="reads"/><testcase name="slow"><skipped/></testcase></testsuite>' > build/test-results/b.xml
                  echo '<testsuite><testcase' > build/test-results/c.xml
                  exit 1
                reports:
                  junit: ["build/test-results/*.xml", "missing/*.xml"]
              - id: green
                image: busybox
                run: echo '<testsuite name="g"><testcase name="fine"/></testsuite>' > /tmp/g.xml
                reports: {junit: /tmp/g.xml}
            """#
        let report = try await w.run(yaml, options: RunOptions(keepGoing: true, junitPath: junit))
        #expect(report.status == .failed)
        let tests = try #require(report.node("unit[py=3.12]")?.tests)
        #expect((tests.total, tests.passed, tests.failed, tests.skipped) == (4, 2, 1, 1))
        #expect(
            tests.files == [
                "/workspace/build/test-results/a.xml", "/workspace/build/test-results/b.xml",
                "/workspace/build/test-results/c.xml",
            ])
        #expect(tests.failing.first?.detail == "Traceback: x/0")
        let notes = tests.notes ?? []
        #expect(notes.contains { $0.hasPrefix("/workspace/build/test-results/c.xml is not a JUnit report") })
        #expect(notes.contains("reports.junit 'missing/*.xml' matched nothing in the snapshot"))
        #expect(report.log("unit[py=3.12]").contains("tests: 4 in 3 reports: 2 passed, 1 failed, 0 errors, 1 skipped"))

        let json = try String(contentsOfFile: report.outDir + "/report.json", encoding: .utf8)
        #expect(json.contains("\"tests\"") && json.contains("ZeroDivisionError"))
        let html = try String(contentsOfFile: report.outDir + "/report.html", encoding: .utf8)
        #expect(
            html.contains("<h2>Tests</h2>") && html.contains("core.Math.divides") && html.contains("Traceback: x/0"))
        let summary = RunViews.summary(report)
        #expect(summary.contains("tests: 5 in 2 steps: 3 passed, 1 failed, 0 errors, 1 skipped"), "\(summary)")
        #expect(summary.contains("✘ unit[py=3.12]: core.Math.divides: ZeroDivisionError"))

        let xml = try String(contentsOfFile: junit, encoding: .utf8)
        #expect(xml.contains(#"<testsuite name="unit[py=3.12]" tests="4" failures="1" errors="0" skipped="1""#))
        #expect(xml.contains(#"<testcase classname="core.Math" name="divides">"#))
        #expect(xml.contains(#"<failure message="ZeroDivisionError">Traceback: x/0</failure>"#))
        #expect(xml.contains(#"<testsuite name="green" tests="1""#))
        // What was written is XML a JUnit reader takes: our own reader, as CI systems would.
        var again = TestResults()
        again.read(Data(xml.utf8), file: junit)
        #expect(again.notes == nil && again.total == 2 + 5)

        // A cached step reports its tests again.
        let rerun = try await w.run(options: RunOptions(keepGoing: true))
        #expect(rerun.node("green")?.cached == true)
        #expect(rerun.node("green")?.tests?.passed == 1)
    }
}

@Suite("Flake triage", .requiresRoot)
struct FlakeCheckTests {
    /// `counter` fails the first two runs (a count kept in a dependency cache, which persists
    /// between runs of the step): the original run and the first rerun fail, the others pass.
    static let yaml = """
        name: flakes
        caches:
          state: {path: /state}
        steps:
          - id: counter
            caches: [state]
            flaky-check: 3
            ALLOW
            run: |
              n=$(cat /state/n 2>/dev/null || echo 0); n=$((n + 1)); echo $n > /state/n
              echo "run $n"; echo "seen=$n" >> $CONTREE_OUTPUT
              test $n -ge 3
          - id: after
            run: echo after
          - id: broken
            image: busybox
            flaky-check: 2
            run: echo always broken; exit 3
        """

    @Test("a failure that reruns pass is flaky and still fails; one no rerun passes is deterministic")
    func verdicts() async throws {
        let w = try Workspace()
        let report = try await w.run(
            Self.yaml.replacing("ALLOW", with: "allow-flaky: false"), options: RunOptions(keepGoing: true))
        #expect(report.status == .failed)
        let counter = try #require(report.node("counter"))
        #expect(counter.status == .failed)
        let check = try #require(counter.flakeCheck)
        #expect(check.verdict == .flaky && check.reruns == 3 && check.passed == 2 && !check.allowed)
        #expect(check.runs.map(\.log) == (1...3).map { "logs/counter.flaky-\($0).log" })
        #expect(check.runs.filter { $0.exitCode == 0 }.count == 2)
        #expect(
            counter.reason?.contains("flaky: 2 of 3 reruns passed (allow-flaky: true lets a flaky step pass)") == true)
        #expect(report.node("after")?.status == .skipped)
        let broken = try #require(report.node("broken")?.flakeCheck)
        #expect(broken.verdict == .deterministic && broken.passed == 0 && broken.runs.allSatisfy { $0.exitCode == 3 })
        for run in check.runs {
            #expect(FileManager.default.fileExists(atPath: report.outDir + "/" + run.log))
        }
        #expect(report.log("counter").contains("flaky-check: 2 of 3 reruns passed: flaky"))
        let summary = RunViews.summary(report)
        #expect(summary.contains("flaky-check: counter is flaky: 2 of 3 reruns from the same snapshot passed"))
        #expect(summary.contains("flaky-check: broken is deterministic: 0 of 2 reruns"))
        let json = try String(contentsOfFile: report.outDir + "/report.json", encoding: .utf8)
        #expect(json.contains("\"flaky_check\"") && json.contains("\"verdict\" : \"deterministic\""))
        let html = try String(contentsOfFile: report.outDir + "/report.html", encoding: .utf8)
        #expect(html.contains("<h2>Flake triage</h2>"))
    }

    @Test("allow-flaky: a flaky step passes and what follows starts from a rerun that passed")
    func allowed() async throws {
        let w = try Workspace()
        let report = try await w.run(
            Self.yaml.replacing("ALLOW", with: "allow-flaky: true"), options: RunOptions(keepGoing: true))
        let counter = try #require(report.node("counter"))
        #expect(counter.status == .passed && counter.flakeCheck?.allowed == true)
        #expect(counter.reason == "flaky (allow-flaky): it failed, then 2 of 3 reruns passed")
        #expect(["3", "4"].contains(counter.outputs["seen"]), "the outputs of a rerun that passed")
        #expect(report.node("after")?.status == .passed)
        #expect(counter.flakeCheck?.runs.contains { $0.snapshot == counter.resultImage } == true)
        #expect(report.status == .failed, "broken is deterministic")
    }

    @Test("allow-flaky without flaky-check, and a flaky-check out of range, are refused with their lines")
    func refused() throws {
        for (yaml, message) in [
            (
                "steps:\n  - id: a\n    run: x\n    allow-flaky: true\n",
                "test.yaml:2:5: error: step a has allow-flaky but no flaky-check"
            ),
            (
                "steps:\n  - id: a\n    run: x\n    flaky-check: 0\n",
                "test.yaml:4:18: error: flaky-check must be a whole number of at least 1"
            ),
            (
                "steps:\n  - id: a\n    run: x\n    flaky-check: 21\n",
                "test.yaml:4:18: error: flaky-check runs a failed step again at most 20 times"
            ),
        ] {
            #expect(throws: PipelineValidationError.self) { try parse(yaml) }
            do { _ = try parse(yaml) } catch { #expect("\(error)".contains(message), "\(error)") }
        }
    }
}
