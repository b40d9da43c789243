import ContreeTestSupport
import Foundation
import Glibc
import ImageFormats
import ImageStore
import Sandbox
import Synchronization
import Testing

@testable import Pipeline

/// A store and a directory holding a pipeline file, removed when the test ends.
final class Workspace: Sendable {
    let root: String
    let store: Store
    let engine: SandboxEngine

    init() throws {
        root = "/tmp/contree-pipeline-test-" + UUID().uuidString.lowercased().prefix(12)
        try FileManager.default.createDirectory(atPath: root + "/project", withIntermediateDirectories: true)
        store = try Store(root: root + "/store")
        engine = SandboxEngine(store: store)
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    var project: String { root + "/project" }

    func write(_ relative: String, _ text: String) throws {
        let path = project + "/" + relative
        try FileManager.default.createDirectory(
            atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// Writes `pipeline.yaml` and runs it.
    func run(
        _ yaml: String? = nil, options: RunOptions = RunOptions(), file: String = "pipeline.yaml",
        observer: (any RunObserver)? = nil
    ) async throws -> RunReport {
        if let yaml { try write(file, yaml) }
        let plan = PipelinePlan(try PipelineParser.parse(file: project + "/" + file))
        var options = options
        if options.outDir == nil { options.outDir = root + "/runs/" + UUID().uuidString.prefix(8) }
        return try await PipelineRunner(plan: plan, engine: engine, options: options, observer: observer).run()
    }
}

extension RunReport {
    func node(_ id: String) -> NodeResult? { nodes.first { $0.node == id } }
    func log(_ id: String) -> String {
        guard let path = node(id)?.log else { return "" }
        return (try? String(contentsOfFile: outDir + "/" + path, encoding: .utf8)) ?? ""
    }
    var ran: [String] { nodes.filter { $0.status == .passed && !$0.cached }.map(\.node) }
    var hits: [String] { nodes.filter(\.cached).map(\.node) }
}

@Suite("Running pipelines", .requiresRoot)
struct RunnerTests {
    static let linear = """
        name: linear
        steps:
          - id: one
            run: echo 1 > /workspace/one; echo "n=1" >> $CONTREE_OUTPUT
          - id: two
            run: cat /workspace/one; echo 2 > /workspace/two
          - id: three
            run: test "$(cat /workspace/two)" = 2 && echo got ${{ steps.one.outputs.n }}
        """

    @Test("steps run from each other's snapshots; a rerun is all cache hits; outputs flow")
    func cacheAndOutputs() async throws {
        let w = try Workspace()
        let first = try await w.run(RunnerTests.linear)
        #expect(first.status == .passed)
        #expect(first.ran == ["one", "two", "three"])
        #expect(first.log("three").contains("got 1"))
        #expect(first.node("one")?.outputs == ["n": "1"])
        let second = try await w.run()
        #expect(second.hits == ["one", "two", "three"])
        #expect(second.node("three")?.resultImage == first.node("three")?.resultImage)
        // The output file never lands in a snapshot.
        let image = try #require(try w.store.image(first.node("one")!.resultImage!))
        let fs = ImageFilesystem(layersTopFirst: image.layers.reversed().map(w.store.layerPath))
        #expect(try fs.lookup("/.contree") == nil)
    }

    @Test("after a failure and a fix, only the failed step and what follows run again")
    func rerunAfterFix() async throws {
        let w = try Workspace()
        try w.write("answer.txt", "41\n")
        let yaml = """
            steps:
              - id: prepare
                run: echo prepared > /workspace/p
              - id: check
                inputs: [answer.txt]
                run: test "$(cat answer.txt)" = 42
              - id: publish
                run: echo published
            """
        let failed = try await w.run(yaml)
        #expect(failed.status == .failed && failed.exitStatus == 1)
        #expect(failed.node("check")?.status == .failed && failed.node("check")?.exitCode == 1)
        #expect(failed.node("publish")?.status == .skipped)
        #expect(failed.node("check")?.resultImage != nil, "a failed step's snapshot is kept")
        // The failure is never served from the cache.
        let again = try await w.run()
        #expect(again.node("check")?.cached == false && again.node("check")?.status == .failed)
        try w.write("answer.txt", "42\n")
        let fixed = try await w.run()
        #expect(fixed.status == .passed)
        #expect(fixed.hits == ["prepare"])
        #expect(fixed.ran == ["check", "publish"])
    }

    @Test("--from, --no-cache and --fail-on-cache-miss")
    func cacheControls() async throws {
        let w = try Workspace()
        _ = try await w.run(RunnerTests.linear)
        let from = try await w.run(options: RunOptions(forceSteps: ["two"]))
        #expect(from.hits == ["one"] && from.ran == ["two", "three"])
        let all = try await w.run(options: RunOptions(noCache: true))
        #expect(all.hits.isEmpty && all.ran.count == 3)
        let strict = try await w.run(options: RunOptions(failOnCacheMiss: true))
        #expect(strict.status == .passed)
        try w.write("pipeline.yaml", RunnerTests.linear.replacingOccurrences(of: "echo 2 >", with: "echo 2  >"))
        let miss = try await w.run(options: RunOptions(failOnCacheMiss: true))
        #expect(miss.status == .failed)
        #expect(miss.node("two")?.reason?.contains("--fail-on-cache-miss") == true)
        #expect(miss.node("one")?.cached == true)
    }

    @Test("secrets reach the command but never its log, snapshot or key")
    func secrets() async throws {
        let w = try Workspace()
        let yaml = """
            secrets:
              TOKEN: {env: TEST_TOKEN}
            steps:
              - id: use
                secrets: [TOKEN]
                run: echo "token is $TOKEN"; test "$TOKEN" = "$(echo czNjcjN0LXZhbHVl | base64 -d)"
            """
        let report = try await w.run(yaml, options: RunOptions(environment: ["TEST_TOKEN": "s3cr3t-value"]))
        #expect(report.status == .passed)
        #expect(report.log("use").contains("token is ***"))
        #expect(!report.log("use").contains("s3cr3t-value"))
        let components = try #require(report.node("use")?.components)
        #expect(!String(describing: components).contains("s3cr3t-value"))
        #expect(components.secrets.first?.hasPrefix("TOKEN=hmac-sha256:") == true)
        // The key changes when the secret does, so a new secret value reruns the step.
        let changed = try await w.run(options: RunOptions(environment: ["TEST_TOKEN": "other"]))
        #expect(changed.node("use")?.cached == false)
        let missing = await #expect(throws: PipelineValidationError.self) {
            _ = try await w.run(options: RunOptions(environment: [:]))
        }
        #expect(missing?.description.contains("TEST_TOKEN is not set") == true)
    }

    @Test(
        "a retry policy: only the failures it names are tried again, after a doubling backoff; every attempt is in the report"
    )
    func retryPolicy() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: flaky
                retries: {max: 3, when: [exit:1, timeout], backoff: 0.2s}
                timeout: 5s
                run: |
                  n=$(cat /workspace/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /workspace/n
                  echo "attempt $n"
                  exit 1
              - id: wrong-status
                if: always()
                retries: {max: 3, when: [exit:1]}
                run: echo once; exit 2
              - id: timed-out
                if: always()
                retries: {max: 1, when: [timeout]}
                timeout: 1s
                run: sleep 5
            """
        let started = Date()
        let report = try await w.run(yaml, options: RunOptions(keepGoing: true))
        let elapsed = Date().timeIntervalSince(started)
        // Every attempt starts from the same parent: the count never passes 1, and all 4 fail.
        #expect(report.node("flaky")?.attempts == 4)
        #expect(report.node("flaky")?.attemptRecords?.count == 4)
        #expect(report.node("flaky")?.attemptRecords?.allSatisfy { $0.exitCode == 1 } == true)
        #expect(report.log("flaky").components(separatedBy: "attempt 1\n").count - 1 == 4)
        #expect(report.log("flaky").contains("attempt 3 of 4 after 0.4 s (backoff)"))
        // Backoff: 0.2 + 0.4 + 0.8 s at least.
        #expect(elapsed >= 1.4)
        // An exit status the policy does not name: one attempt.
        #expect(report.node("wrong-status")?.attempts == 1)
        #expect(report.node("wrong-status")?.attemptRecords == nil)
        #expect(report.log("wrong-status").contains("not tried again: retries.when is exit:1"))
        #expect(report.node("timed-out")?.attempts == 2)
        #expect(report.node("timed-out")?.attemptRecords?.allSatisfy(\.timedOut) == true)
        // The JSON names them.
        let json = String(decoding: try JSONEncoder().encode(report), as: UTF8.self)
        #expect(json.contains("\"attempt_records\""))
    }

    @Test("moving YAML into templates, anchors and merge keys keeps every step cached: keys see the resolved step")
    func compositionKeepsKeys() async throws {
        let w = try Workspace()
        let inline = """
            steps:
              - id: build
                timeout: 60s
                env: {CC: gcc, OPT: "-O2"}
                limits: {memory: 256m}
                run: echo "$CC $OPT" > /out
              - id: test
                from: build
                timeout: 60s
                env: {CC: gcc, OPT: "-O0"}
                limits: {memory: 256m}
                run: cat /out
            """
        let composed = """
            x-limits: &limits {memory: 256m}
            templates:
              c: {timeout: 60s, env: {CC: gcc, OPT: "-O2"}, limits: *limits}
            steps:
              - id: build
                extends: c
                run: echo "$CC $OPT" > /out
              - id: test
                <<: {from: build}
                extends: c
                env: {OPT: "-O0"}
                run: cat /out
            """
        let first = try await w.run(inline)
        #expect(first.ran == ["build", "test"])
        let again = try await w.run(composed)
        #expect(again.status == .passed)
        #expect(again.ran.isEmpty, "ran: \(again.ran)")
        #expect(again.node("test")?.key == first.node("test")?.key)
        // The same with the template and the first step in an included file.
        try w.write(
            "ci/common.yaml",
            """
            templates:
              c: {timeout: 60s, env: {CC: gcc, OPT: "-O2"}, limits: {memory: 256m}}
            steps:
              - id: build
                extends: c
                run: echo "$CC $OPT" > /out
            """)
        let included = try await w.run(
            """
            include: [ci/common.yaml]
            steps:
              - id: test
                from: build
                extends: c
                env: {OPT: "-O0"}
                run: cat /out
            """)
        #expect(included.status == .passed)
        #expect(included.ran.isEmpty, "ran: \(included.ran)")
    }

    @Test("conditions, retries and continue-on-error")
    func control() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: flaky
                retries: 2
                run: |
                  n=$(cat /workspace/n 2>/dev/null || echo 0); echo $((n+1)) > /workspace/n
                  echo attempt
                  exit 1
              - id: tolerated
                from: flaky
                if: always()
                continue-on-error: true
                run: exit 3
              - id: after
                from: tolerated
                if: always()
                run: echo after
              - id: on-failure
                needs: [flaky]
                if: failure()
                run: echo cleaning up
              - id: never
                if: steps.flaky.outcome == 'success'
                needs: [flaky]
                run: echo unreachable
            """
        let report = try await w.run(yaml, options: RunOptions(keepGoing: true))
        #expect(report.node("flaky")?.attempts == 3)
        #expect(report.log("flaky").components(separatedBy: "attempt").count - 1 >= 3)
        #expect(report.node("tolerated")?.toleratedFailure == true)
        #expect(report.node("after")?.status == .passed)
        #expect(report.node("on-failure")?.status == .passed)
        #expect(report.node("never")?.status == .skipped)
        #expect(report.status == .failed)
    }

    @Test("fail-fast stops the other branches; --keep-going runs them")
    func failFast() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: base
                run: true
              - id: bad
                from: base
                run: exit 1
              - id: slow
                from: base
                run: sleep 120; echo slow done
              - id: after-slow
                from: slow
                run: echo after
            """
        let started = Date()
        let fast = try await w.run(yaml, options: RunOptions(jobs: 4))
        #expect(Date().timeIntervalSince(started) < 100, "the slow branch was cancelled, not awaited")
        #expect(fast.node("slow")?.status == .cancelled || fast.node("slow")?.status == .skipped)
        #expect(fast.node("after-slow")?.status != .passed)
        let keep = try await w.run(
            yaml.replacingOccurrences(of: "sleep 120", with: "sleep 1"), options: RunOptions(jobs: 4, keepGoing: true))
        #expect(keep.node("after-slow")?.status == .passed)
        #expect(keep.status == .failed)
    }

    @Test("cancelling a run stops its sandboxes and records the run as cancelled")
    func cancellation() async throws {
        let w = try Workspace()
        try w.write("pipeline.yaml", "steps:\n  - id: long\n    run: sleep 30.11\n")
        let report = try await w.runCancelled(once: ["sleep", "30.11"])
        #expect(report.status == .cancelled && report.exitStatus == 130)
        #expect(report.node("long")?.status == .cancelled)
        #expect(try w.store.checkConsistency(verifyContent: false).isConsistent)
    }

    @Test("a fork runs its variants from one checkpoint, scores them, and goes on from the best")
    func treeSearch() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: setup
                run: echo base > /workspace/base
              - id: search
                fork:
                  small: {run: echo 3 > /workspace/score}
                  large: {run: echo 9 > /workspace/score}
                  broken: {run: exit 1}
                  medium: {run: echo 5 > /workspace/score}
                select:
                  score: cat /workspace/score
                  keep: best
              - id: expand
                run: echo "expanding $(cat /workspace/score) from $(cat /workspace/base)"
            """
        let report = try await w.run(yaml)
        #expect(report.status == .passed)
        let selection = try #require(report.node("search")?.variants)
        #expect(selection.filter(\.kept).map(\.variant) == ["large"])
        #expect(selection.first { $0.variant == "broken" }?.status == .failed)
        #expect(report.log("expand").contains("expanding 9 from base"))
        let again = try await w.run()
        #expect(again.node("search")?.variants?.filter(\.kept).map(\.variant) == ["large"])
        #expect(again.hits.contains("expand"))
    }

    @Test("matrix combinations run as branches; artifacts are exported with a manifest; JUnit and HTML are written")
    func matrixArtifactsReports() async throws {
        let w = try Workspace()
        let junit = w.root + "/junit.xml"
        let yaml = """
            steps:
              - id: build
                matrix:
                  size: [small, large]
                run: echo ${{ matrix.size }} > /workspace/out-${{ matrix.size }}.txt
                artifacts: ["out-*.txt"]
              - id: fail-with-logs
                needs: [build]
                run: echo broken > /workspace/crash.log; exit 2
                artifacts:
                  - {path: crash.log, when: failure}
            """
        let report = try await w.run(yaml, options: RunOptions(keepGoing: true, junitPath: junit))
        #expect(report.node("build[size=small]")?.status == .passed)
        let artifacts = report.nodes.flatMap(\.artifacts)
        #expect(
            Set(artifacts.map(\.path)) == [
                "/workspace/out-small.txt", "/workspace/out-large.txt", "/workspace/crash.log",
            ])
        for artifact in artifacts {
            #expect(FileManager.default.fileExists(atPath: report.outDir + "/" + artifact.file))
        }
        #expect(FileManager.default.fileExists(atPath: report.outDir + "/artifacts/manifest.json"))
        let xml = try String(contentsOfFile: junit, encoding: .utf8)
        #expect(xml.contains("<failure") && xml.contains("fail-with-logs"))
        let html = try String(contentsOfFile: report.outDir + "/report.html", encoding: .utf8)
        #expect(html.contains("<svg") && html.contains("build[size=large]"))
        #expect(
            !html.contains("<script") && !html.contains("src=\"http") && !html.contains("href=\"http"), "self-contained"
        )
        let csv = try String(contentsOfFile: report.outDir + "/metrics.csv", encoding: .utf8)
        #expect(csv.split(separator: "\n").count == 5, "a header and 4 nodes: the failing step inherits the matrix")
        let json = try JSONDecoder.iso.decode(
            RunReport.self, from: Data(contentsOf: URL(fileURLWithPath: report.outDir + "/report.json")))
        #expect(json.nodes.count == 4)
    }

    @Test("--fail-on-cache-miss is never excused: not by continue-on-error, not by a fork's selection")
    func strictCacheMiss() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: search
                fork:
                  a: {run: echo 1 > /workspace/score}
                  b: {run: echo 2 > /workspace/score}
                select: {score: cat /workspace/score, keep: best}
              - id: optional
                continue-on-error: true
                run: echo optional
            """
        _ = try await w.run(yaml)
        try w.write(
            "pipeline.yaml",
            yaml.replacingOccurrences(of: "echo 2 >", with: "echo 3 >")
                .replacingOccurrences(of: "echo optional", with: "echo optional!"))
        let strict = try await w.run(options: RunOptions(failOnCacheMiss: true))
        #expect(strict.status == .failed && strict.exitStatus == 1)
        #expect(strict.node("search.b")?.strictFailure == true)
    }

    @Test("conditions see env; a plain condition also needs its dependencies to succeed")
    func conditionsAndEnv() async throws {
        let w = try Workspace()
        let yaml = """
            env: {MODE: prod}
            steps:
              - id: gated
                if: env.MODE == 'prod'
                run: echo deploying
              - id: broken
                run: exit 1
              - id: after-broken
                if: pipeline.name != ''
                run: echo should not run
            """
        let report = try await w.run(yaml, options: RunOptions(keepGoing: true))
        #expect(report.node("gated")?.status == .passed)
        #expect(report.node("after-broken")?.status == .skipped)
    }

    @Test("a fork whose variants were all skipped is skipped, not failed")
    func skippedFork() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: a
                run: echo "flag=no" >> $CONTREE_OUTPUT
              - id: search
                if: steps.a.outputs.flag == 'yes'
                fork: {x: {run: echo x}, y: {run: echo y}}
                select: {keep: first-success}
            """
        let report = try await w.run(yaml)
        #expect(report.status == .passed)
        #expect(report.node("search")?.status == .skipped)
    }

    @Test("after Ctrl-C, steps that ask for always() or cancelled() still run")
    func cleanupAfterCancel() async throws {
        let w = try Workspace()
        try w.write(
            "pipeline.yaml",
            """
            steps:
              - id: setup
                run: true
              - id: long
                run: sleep 30.13
              - id: cleanup
                from: setup
                needs: [long]
                if: cancelled() || always()
                run: echo cleaning up
            """)
        let report = try await w.runCancelled(once: ["sleep", "30.13"])
        #expect(report.node("long")?.status == .cancelled)
        #expect(report.node("cleanup")?.status == .passed)
        #expect(report.log("cleanup").contains("cleaning up"))
    }

    @Test("with keep: all and without select, what follows each variant reads that variant")
    func keepAllScope() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: solve
                fork:
                  fast: {run: echo "v=fast" >> $CONTREE_OUTPUT}
                  slow: {run: echo "v=slow" >> $CONTREE_OUTPUT}
                select: {keep: all}
              - id: next
                run: echo "got ${{ steps.solve.outputs.v }}-${{ steps.solve.outcome }}"
            """
        let report = try await w.run(yaml)
        #expect(report.log("next[solve=fast]").contains("got fast-success"))
        #expect(report.log("next[solve=slow]").contains("got slow-success"))
    }

    @Test("a score command sees the variant's env; a secret written to outputs fails the step")
    func scoreEnvAndMaskedOutputs() async throws {
        let w = try Workspace()
        let yaml = """
            env: {BONUS: "5"}
            secrets: {TOKEN: {env: TEST_TOKEN}}
            steps:
              - id: search
                fork: {a: {run: echo 1 > /workspace/s}, b: {run: echo 2 > /workspace/s}}
                select: {score: "echo $(( $(cat /workspace/s) + $BONUS + ${{ env.BONUS }} ))", keep: best}
              - id: leak
                secrets: [TOKEN]
                run: echo "token=$TOKEN" >> $CONTREE_OUTPUT
            """
        let report = try await w.run(yaml, options: RunOptions(environment: ["TEST_TOKEN": "hunter2-secret"]))
        #expect(report.node("search")?.variants?.map(\.score) == [11, 12])
        #expect(report.node("leak")?.status == .failed && report.node("leak")?.outputs.isEmpty == true)
        let json = try String(contentsOfFile: report.outDir + "/report.json", encoding: .utf8)
        #expect(!json.contains("hunter2-secret"))
    }

    @Test("explain agrees with run about steps after a selection")
    func explainAfterSelection() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: search
                fork: {a: {run: echo "v=a" >> $CONTREE_OUTPUT; echo 1 > /workspace/s}, b: {run: echo "v=b" >> $CONTREE_OUTPUT; echo 2 > /workspace/s}}
                select: {score: cat /workspace/s, keep: best}
              - id: next
                run: echo ${{ steps.search.outputs.v }}
            """
        _ = try await w.run(yaml)
        let plan = PipelinePlan(try PipelineParser.parse(file: w.project + "/pipeline.yaml"))
        let explanation = try #require(try KeyExplainer(plan: plan, engine: w.engine).explain(step: "next").first)
        #expect(explanation.hit != nil, "\(explanation.note ?? "") \(explanation.differences)")
        #expect(explanation.components?.command.last == "echo b")
    }

    @Test("an input that matches nothing is invalid input: nothing runs")
    func missingInput() async throws {
        let w = try Workspace()
        let error = await #expect(throws: PipelineValidationError.self) {
            _ = try await w.run("steps:\n  - id: a\n    inputs: [nope/*.c]\n    run: true\n")
        }
        #expect(error?.errors.first?.message.contains("matches no file") == true)
        #expect(error?.errors.first?.location?.line == 3)
        #expect(try w.store.listImages().isEmpty, "not even the base image was built")
    }
}

extension JSONDecoder {
    static var iso: JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return d
    }
}

extension Workspace {
    /// Runs `pipeline.yaml` and cancels the run (as Ctrl-C does) once a sandbox runs `command`
    /// (a command line no other test runs at the same time).
    func runCancelled(once command: [String]) async throws -> RunReport {
        let ended = EndWatcher()
        let task = Task { try await run(observer: ended) }
        // All the suites start at once on 2 cores: a sandbox once took more than a minute to start.
        let deadline = Date().addingTimeInterval(300)
        while try processCount(commandLine: command) == 0 {
            guard !ended.seen, Date() < deadline else {
                task.cancel()
                throw TestTimeout(
                    "no sandbox ran \(command.joined(separator: " ")) "
                        + (ended.seen ? "(the run ended first)" : "(5 minutes passed)"))
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        task.cancel()
        return try await task.value
    }
}

/// Notes when a run ends.
final class EndWatcher: RunObserver {
    private let ended = Mutex(false)
    var seen: Bool { ended.withLock { $0 } }
    func handle(_ event: RunEvent) {
        if case .finished = event { ended.withLock { $0 = true } }
    }
}

/// A wait that gave up.
struct TestTimeout: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
