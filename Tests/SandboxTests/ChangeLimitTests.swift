import ContreeTestSupport
import Foundation
import Glibc
import Testing

@testable import ImageFormats
@testable import ImageStore
@testable import Sandbox
@testable import SystemSupport

/// A run's change costs what it holds: a sparse file or a change past the run's limit is
/// refused before its bytes are hashed, and nothing of it stays on disk.
@Suite("Limits on what a run keeps", .requiresRoot)
struct ChangeLimitTests {
    func layerDirectories(_ t: TemporaryStore) throws -> Set<String> { Set(try FileSystem.list(t.store.layersPath)) }

    @Test("a huge sparse file is refused at once, not hashed for minutes, and leaves nothing")
    func sparseFile() async throws {
        let t = try TemporaryStore()
        _ = try t.busybox()
        let before = try layerDirectories(t)
        let run = try await t.sh("echo kept > /small; truncate -s 200G /big")
        #expect(run.record.exitCode == 0)
        #expect(run.record.resultImage == nil)
        #expect(run.record.discarded?.contains("/big is a sparse file") == true, "\(run.record)")
        #expect(try layerDirectories(t) == before)
        #expect(try FileSystem.list(t.store.tmpPath).isEmpty)
        #expect(try t.engine.record(run.record.id)?.discarded != nil)
    }

    @Test("no file grows past the layer limit while the run goes, and a larger change is not kept")
    func layerLimit() async throws {
        let t = try TemporaryStore()
        _ = try t.busybox()
        let before = try layerDirectories(t)
        let limit: Int64 = 1 << 20
        // One file past the limit: the kernel stops the write (SIGXFSZ).
        let one = try await t.sh("dd if=/dev/zero of=/one bs=1k count=2048 2>/dev/null; echo $?") {
            $0.limits.layerBytes = limit
        }
        #expect(one.out == "153\n", "dd: \(one.out) \(one.err)")
        // Files each under the limit, together over it: not kept, and the upper is gone.
        let many = try await t.sh("for i in 1 2 3; do dd if=/dev/zero of=/f$i bs=1k count=512 2>/dev/null; done") {
            $0.limits.layerBytes = limit
        }
        #expect(many.record.resultImage == nil)
        #expect(many.record.discarded?.contains("the most this run may keep") == true, "\(many.record)")
        #expect(try layerDirectories(t).subtracting(before).count <= 1)  // only the 1 MiB /one, if kept
        #expect(try FileSystem.list(t.store.tmpPath).isEmpty)
        // Under the limit, the change is kept as before.
        let small = try await t.sh("echo fine > /f") { $0.limits.layerBytes = limit }
        #expect(small.record.resultImage != nil && small.record.discarded == nil)
    }

    @Test("a run whose change grows past the limit is stopped while it goes")
    func stoppedWhileRunning() async throws {
        let t = try TemporaryStore()
        _ = try t.busybox()
        // Files under the per-file cap, endlessly: only the watch on the upper stops it.
        let run = try await t.sh(
            "i=0; while true; do dd if=/dev/zero of=/f$i bs=1k count=512 2>/dev/null; i=$((i+1)); done"
        ) {
            $0.limits.layerBytes = 4 << 20
            $0.timeout = 60
        }
        #expect(!run.record.timedOut && run.record.resultImage == nil)
        #expect(run.record.discarded?.contains("grew past") == true, "\(run.record)")
        #expect(try FileSystem.list(t.store.tmpPath).isEmpty)
    }

    @Test("a cancelled archive stops before it reads a file")
    func cancelledArchive() throws {
        let scratch = try ScratchDirectory()
        try scratch.write("tree/a", "x")
        let cancellation = Cancellation()
        cancellation.cancel("the run's timeout passed")
        let error = try #require(throws: SandboxError.self) {
            _ = try LayerArchiver.archive(
                directory: scratch.path + "/tree", budget: ArchiveBudget(cancellation: cancellation))
        }
        #expect(error.code == .cancelled && error.message.contains("timeout"))
    }
}

@Suite("Tags and gc", .requiresRoot)
struct TagRaceTests {
    @Test("a run's tag is written with its image: gc --prune-untagged running meanwhile never takes it")
    func tagInTheCommit() async throws {
        let t = try TemporaryStore()
        _ = try t.busybox()
        let engine = t.engine
        let store = t.store
        // gc blocks: on a thread of its own, not the cooperative pool the other tests share.
        let stop = Cancellation()
        let pruning = Task {
            try await BlockingPool.shared.run {
                while stop.reason == nil { _ = try? store.collectGarbage(pruneUntaggedOlderThan: 0) }
            }
        }
        let results = try await withThrowingTaskGroup(of: RunResult.self) { group in
            for i in 0..<12 {
                group.addTask {
                    var spec = RunSpec(image: "busybox", command: ["sh", "-c", "echo \(i) > /n"])
                    spec.tag = "run-\(i)"
                    return try await engine.run(spec)
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        stop.cancel("done")
        _ = await pruning.result
        for i in 0..<12 {
            let image = try #require(try t.store.findImage("run-\(i)"), "tag run-\(i) is gone")
            #expect(results.contains { $0.record.resultImage == image.uuid })
        }
    }

    @Test(
        "tags refuse '..' parts, control characters, NUL and direction overrides",
        arguments: [
            "../../x", "a/../b", "a\u{0}b", "a\u{202e}b", "a\nb", "",
        ])
    func badTags(_ name: String) throws {
        #expect(throws: SandboxError.self) { try Store.validateTag(name) }
    }
}
