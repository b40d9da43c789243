import ContreeTestSupport
import Foundation
import Testing

@testable import Pipeline

/// What a cache hit may stand in for, and what it may not.
@Suite("What the cache reuses", .requiresRoot)
struct CacheReuseTests {
    static func fork(score: String, name: String = "search") -> String {
        """
        name: \(name)
        steps:
          - id: search
            fork:
              small: {run: echo 3 > /workspace/n}
              large: {run: echo 9 > /workspace/n}
            select:
              score: \(score)
              keep: best
        """
    }

    @Test("a changed score command scores again, and --fail-on-cache-miss sees the miss")
    func scoreCommandInKey() async throws {
        let w = try Workspace()
        let first = try await w.run(Self.fork(score: "cat /workspace/n"))
        #expect(first.node("search")?.variants?.filter(\.kept).map(\.variant) == ["large"])
        try w.write("pipeline.yaml", Self.fork(score: "echo $((100 - $(cat /workspace/n)))"))
        let strict = try await w.run(options: RunOptions(failOnCacheMiss: true))
        #expect(strict.status == .failed, "\(strict.log("search"))")
        let second = try await w.run()
        #expect(second.node("search")?.variants?.filter(\.kept).map(\.variant) == ["small"])
        // Another pipeline with the same variants and score command shares the scores; with
        // another score command it does not.
        let other = try await w.run(
            Self.fork(score: "echo $((100 - $(cat /workspace/n)))", name: "other"),
            options: RunOptions(failOnCacheMiss: true), file: "other.yaml")
        #expect(other.status == .passed)
        let shell = try await w.run(
            Self.fork(score: "echo $((100 - $(cat /workspace/n)))", name: "other")
                .replacingOccurrences(of: "keep: best", with: "keep: best\n    shell: sh -eu"),
            options: RunOptions(failOnCacheMiss: true), file: "other.yaml")
        #expect(shell.status == .failed, "the shell is part of the score's key")
    }

    @Test("steps that react to failures run every time unless cache: true; a cache hit's log replays its output")
    func sideEffectsRunAgain() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: build
                run: echo "compiling $(cat /proc/sys/kernel/random/uuid)"
              - id: notify
                if: always()
                run: echo "notified $(cat /proc/sys/kernel/random/uuid)"
              - id: report
                if: always()
                cache: true
                run: echo reported
            """
        let first = try await w.run(yaml)
        #expect(first.ran == ["build", "notify", "report"])
        let second = try await w.run()
        #expect(second.ran == ["notify"])
        #expect(second.hits == ["build", "report"])
        #expect(second.log("notify") != first.log("notify"))
        // The hit shows the output it had when it ran.
        let compiled = first.log("build").split(separator: "\n").first { $0.hasPrefix("compiling") }
        #expect(compiled != nil)
        #expect(second.log("build").contains(String(compiled ?? "none")))
        #expect(second.log("build").contains("cache hit"))
    }
}
