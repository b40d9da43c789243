import ContreeTestSupport
import Foundation
import Glibc
import ImageStore
import Testing

@testable import Pipeline

/// Where a run's reports go, what a rerun costs there, and how old runs and cache entries go away.
@Suite(
    "Run folders and their upkeep", .requiresRoot, .serialized,
    .enabled(if: FileManager.default.fileExists(atPath: CLI.binary), "needs `swift build` first"))
struct RunFolderTests {
    @Test("a read-only checkout: the run says the reports cannot go beside the file and names --out")
    func readOnlyCheckout() async throws {
        let w = try Workspace()
        try w.write("ci.yaml", "steps:\n  - id: a\n    run: echo fine\n")
        // A read-only bind mount of the checkout (root ignores permission bits).
        #expect(mount(w.project, w.project, nil, UInt(MS_BIND), nil) == 0)
        defer { umount2(w.project, Int32(MNT_DETACH)) }
        #expect(mount(nil, w.project, nil, UInt(MS_BIND | MS_REMOUNT | MS_RDONLY), nil) == 0)
        let refused = try await CLI.run(["run", "ci.yaml"], home: w.root + "/store", in: w.project)
        #expect(refused.status == 2)
        #expect(refused.err.contains("cannot be written"), "\(refused.err)")
        #expect(refused.err.contains("Read-only file system") && refused.err.contains("--out"), "\(refused.err)")
        let elsewhere = try await CLI.run(
            ["run", "ci.yaml", "--out", w.root + "/reports"], home: w.root + "/store", in: w.project)
        #expect(elsewhere.status == 0, "\(elsewhere.err)")
    }

    @Test("a cached rerun links its unchanged artifacts instead of copying them; an edited copy is copied afresh")
    func artifactsLinked() async throws {
        let w = try Workspace()
        let yaml = """
            steps:
              - id: build
                run: head -c 3000000 /dev/urandom > /workspace/big.bin; echo small > /workspace/note.txt
                artifacts: [big.bin, note.txt, "*.bin"]
            """
        let first = try await w.run(yaml)
        let second = try await w.run()
        #expect(second.hits == ["build"])
        func status(_ report: RunReport, _ name: String) throws -> stat {
            let record = try #require(report.node("build")?.artifacts.first { $0.path.hasSuffix(name) })
            var s = stat()
            #expect(lstat(report.outDir + "/" + record.file, &s) == 0)
            return s
        }
        let a = try status(first, "big.bin")
        let b = try status(second, "big.bin")
        #expect(a.st_ino == b.st_ino && b.st_nlink == 2, "the second run linked the first run's copy")
        #expect(second.node("build")?.artifacts.count == 2, "a file two patterns match is exported once")
        #expect(
            second.node("build")?.artifacts.map(\.sha256).sorted()
                == first.node("build")?.artifacts.map(\.sha256).sorted())
        // Someone edits the second run's copy (the first run's with it): the third run copies again.
        let edited = try #require(second.node("build")?.artifacts.first { $0.path.hasSuffix("note.txt") })
        try "edited\n".write(toFile: second.outDir + "/" + edited.file, atomically: false, encoding: .utf8)
        let third = try await w.run()
        let note = try #require(third.node("build")?.artifacts.first { $0.path.hasSuffix("note.txt") })
        #expect(try String(contentsOfFile: third.outDir + "/" + note.file, encoding: .utf8) == "small\n")
        #expect(try status(third, "note.txt").st_nlink == 1)
        #expect(try status(third, "big.bin").st_ino == a.st_ino)
    }

    @Test(
        "an artifacts: pattern that matches nothing is a warning in the summary, and a failure with --strict-artifacts")
    func missingArtifacts() async throws {
        let w = try Workspace()
        try w.write(
            "ci.yaml", "steps:\n  - id: build\n    run: echo built > /workspace/app\n    artifacts: [app, dist/*.whl]\n"
        )
        let home = w.root + "/store"
        let lenient = try await CLI.run(["run", "ci.yaml"], home: home, in: w.project)
        #expect(lenient.status == 0, "\(lenient.err)")
        #expect(
            lenient.out.contains("warning: build: artifact 'dist/*.whl' matched nothing in its snapshot"),
            "\(lenient.out)")
        let strict = try await CLI.run(["run", "ci.yaml", "--strict-artifacts", "--json"], home: home, in: w.project)
        #expect(strict.status == 1)
        let report = try JSONSerialization.jsonObject(with: Data(strict.out.utf8)) as? [String: Any]
        let node = (report?["steps"] as? [[String: Any]])?.first
        #expect(node?["missing_artifacts"] as? [String] == ["dist/*.whl"])
        #expect((node?["reason"] as? String)?.contains("--strict-artifacts") == true)
    }

    @Test(
        "runs prune --keep and --older-than forget runs and remove their folders; gc --prune-cache drops old cache entries"
    )
    func pruning() async throws {
        let w = try Workspace()
        let home = w.root + "/store"
        try w.write("ci.yaml", "steps:\n  - id: a\n    run: echo one > /one\n")
        var folders: [String] = []
        for _ in 0..<3 {
            let run = try await CLI.run(["run", "ci.yaml", "--json"], home: home, in: w.project)
            #expect(run.status == 0, "\(run.err)")
            let report = try JSONSerialization.jsonObject(with: Data(run.out.utf8)) as? [String: Any]
            folders.append(try #require(report?["out_dir"] as? String))
        }
        let kept = try await CLI.run(["runs", "prune", "--keep", "1"], home: home, in: w.project)
        #expect(kept.status == 0, "\(kept.err)")
        #expect(kept.out.contains("forgot 2 runs, removed 2 folders"), "\(kept.out)")
        #expect(
            !FileManager.default.fileExists(atPath: folders[0]) && !FileManager.default.fileExists(atPath: folders[1]))
        #expect(FileManager.default.fileExists(atPath: folders[2]))
        let listed = try await CLI.run(["runs"], home: home, in: w.project)
        #expect(listed.out.split(separator: "\n").count == 2, "\(listed.out)")
        let old = try await CLI.run(["runs", "prune", "--older-than", "0s"], home: home, in: w.project)
        #expect(old.out.contains("forgot 1 run, removed 1 folder"), "\(old.out)")
        let none = try await CLI.run(["runs", "prune"], home: home, in: w.project)
        #expect(none.status == 2 && none.err.contains("--keep"))

        // The step is cached; gc --prune-cache 0s drops the entry and its snapshot, so it runs again.
        let store = try Store(root: home)
        let images = try store.listImages().count
        let gc = try await CLI.run(["gc", "--prune-cache", "0s"], home: home, in: w.project)
        #expect(gc.status == 0, "\(gc.err)")
        #expect(gc.out.contains("dropped 1 entry and"), "\(gc.out)")
        #expect(try store.listImages().count == images - 1)
        let rerun = try await CLI.run(["run", "ci.yaml"], home: home, in: w.project)
        #expect(rerun.out.contains("1 ran, 0 cached"), "\(rerun.out)")
        let bad = try await CLI.run(["gc", "--prune-cache", "soon"], home: home, in: w.project)
        #expect(bad.status == 2 && bad.err.contains("--prune-cache takes an age"))
    }
}
