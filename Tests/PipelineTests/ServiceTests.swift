import ContreeTestSupport
import Foundation
import Testing

@testable import Pipeline

@Suite("Services beside steps", .requiresRoot)
struct ServiceTests {
    @Test("a service shares the step's network: ready first, reached on 127.0.0.1, logged, gone after; part of the key")
    func webService() async throws {
        let w = try Workspace()
        let marker = "\(Int.random(in: 10_000...99_999))"
        let yaml = """
            services:
              web:
                from: content
                run: httpd -f -p 8080 -h /www & exec sleep \(marker)
                ready: {run: "wget -q -O /dev/null http://127.0.0.1:8080/", timeout: 10s}
                env: {GREETING: hello}
            steps:
              - id: content
                run: mkdir -p /www && echo served-by-the-service > /www/index.html
              - id: test
                image: busybox
                services: [web]
                run: wget -q -O- http://127.0.0.1:8080/
            """
        let first = try await w.run(yaml)
        #expect(first.failed.isEmpty, "\(first.nodes.map { ($0.node, $0.reason ?? "") })")
        #expect(first.log("test").contains("served-by-the-service"))
        #expect(first.log("test").contains("service web ready after"))
        #expect(FileManager.default.fileExists(atPath: first.outDir + "/logs/test.web.log"))
        #expect(try processCount(commandLine: ["sleep", marker]) == 0, "the service was stopped")
        #expect(try await w.run().hits.sorted() == ["content", "test"])
        // The service's command is part of the step's key.
        let changed = try await w.run(yaml.replacingOccurrences(of: "GREETING: hello", with: "GREETING: bye"))
        #expect(changed.ran == ["test"])
    }

    @Test("a service that is never ready fails the step, naming it with the end of its log; nothing is left")
    func neverReady() async throws {
        let w = try Workspace()
        let marker = "\(Int.random(in: 10_000...99_999))"
        let report = try await w.run(
            """
            services:
              db:
                run: echo starting the database; exec sleep \(marker)
                ready: {run: "false", timeout: 2s}
              gone:
                run: echo about to fail; exit 3
                ready: {run: "test -e /never", timeout: 30s}
            steps:
              - {id: a, services: [db], run: "echo should-not-run"}
              - {id: b, image: busybox, services: [gone], run: "echo should-not-run"}
            """,
            options: {
                var o = RunOptions(); o.keepGoing = true; return o
            }())
        let a = try #require(report.node("a"))
        #expect(a.status == .failed)
        #expect(a.reason?.contains("service db was not ready within 2 s") == true, "\(a.reason ?? "")")
        #expect(a.reason?.contains("starting the database") == true)
        let b = try #require(report.node("b"))
        #expect(b.reason?.contains("service gone ended before it was ready") == true, "\(b.reason ?? "")")
        #expect(b.reason?.contains("about to fail") == true)
        #expect(!report.log("a").contains("should-not-run") && !report.log("b").contains("should-not-run"))
        #expect(try processCount(commandLine: ["sleep", marker]) == 0)
    }
}
