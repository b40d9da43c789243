import ContreeTestSupport
import Foundation
import ImageStore
import Registry
import RegistryCache
import SystemSupport
import Testing

@testable import Pipeline

/// A pipeline with outputs, an artifact, a fork scored by a command, and a step after it.
private let searchPipeline = """
    image: busybox
    defaults:
      workdir: /w
    steps:
      - id: prepare
        run: echo 2 > input; echo size=2 >> $CONTREE_OUTPUT
      - id: try
        fork:
          low:
            run: echo 1 > guess
          high:
            run: echo 3 > guess
        select:
          score: echo $(( $(cat guess) * 10 ))
          keep: best
          order: lowest
      - id: report
        run: |
          echo "size ${{ steps.prepare.outputs.size }}, guess $(cat guess)" > report.txt
          date +%s%N >> report.txt
        artifacts: [report.txt]
    """

@Suite("A registry as a shared step cache (--cache-to / --cache-from)", .requiresRoot)
struct SharedCacheTests {
    @Test("another store turns a pushed run into hits: same snapshots, outputs, scores and artifacts, nothing executed")
    func roundTrip() async throws {
        let registry = try await BlockingPool.shared.run { try LocalRegistry() }
        let location = "docker://127.0.0.1:\(registry.port)/ci/cache"
        let first = try Workspace()
        let pushed = try await first.run(
            searchPipeline,
            options: RunOptions(cacheTo: try RegistryStepCache(location, store: first.store, pushing: true)))
        #expect(pushed.status == .passed)
        let export = try #require(pushed.cacheExport)
        // prepare, try.low, try.high, report (the selection has no snapshot of its own) and two scores.
        #expect(export.error == nil && export.pushed == 6 && export.present == 0, "\(export)")

        // Another machine: nothing cached, --fail-on-cache-miss proves nothing runs.
        let second = try Workspace()
        let pulled = try await second.run(
            searchPipeline,
            options: RunOptions(
                failOnCacheMiss: true, cacheFrom: [try RegistryStepCache(location, store: second.store)]))
        #expect(pulled.status == .passed, "\(pulled.nodes.map { "\($0.node): \($0.reason ?? "")" })")
        #expect(pulled.ran.isEmpty)
        #expect(pulled.node("prepare")?.cachedFrom == location)
        #expect(pulled.node("prepare")?.outputs == ["size": "2"])
        #expect(pulled.node("try")?.variants?.first { $0.kept }?.variant == "low")
        for id in ["prepare", "try.low", "try.high", "report"] {
            let aUUID = try #require(pushed.node(id)?.resultImage)
            let bUUID = try #require(pulled.node(id)?.resultImage)
            let a = try #require(try first.store.image(aUUID))
            let b = try #require(try second.store.image(bUUID))
            #expect(StepKeyComponents.imageDigest(a) == StepKeyComponents.imageDigest(b), "\(id)")
            #expect(pushed.node(id)?.key == pulled.node(id)?.key)
        }
        // The artifact is read from the imported snapshot: the first run's bytes (with its timestamp).
        let original = try #require(pushed.node("report")?.artifacts.first)
        let copy = try #require(pulled.node("report")?.artifacts.first)
        #expect(original.sha256 == copy.sha256)
        #expect(
            try String(contentsOfFile: pulled.outDir + "/" + copy.file, encoding: .utf8).hasPrefix("size 2, guess 1"))
        // The hits are this store's now: a rerun needs no registry.
        let local = try await second.run(searchPipeline, options: RunOptions(failOnCacheMiss: true))
        #expect(local.status == .passed && local.nodes.allSatisfy { $0.cachedFrom == nil })
        #expect(try second.store.checkConsistency().isConsistent)

        // Pushing again from either store adds nothing.
        let again = try await second.run(
            searchPipeline,
            options: RunOptions(cacheTo: try RegistryStepCache(location, store: second.store, pushing: true)))
        #expect(again.cacheExport?.pushed == 0 && again.cacheExport?.present == 6)
    }

    @Test(
        "a change on the second machine runs from the first changed step on; what is before it comes from the registry")
    func partialHit() async throws {
        let registry = try await BlockingPool.shared.run { try LocalRegistry() }
        let location = "docker://127.0.0.1:\(registry.port)/ci/cache"
        let pipeline =
            "image: busybox\nsteps:\n  - id: a\n    run: echo a > /a\n  - id: b\n    run: echo b > /b\n  - id: c\n    run: cat /a /b\n"
        let first = try Workspace()
        // A failing last step: what passed before it is still pushed, and the run still fails.
        let failed = try await first.run(
            pipeline.replacingOccurrences(of: "cat /a /b", with: "exit 3"),
            options: RunOptions(cacheTo: try RegistryStepCache(location, store: first.store, pushing: true)))
        #expect(failed.status == .failed && failed.cacheExport?.pushed == 2)
        let second = try Workspace()
        let report = try await second.run(
            pipeline.replacingOccurrences(of: "echo b > /b", with: "echo B > /b"),
            options: RunOptions(cacheFrom: [try RegistryStepCache(location, store: second.store)]))
        #expect(report.status == .passed)
        #expect(report.hits == ["a"] && report.ran == ["b", "c"])
        #expect(report.log("c").contains("a\nB\n"))
    }

    @Test("after fail-fast stopped a running step, what passed is pushed and the rest is listed with why")
    func pushAfterFailFast() async throws {
        let registry = try await BlockingPool.shared.run { try LocalRegistry() }
        let location = "docker://127.0.0.1:\(registry.port)/ci/cache"
        let w = try Workspace()
        let report = try await w.run(
            """
            image: busybox
            steps:
              - id: setup
                run: echo ready > /ready
              - id: unit
                run: sleep 0.5; exit 1
              - id: slow
                from: setup
                run: sleep 120
            """,
            options: RunOptions(cacheTo: try RegistryStepCache(location, store: w.store, pushing: true)))
        #expect(report.status == .failed)
        #expect(report.node("slow")?.status == .cancelled)
        let export = try #require(report.cacheExport)
        #expect(export.error == nil && export.pushed == 1, "\(export)")
        #expect(export.notPushed?["unit"]?.hasPrefix("failed") == true)
        #expect(export.notPushed?["slow"]?.contains("fail-fast") == true)
    }

    @Test(
        "an unreachable cache costs a note and a run, never the result; a tag that is not a cache entry is not trusted")
    func unreachableAndForeign() async throws {
        let w = try Workspace()
        // Nothing listens on port 9 of loopback.
        let dead = "docker://127.0.0.1:9/ci/cache"
        let report = try await w.run(
            "image: busybox\nsteps:\n  - id: a\n    run: echo ran\n",
            options: RunOptions(
                cacheFrom: [try RegistryStepCache(dead, store: w.store)],
                cacheTo: try RegistryStepCache(dead, store: w.store, pushing: true)))
        #expect(report.status == .passed && report.ran == ["a"])
        #expect(
            report.log("a").contains("could not give step") && report.log("a").contains("cannot reach the registry"))
        #expect(report.cacheExport?.error?.contains("cannot reach the registry") == true)

        // An ordinary image pushed under a step's tag is refused (its key annotation is missing).
        let registry = try await BlockingPool.shared.run { try LocalRegistry() }
        let location = "docker://127.0.0.1:\(registry.port)/ci/cache"
        let key = try #require(report.node("a")?.key)
        let busybox = try w.engine.baseImages.resolve("busybox")
        try RegistryPusher(store: w.store).push(busybox, to: "\(location):step-\(key.dropFirst(7))")
        let other = try Workspace()
        let rerun = try await other.run(
            "image: busybox\nsteps:\n  - id: a\n    run: echo ran\n",
            options: RunOptions(cacheFrom: [try RegistryStepCache(location, store: other.store)]))
        #expect(rerun.ran == ["a"])
        #expect(rerun.log("a").contains("is not a step cache entry"))
        #expect { try RegistryStepCache(location + ":v1", store: w.store) } throws: {
            "\($0)".contains("name the repository alone")
        }
    }
}

@Suite(
    "run --cache-to / --cache-from on the command line", .requiresRoot,
    .enabled(if: FileManager.default.fileExists(atPath: CLI.binary), "needs `swift build` first"))
struct SharedCacheCLITests {
    @Test("the flags push and pull through a registry; a reference with a tag is refused before anything runs")
    func flags() async throws {
        let registry = try await BlockingPool.shared.run { try LocalRegistry() }
        let location = "docker://127.0.0.1:\(registry.port)/team/cache"
        let w = try Workspace()
        try w.write(
            "p.yaml", "image: busybox\nsteps:\n  - id: a\n    run: echo one > /one\n  - id: b\n    run: cat /one\n")
        let push = try await CLI.run(["run", "p.yaml", "--cache-to", location], home: w.root + "/a", in: w.project)
        #expect(push.status == 0, "\(push.err)")
        #expect(push.err.contains("cache: 2 pushed to \(location), 0 already there"))
        let pull = try await CLI.run(
            ["run", "p.yaml", "--cache-from", location, "--fail-on-cache-miss"], home: w.root + "/b", in: w.project)
        #expect(pull.status == 0, "\(pull.out)\(pull.err)")
        #expect(pull.out.contains("0 ran, 2 cached"))
        let tagged = try await CLI.run(
            ["run", "p.yaml", "--cache-to", location + ":latest"], home: w.root + "/b", in: w.project)
        #expect(tagged.status == 2 && tagged.err.contains("name the repository alone"))
    }

    @Test("Ctrl-C while a run imports its image from a registry stops the download and exits 130, leaving nothing")
    func interruptedImport() async throws {
        let registry = try await BlockingPool.shared.run { try LocalRegistry() }
        let w = try Workspace()
        // busybox from another store, pushed; every large blob then stalls behind the proxy.
        let exported = try await CLI.run(
            ["image", "export", "busybox", "oci:\(w.root)/layout:v1"], home: w.root + "/other", in: w.project)
        #expect(exported.status == 0, "\(exported.err)")
        _ = try skopeo([
            "copy", "--dest-tls-verify=false", "oci:\(w.root)/layout:v1",
            "docker://127.0.0.1:\(registry.port)/lib/box:1",
        ])
        let proxy = try await BlockingPool.shared.run { try StallingProxy(upstreamPort: registry.port) }
        try w.write(
            "p.yaml", "image: docker://127.0.0.1:\(proxy.port)/lib/box:1\nsteps:\n  - id: a\n    run: echo never\n")
        var env = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") }
        env.append("CONTREE_HOME=\(w.root)/fresh")
        let child = try ChildProcess.spawn(
            [CLI.binary, "run", w.project + "/p.yaml", "--out", w.root + "/out"], environment: env,
            captureStdout: false, stdoutFD: open("/dev/null", O_WRONLY | O_CLOEXEC))
        let ended = try await interruptDuringDownload(
            pid: child.pid, stderr: child.stderr, storeRoot: w.root + "/fresh")
        #expect(ended.downloading)
        #expect(ended.status == 130, "\(ended.stderr)")
        #expect(ended.stderr.contains("nothing was imported"), "\(ended.stderr)")
        #expect(ended.seconds < 20)  // not the proxy's minute
        #expect(try Store(root: w.root + "/fresh").listImages().isEmpty)
    }

    @Test("--cache-to pushes each dependency cache as cache-NAME; --cache-from fills a fresh store's before steps run")
    func dependencyCaches() async throws {
        let registry = try await BlockingPool.shared.run { try LocalRegistry() }
        let location = "docker://127.0.0.1:\(registry.port)/ci/cache"
        let yaml = """
            caches:
              deps: {path: /deps}
            steps:
              - id: fill
                caches: [deps]
                cache: false
                run: ls /deps; mkdir -p /deps/sub && echo "$(cat /deps/sub/n 2>/dev/null)x" > /deps/sub/n
            """
        let first = try Workspace()
        let pushed = try await first.run(
            yaml, options: RunOptions(cacheTo: try RegistryStepCache(location, store: first.store, pushing: true)))
        #expect(pushed.status == .passed)
        #expect(pushed.cacheExport?.caches == ["deps"], "\(String(describing: pushed.cacheExport))")

        // A fresh CI machine starts warm.
        let second = try Workspace()
        let pulled = try await second.run(
            yaml, options: RunOptions(cacheFrom: [try RegistryStepCache(location, store: second.store)]))
        #expect(pulled.status == .passed)
        #expect(pulled.notes.contains { $0.contains("cache deps: restored from") }, "\(pulled.notes)")
        #expect(pulled.log("fill").contains("sub"))
        #expect(try String(contentsOfFile: second.store.root + "/caches/deps/sub/n", encoding: .utf8) == "xx\n")
        // A cache that has content here is never replaced.
        let again = try await second.run(
            yaml, options: RunOptions(cacheFrom: [try RegistryStepCache(location, store: second.store)]))
        #expect(again.notes.isEmpty)
        #expect(try String(contentsOfFile: second.store.root + "/caches/deps/sub/n", encoding: .utf8) == "xxx\n")
    }
}
