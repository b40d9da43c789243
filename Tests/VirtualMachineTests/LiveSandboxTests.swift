import ContreeTestSupport
import Foundation
import Glibc
import ImageStore
import LiveSandbox
import Pipeline
import Sandbox
import Synchronization
import SystemSupport
import Testing

@testable import VirtualMachine

/// A fresh store whose `vm/` (kernel, templates) is the one the VM tests keep between runs.
private func liveStore() throws -> (LiveSandboxes, String) {
    let home = "/tmp/contree-live-test-" + UUID().uuidString.lowercased().prefix(12)
    try FileSystem.makeDirectories(home)
    try FileSystem.makeDirectories("/var/tmp/contree-vm-tests/vm")
    guard symlink("/var/tmp/contree-vm-tests/vm", home + "/vm") == 0 else { throw SandboxError.system("symlink") }
    let store = try Store(root: home)
    let sandboxes = try LiveSandboxes(store: store, baseImages: BaseImages(store: store), backend: VMBackend())
    return (sandboxes, home)
}

/// Runs `command` (a shell line) in the live sandbox; its stdout, and its exit status.
private func shell(
    _ sandboxes: LiveSandboxes, _ sandbox: LiveSandbox, _ command: String
) async throws -> (
    String, Int32?
) {
    let output = Mutex<[UInt8]>([])
    let outcome = try await BlockingPool.shared.run {
        let session = try sandboxes.session(sandbox)
        defer { session.close() }
        return try session.exec(
            argv: ["sh", "-c", command], env: sandbox.env, workdir: sandbox.workdir, uid: sandbox.uid, gid: sandbox.gid,
            stdin: .bytes([]), timeout: 60, onStdout: { bytes in output.withLock { $0 += bytes } }, onStderr: { _ in })
    }
    return (String(decoding: output.withLock { $0 }, as: UTF8.self), outcome.termination.exitCode)
}

/// A live VM sandbox of busybox whose main command is `sleep 1000`.
private func sleeper(_ sandboxes: LiveSandboxes) async throws -> LiveSandbox {
    var options = LiveSandboxes.StartOptions(image: "busybox")
    options.command = ["sleep", "1000"]
    return try await BlockingPool.shared.run { [options] in try sandboxes.start(options) }
}

/// The next number of the counter the main command serves on 127.0.0.1:7000.
private func next(_ sandboxes: LiveSandboxes, _ sandbox: LiveSandbox) async throws -> Int? {
    // The server answers one connection at a time: a client that comes while it loops retries.
    let (text, _) = try await shell(
        sandboxes, sandbox, "for i in $(seq 50); do nc 127.0.0.1 7000 </dev/null && exit 0; sleep 0.1; done; exit 1")
    return Int(text.trimmingCharacters(in: .whitespacesAndNewlines))
}

extension VMTests {
    @Suite(
        "Live sandboxes: a running VM snapshotted with its memory and forked (TCG here)", .serialized,
        .enabled(if: geteuid() == 0, "needs root"),
        .enabled(
            if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img"), "needs qemu-utils (scripts/setup)"))
    struct LiveSandboxTests {
        @Test(
            "a counter held in a process's memory, served on a loopback socket, is snapshotted and forked three ways: each child goes on from the same count and diverges alone; the parent is unaffected"
        )
        func forkCounter() async throws {
            let (sandboxes, home) = try liveStore()
            defer { try? FileSystem.removeTree(home) }
            var options = LiveSandboxes.StartOptions(image: "busybox")
            // The count lives only in the shell's memory; each connection gets the next number.
            options.command = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i | nc -l -p 7000; done"]
            let parent = try await BlockingPool.shared.run { [options] in try sandboxes.start(options) }
            var everything = [parent]
            defer { for sandbox in everything { try? sandboxes.stop(sandbox) } }
            #expect(try await next(sandboxes, parent) == 1)
            #expect(try await next(sandboxes, parent) == 2)
            #expect(try await shell(sandboxes, parent, "echo parent > /mark").1 == 0)
            let image = try await BlockingPool.shared.run { try sandboxes.snapshot(parent, tag: "counter") }
            #expect(image.parent == parent.image)
            let state = try #require(try sandboxes.store.state(of: image.uuid))
            #expect(FileSystem.isDirectory(state.path) && state.bytes > 0)

            let children = try await BlockingPool.shared.run { try sandboxes.fork("counter", count: 3) }
            everything += children
            #expect(children.count == 3 && Set(children.map(\.id)).count == 3)
            for child in children { #expect(sandboxes.isRunning(child)) }
            // Each child goes on from the snapshot's count, with the snapshot's files.
            for child in children {
                #expect(try await next(sandboxes, child) == 3)
                #expect(try await shell(sandboxes, child, "cat /mark").0 == "parent\n")
            }
            // They diverge: what one does, the others and the parent never see.
            #expect(try await next(sandboxes, children[0]) == 4)
            #expect(try await next(sandboxes, children[0]) == 5)
            #expect(try await shell(sandboxes, children[0], "echo zero > /mark").1 == 0)
            #expect(try await next(sandboxes, children[1]) == 4)
            #expect(try await shell(sandboxes, children[1], "cat /mark").0 == "parent\n")
            #expect(try await next(sandboxes, parent) == 3)
            #expect(try await shell(sandboxes, parent, "cat /mark").0 == "parent\n")
            // Each child has its own random state and the host's clock, not the snapshot's.
            var draws = Set<String>()
            for child in children {
                let (text, _) = try await shell(sandboxes, child, "head -c 16 /dev/urandom | od -An -tx1; date +%s")
                let lines = text.split(separator: "\n").map(String.init)
                draws.insert(lines.first ?? "")
                let guestTime = Double(lines.last ?? "") ?? 0
                #expect(abs(guestTime - Date().timeIntervalSince1970) < 30, "\(text)")
            }
            #expect(draws.count == 3)

            // The image's files alone start a plain run: the snapshot's changes are there.
            let engine = SandboxEngine(store: sandboxes.store, backends: [ContainerBackend()])
            let files = try await engine.run(RunSpec(image: image.uuid, command: ["cat", "/mark"], disposable: true))
            #expect(String(decoding: files.stdout, as: UTF8.self) == "parent\n")

            for sandbox in everything { try sandboxes.stop(sandbox) }
            #expect(try sandboxes.list().isEmpty)
            for sandbox in everything { #expect(!sandboxes.isRunning(sandbox)) }
            #expect(try FileSystem.list(home + "/live").isEmpty)
            // The store keeps the state while the image lives, and checks it.
            let report = try sandboxes.store.checkConsistency()
            #expect(report.isConsistent, "\(report.problems)")
            _ = try sandboxes.store.untag("counter")
            _ = try sandboxes.store.collectGarbage(pruneUntaggedOlderThan: 0)
            #expect(try sandboxes.store.state(of: image.uuid) == nil)
            #expect(!FileSystem.isDirectory(state.path))
        }

        @Test(
            "a pipeline step with persist: memory leaves a server running in its snapshot; a VM step from it talks to the resumed server, a container step starts from its files; a rerun is all cache hits"
        )
        func persistMemoryPipeline() async throws {
            let (sandboxes, home) = try liveStore()
            defer { try? FileSystem.removeTree(home) }
            let yaml = """
                name: warm
                image: busybox
                steps:
                  - id: server
                    isolation: vm
                    persist: memory
                    run: |
                      (i=0; while true; do i=$((i+1)); echo $i | nc -l -p 7000; done) >/dev/null 2>&1 &
                      for t in $(seq 50); do nc 127.0.0.1 7000 </dev/null && break; sleep 0.1; done
                      echo warmed > /warm
                  - id: client
                    from: server
                    isolation: vm
                    run: |
                      n=$(nc 127.0.0.1 7000 </dev/null)
                      echo "count=$n" >> $CONTREE_OUTPUT
                      cat /warm
                      test "$n" = 2
                  - id: files
                    from: server
                    run: |
                      cat /warm
                      if nc 127.0.0.1 7000 </dev/null; then echo "a server in a container step"; exit 1; fi
                """
            try FileSystem.writeFile(home + "/warm.yaml", Array(yaml.utf8))
            let engine = SandboxEngine(store: sandboxes.store, backends: [ContainerBackend(), VMBackend()])
            let plan = PipelinePlan(try PipelineParser.parse(file: home + "/warm.yaml"))
            let report = try await PipelineRunner(
                plan: plan, engine: engine, options: RunOptions(outDir: home + "/run")
            )
            .run()
            #expect(report.status == .passed, "\(report.nodes.map { "\($0.node): \($0.reason ?? "")" })")
            #expect(report.nodes.first { $0.node == "client" }?.outputs == ["count": "2"])
            let server = try #require(report.nodes.first { $0.node == "server" }?.resultImage)
            #expect(try sandboxes.store.state(of: server) != nil)
            let rerun = try await PipelineRunner(
                plan: plan, engine: engine, options: RunOptions(outDir: home + "/run2")
            ).run()
            #expect(rerun.status == .passed)
            #expect(rerun.nodes.allSatisfy { $0.cached }, "\(rerun.nodes.map { "\($0.node): \($0.cached)" })")
            #expect(try sandboxes.store.checkConsistency().isConsistent)
            // Nothing of the steps' VMs is left running.
            let qemus = try FileSystem.list("/proc").filter { Int($0) != nil }.filter { pid in
                let line = (try? FileSystem.readFile("/proc/\(pid)/cmdline")) ?? []
                return String(decoding: line, as: UTF8.self).contains(home)
            }
            #expect(qemus.isEmpty)
        }

        @Test(
            "the agent's edges: a put resolves inside the root (an image's link and .. stay in it), a large file arrives whole, a bad put is an error the session survives; a command that reads none of a large stdin still times out; a background writer does not hold its command's end; a host cut mid-frame leaves a port the next host realigns"
        )
        func agentEdges() async throws {
            let (sandboxes, home) = try liveStore()
            defer { try? FileSystem.removeTree(home) }
            let sandbox = try await sleeper(sandboxes)
            defer { try? sandboxes.stop(sandbox) }
            // Links that lead out of the root as the agent (not chrooted) would see them.
            #expect(try await shell(sandboxes, sandbox, "ln -s / /out && ln -s ../../.. /up && mkdir /dir").1 == 0)
            let large = (0..<(3 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 11) }
            try await BlockingPool.shared.run {
                let session = try sandboxes.session(sandbox)
                defer { session.close() }
                try session.put("/out/through-link", mode: 0o640, uid: 5, gid: 6, bytes: Array("in the root\n".utf8))
                try session.put("/up/x/../../dotdot", mode: 0o644, uid: 0, gid: 0, bytes: Array("still\n".utf8))
                try session.put("/made/parents", mode: 0o750, uid: 0, gid: 0, bytes: nil)
                try session.put("/made/parents/large", mode: 0o600, uid: 0, gid: 0, bytes: large)
                let onDirectory = #expect(throws: SandboxError.self) {
                    try session.put("/dir", mode: 0o644, uid: 0, gid: 0, bytes: [1, 2, 3])
                }
                #expect(
                    onDirectory?.message.contains("could not put /dir") == true, "\(String(describing: onDirectory))")
            }
            let (listing, status) = try await shell(
                sandboxes, sandbox,
                "cat /through-link /dotdot; stat -c '%a %u:%g' /through-link /made/parents; sha256sum < /made/parents/large"
            )
            #expect(status == 0)
            let expected = Digest.sha256(large).hex
            #expect(listing == "in the root\nstill\n640 5:6\n750 0:0\n\(expected)  -\n", "\(listing)")

            // 4 MiB of stdin to a command that reads none: the timeout still ends it.
            let started = Monotonic.now
            let starved = try await BlockingPool.shared.run {
                let session = try sandboxes.session(sandbox)
                defer { session.close() }
                return try session.exec(
                    argv: ["sleep", "600"], env: sandbox.env, workdir: "/", uid: 0, gid: 0,
                    stdin: .bytes([UInt8](repeating: 120, count: 4 << 20)), timeout: 3, onStdout: { _ in },
                    onStderr: { _ in })
            }
            #expect(starved.termination.timedOut)
            #expect(Monotonic.now - started < 30, "the timeout was held up for \(Monotonic.now - started) s")
            // A writer left running after its command exits: the command's end is reported at once.
            let (echoed, writerStatus) = try await shell(sandboxes, sandbox, "yes & echo started")
            #expect(writerStatus == 0 && echoed.contains("started"))
            let (after, afterStatus) = try await shell(sandboxes, sandbox, "killall yes; ps -o comm | grep -c ^sleep$")
            #expect(afterStatus == 0)
            #expect(after == "1\n", "only the main sleep is left: \(after)")

            // A host that dies mid-frame (its session left "dirty"): the next one realigns the port.
            let directory = sandboxes.store.root + "/live/" + sandbox.id
            let lock = open(directory + "/session-0.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            #expect(lock >= 0 && flock(lock, LOCK_EX) == 0)
            var dirty = UInt8(ascii: "d")
            _ = pwrite(lock, &dirty, 1, 0)
            let socket = try LiveVM.socket(directory, "agent.sock")
            try FileSystem.writeAll(fd: socket, [UInt8(ascii: "Q"), 0, 0, 1, 0] + Array("Wfrag".utf8), path: "socket")
            close(socket)
            close(lock)
            let (realigned, realignedStatus) = try await shell(sandboxes, sandbox, "echo aligned")
            #expect(realigned == "aligned\n" && realignedStatus == 0)
        }

        @Test(
            "persist: memory without isolation: vm is refused with the file, line and column"
        )
        func persistNeedsVM() async throws {
            let (sandboxes, home) = try liveStore()
            defer { try? FileSystem.removeTree(home) }
            let yaml = "name: bad\nimage: busybox\nsteps:\n  - id: server\n    persist: memory\n    run: sleep 1 &\n"
            try FileSystem.writeFile(home + "/bad.yaml", Array(yaml.utf8))
            let engine = SandboxEngine(store: sandboxes.store, backends: [ContainerBackend(), VMBackend()])
            let plan = PipelinePlan(try PipelineParser.parse(file: home + "/bad.yaml"))
            let error = await #expect(throws: PipelineValidationError.self) {
                _ = try await PipelineRunner(plan: plan, engine: engine, options: RunOptions(outDir: home + "/run"))
                    .run()
            }
            #expect("\(error.map { "\($0)" } ?? "")".contains("bad.yaml:5:14"), "\(String(describing: error))")
            #expect("\(error.map { "\($0)" } ?? "")".contains("isolation: vm"))
        }

        @Test("a live sandbox whose template will not restore starts from one made again, a new generation")
        func damagedTemplate() async throws {
            let (sandboxes, home) = try liveStore()
            defer { try? FileSystem.removeTree(home) }
            let damaged = try VMBackend().machine(storeRoot: home, memoryBytes: nil).1
            try FileSystem.writeFile(damaged.state, Array("not a migration stream".utf8), mode: 0o644)
            let sandbox = try await sleeper(sandboxes)
            defer { try? sandboxes.stop(sandbox) }
            let (out, status) = try await shell(sandboxes, sandbox, "echo alive")
            #expect(status == 0 && out == "alive\n")
            let remade = try VMBackend().machine(storeRoot: home, memoryBytes: nil).1
            #expect(remade.state != damaged.state && !FileSystem.exists(damaged.state))
        }

        @Test(
            "bad cases: a snapshot of a sandbox whose VM ended, a fork of an image without memory: clear errors, nothing left running; a killed run's detached VM is ended by the next command"
        )
        func badCases() async throws {
            let (sandboxes, home) = try liveStore()
            defer { try? FileSystem.removeTree(home) }
            let sandbox = try await sleeper(sandboxes)
            defer { try? sandboxes.stop(sandbox) }
            kill(sandbox.pid, SIGKILL)
            for _ in 0..<200 where sandboxes.isRunning(sandbox) { usleep(10_000) }
            #expect(!sandboxes.isRunning(sandbox))
            let ended = #expect(throws: SandboxError.self) { try sandboxes.snapshot(sandbox, tag: nil) }
            #expect(ended?.code == .conflict)
            #expect(ended?.message.contains("not running") == true && ended?.message.contains("sandbox stop") == true)
            #expect(try sandboxes.store.listImages().allSatisfy { try sandboxes.store.state(of: $0.uuid) == nil })
            try sandboxes.stop(sandbox)
            #expect(try sandboxes.list().isEmpty)

            // A run resumed in a detached VM whose process is killed: the next command ends the VM.
            let live = try await sleeper(sandboxes)
            let snapshot = try await BlockingPool.shared.run { try sandboxes.snapshot(live, tag: "sleeper") }
            try sandboxes.stop(live)
            let run = try ChildProcess.spawn(
                [Paths.cli, "exec", "--isolation", "vm", "--resume", "--image", snapshot.uuid, "--", "sleep", "300"],
                environment: ["CONTREE_HOME=" + home, "PATH=/usr/sbin:/usr/bin:/sbin:/bin"], captureStdout: true)
            func detachedVMs() -> [String] {
                ((try? FileSystem.list("/proc")) ?? []).filter { pid in
                    Int(pid) != nil
                        && String(decoding: (try? FileSystem.readFile("/proc/\(pid)/cmdline")) ?? [], as: UTF8.self)
                            .contains(home + "/tmp/")
                }
            }
            for _ in 0..<600 where detachedVMs().isEmpty { usleep(20_000) }
            #expect(!detachedVMs().isEmpty)
            usleep(500_000)
            kill(run.pid, SIGKILL)
            _ = try? ChildProcess.wait(run.pid, "contree-pipeline exec")
            _ = try ChildProcess.run([Paths.cli, "image", "ls"], environment: ["CONTREE_HOME=" + home])
            for _ in 0..<100 where !detachedVMs().isEmpty { usleep(20_000) }
            #expect(detachedVMs().isEmpty, "a killed run's VM is ended by the next command")

            let fileOnly = #expect(throws: SandboxError.self) { try sandboxes.fork("busybox", count: 2) }
            #expect(fileOnly?.message.contains("holds files only") == true, "\(String(describing: fileOnly))")
            #expect(try sandboxes.list().isEmpty)
            #expect(try !FileSystem.exists(home + "/live") || FileSystem.list(home + "/live").isEmpty)
            #expect(try sandboxes.store.checkConsistency().isConsistent)
        }
    }
}

@Suite("Live container sandboxes: held by a detached process, entered by exec, stopped", .requiresRoot)
struct LiveContainerTests {
    @Test(
        "a container sandbox keeps its main command and what an exec leaves running between execs; its files persist; a memory snapshot is refused with what to do; stop ends everything and forgets it"
    )
    func containerSandbox() async throws {
        let home = "/tmp/contree-live-test-" + UUID().uuidString.lowercased().prefix(12)
        defer { try? FileSystem.removeTree(home) }
        let store = try Store(root: home)
        let sandboxes = try LiveSandboxes(
            store: store, baseImages: BaseImages(store: store), backend: VMBackend(), holder: [Paths.cli])
        var options = LiveSandboxes.StartOptions(image: "busybox")
        options.isolation = .container
        options.command = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"]
        options.env = ["GREETING": "hello"]
        let sandbox = try await BlockingPool.shared.run { [options] in try sandboxes.start(options) }
        defer { try? sandboxes.stop(sandbox) }
        #expect(sandbox.isolation == .container && sandboxes.isRunning(sandbox))
        #expect(try sandboxes.list().map(\.id) == [sandbox.id])

        func run(_ line: String) async throws -> (String, Int32?) {
            let output = Mutex<[UInt8]>([])
            let spec = ExecSpec(
                command: ["sh", "-c", line], environment: sandbox.env, cwd: sandbox.workdir, uid: sandbox.uid,
                gid: sandbox.gid,
                stdout: .capture(limit: 1 << 20, onChunk: { chunk in output.withLock { $0 += chunk } }),
                timeout: 60)
            let outcome = try await sandboxes.execContainer(sandbox, spec)
            return (String(decoding: output.withLock { $0 }, as: UTF8.self), outcome.termination.exitCode)
        }
        #expect(try await run("echo $GREETING > /kept; sleep 300 >/dev/null 2>&1 & echo started") == ("started\n", 0))
        let (seen, status) = try await run("cat /kept; ps -o args | grep -c '^sleep 300'; hostname")
        #expect(status == 0 && seen == "hello\n1\nsandbox\n", "\(seen)")
        #expect(try await run("exit 3").1 == 3)
        let log = String(decoding: try FileSystem.readFile(home + "/live/" + sandbox.id + "/main.log"), as: UTF8.self)
        #expect(log.contains("tick 1\n"), "\(log)")

        let refused = #expect(throws: SandboxError.self) { try sandboxes.snapshot(sandbox, tag: nil) }
        #expect(refused?.message.contains("--isolation vm") == true, "\(String(describing: refused))")
        #expect(try store.listImages().count == 1, "nothing was committed")

        let holder = sandbox.pid
        try sandboxes.stop(sandbox)
        #expect(ChildProcess.startTicks(of: holder) == nil)
        #expect(try sandboxes.list().isEmpty && !FileSystem.exists(home + "/live/" + sandbox.id))
        let stopped = await #expect(throws: SandboxError.self) { try await run("true") }
        #expect(stopped?.code == .conflict, "\(String(describing: stopped))")
        let leftovers = try FileSystem.list("/proc").filter { Int($0) != nil }.filter { pid in
            let line = (try? FileSystem.readFile("/proc/\(pid)/cmdline")) ?? []
            return String(decoding: line, as: UTF8.self).contains("tick")
        }
        #expect(leftovers.isEmpty, "the main command outlived stop: \(leftovers)")
        #expect(try store.checkConsistency().isConsistent)
    }
}
