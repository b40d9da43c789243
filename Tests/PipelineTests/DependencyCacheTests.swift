import ContreeTestSupport
import Foundation
import Glibc
import Testing

@testable import ImageStore
@testable import Pipeline
@testable import Sandbox

@Suite("Dependency caches", .requiresRoot)
struct DependencyCacheTests {
    @Test("a cache persists across runs, never enters the snapshot or the key, and gc leaves it")
    func persists() async throws {
        let w = try Workspace()
        let yaml = """
            caches:
              pip: {path: /root/.cache/pip}
            steps:
              - id: install
                caches: [pip]
                run: |
                  echo "before: $(cat /root/.cache/pip/runs 2>/dev/null | wc -l)"
                  echo run >> /root/.cache/pip/runs
              - id: after
                run: test ! -e /root/.cache/pip/runs && echo clean
            """
        let first = try await w.run(yaml)
        #expect(first.ran == ["install", "after"], "\(first.nodes.map { ($0.node, $0.reason ?? "") })")
        #expect(first.log("install").contains("before: 0"))
        #expect(first.log("after").contains("clean"), "the cache is not in the snapshot")
        let cacheFile = w.store.root + "/caches/pip/runs"
        #expect(try String(contentsOfFile: cacheFile, encoding: .utf8) == "run\n")
        // The image the step left has no trace of the cache or its mount point.
        let image = try #require(first.node("install")?.resultImage)
        let record = try #require(try w.store.image(image))
        let layer = w.store.layerPath(try #require(record.layers.last))
        #expect(!FileManager.default.fileExists(atPath: layer + "/root/.cache"))

        _ = try w.store.collectGarbage(pruneUntaggedOlderThan: 0, derived: [])
        #expect(FileManager.default.fileExists(atPath: cacheFile), "gc leaves caches alone")

        // The cache's content is not in the key: a rerun is all hits.
        let second = try await w.run()
        #expect(second.hits == ["install", "after"])
        // A forced rerun sees what the first run left.
        var options = RunOptions()
        options.forceSteps = ["install"]
        let third = try await w.run(options: options)
        #expect(third.log("install").contains("before: 1"))
    }

    @Test("locked: steps sharing a cache take turns; private: a busy cache gives a fresh directory")
    func sharing() async throws {
        let w2 = try Workspace()
        let report = try await w2.run(
            """
            caches:
              c: {path: /cache}
            steps:
              - id: one
                caches: [c]
                run: echo one-start $(date +%s%N) >> /cache/log; sleep 0.4; echo one-end $(date +%s%N) >> /cache/log
              - id: two
                from: one
                caches: [c]
                run: "true"
              - id: three
                needs: []
                caches: [{name: c, sharing: locked}]
                run: echo three-start $(date +%s%N) >> /cache/log; sleep 0.4; echo three-end $(date +%s%N) >> /cache/log
            """,
            options: {
                var o = RunOptions(); o.jobs = 4; return o
            }())
        #expect(report.failed.isEmpty, "\(report.nodes.map { ($0.node, $0.reason ?? "") })")
        let log = try String(contentsOfFile: w2.store.root + "/caches/c/log", encoding: .utf8)
        let events = log.split(separator: "\n").map { $0.split(separator: " ") }
        #expect(events.count == 4)
        // The two writers never overlap: each start follows the other's end, whichever ran first.
        #expect(events.map { String($0[0]).hasSuffix("start") } == [true, false, true, false], "\(log)")
        #expect(events[0][0].prefix(3) == events[1][0].prefix(3), "\(log)")

        // Private: while another holder has the cache, the step gets an empty one of its own.
        let lock = open(w2.store.root + "/caches/c.lock", O_RDWR | O_CLOEXEC)
        #expect(flock(lock, LOCK_EX) == 0)
        defer { close(lock) }
        let privately = try await w2.run(
            """
            caches:
              c: {path: /cache}
            steps:
              - id: four
                caches: [{name: c, sharing: private}]
                run: ls /cache | wc -l; touch /cache/scratch
            """, file: "private.yaml")
        #expect(privately.failed.isEmpty)
        #expect(privately.log("four").contains("0\n"))
        let left = try FileManager.default.contentsOfDirectory(atPath: w2.store.root + "/caches").sorted()
        #expect(left == ["c", "c.lock", "c.used"], "the private directory is gone")
    }
}

@Suite("The cache command", .requiresRoot)
struct CacheCommandTests {
    @Test("cache ls, prune --older-than and rm; a cache in use is not removed")
    func command() async throws {
        let w = try Workspace()
        _ = try await w.run(
            """
            caches:
              deps: {path: /deps}
              old: {path: /old}
            steps:
              - {id: a, caches: [deps, old], run: "echo x > /deps/f; echo y > /old/g"}
            """)
        let home = w.store.root
        let listed = try await CLI.run(["cache", "ls"], home: home, in: w.project)
        #expect(listed.status == 0)
        #expect(listed.out.contains("deps") && listed.out.contains("old"), "\(listed.out)")
        // Make `old` unused for two days.
        var times = [
            timespec(tv_sec: time(nil) - 2 * 86_400, tv_nsec: 0), timespec(tv_sec: time(nil) - 2 * 86_400, tv_nsec: 0),
        ]
        #expect(utimensat(AT_FDCWD, home + "/caches/old.used", &times, 0) == 0)
        let pruned = try await CLI.run(["cache", "prune", "--older-than", "1d"], home: home, in: w.project)
        #expect(pruned.status == 0 && pruned.out.contains("removed 1 cache: old"), "\(pruned)")
        let bad = try await CLI.run(["cache", "prune", "--older-than", "soon"], home: home, in: w.project)
        #expect(bad.status == 2 && bad.err.contains("7d"))

        let lock = open(home + "/caches/deps.lock", O_RDWR | O_CLOEXEC)
        #expect(flock(lock, LOCK_SH) == 0)
        let busy = try await CLI.run(["cache", "rm", "deps"], home: home, in: w.project)
        #expect(busy.status != 0 && busy.err.contains("in use"), "\(busy)")
        close(lock)
        let removed = try await CLI.run(["cache", "rm", "deps"], home: home, in: w.project)
        #expect(removed.status == 0)
        let missing = try await CLI.run(["cache", "rm", "deps"], home: home, in: w.project)
        #expect(missing.status != 0 && missing.err.contains("cache ls"))
        let json = try await CLI.run(["cache", "ls", "--json"], home: home, in: w.project)
        #expect(json.out.filter { !$0.isWhitespace } == "[]", "\(json.out)")
    }
}

extension RunReport {
    var failed: [String] { nodes.filter { $0.status == .failed }.map(\.node) }
}
