import ContreeTestSupport
import Foundation
import Glibc
import ImageStore
import Pipeline
import Sandbox
import Synchronization
import SystemSupport
import Testing

@testable import VirtualMachine

/// A store kept between test runs: the guest kernel is downloaded and unpacked once.
private func vmStore() throws -> Store { try Store(root: "/var/tmp/contree-vm-tests") }

/// Every VM suite in one serialized parent: on 2 cores, emulated guests side by side only slow
/// each other, and the check that no QEMU outlives its runs must see only its own.
@Suite(
    "VM backend (QEMU under TCG here: each boot costs seconds)", .serialized,
    .enabled(if: geteuid() == 0, "needs root"),
    .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64"), "needs qemu-system-x86"))
enum VMTests {}

extension VMTests {
    @Suite(
        "VM backend: one command in a QEMU microvm (TCG here: each boot costs seconds)", .serialized,
        .enabled(if: geteuid() == 0, "needs root"),
        .enabled(
            if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64"), "needs qemu-system-x86"))
    struct MicroVMTests {
        @Test("the kit: Debian's kernel decompressed to an ELF, modules after their dependencies")
        func kit() async throws {
            let store = try vmStore()
            let kit = try await BlockingPool.shared.run { try GuestKit.prepare(store: store) }
            #expect(try FileSystem.readFile(kit.kernel).prefix(4).elementsEqual([0x7F, 0x45, 0x4C, 0x46]))
            let order = try GuestKit.moduleOrder(
                in: store.root + "/vm/kernel-\(kit.release)/lib/modules/\(kit.release)"
            )
            .map(\.name)
            for (module, dependency) in [("ext4", "jbd2"), ("virtio_blk", "virtio_ring"), ("erofs", "libcrc32c")] {
                let a = try #require(order.firstIndex(of: module))
                let b = try #require(order.firstIndex(of: dependency))
                #expect(b < a, "\(dependency) loads before \(module)")
            }
            // The agent is a small static C program, without the Swift runtime: the initramfs
            // (held twice while the kernel unpacks it) stays small enough for a 128 MiB guest.
            #expect(try FileSystem.status(try GuestKit.agentProgram())!.st_size < 2 << 20)
            #expect(try FileSystem.status(kit.initramfs)!.st_size < 8 << 20)
        }

        @Test("the smallest guest, 128 MiB, boots the kit and runs a command")
        func smallestGuest() async throws {
            let engine = SandboxEngine(store: try vmStore(), backends: [VMBackend()])
            var spec = RunSpec(image: "busybox", command: ["sh", "-c", "grep MemTotal /proc/meminfo"])
            spec.isolation = .vm
            spec.limits.memoryBytes = 128 << 20
            spec.disposable = true
            spec.timeout = 120
            let run = try await engine.run(spec)
            #expect(run.record.exitCode == 0, "\(String(decoding: run.stderr, as: UTF8.self))")
            let kib = Int(String(decoding: run.stdout, as: UTF8.self).filter(\.isNumber)) ?? 0
            #expect(kib > 64 << 10 && kib < 128 << 10, "MemTotal: \(kib) kB")
        }

        @Test("a command runs over the image's layers: stdout and stderr apart, stdin in, the exit status out")
        func command() async throws {
            let store = try vmStore()
            let kit = try await BlockingPool.shared.run { try GuestKit.prepare(store: store) }
            let busybox = try BaseImages(store: store).resolve("busybox")
            let layers = try busybox.layers.map { try ErofsLayers.image(of: $0, store: store) }
            let out = Mutex<[UInt8]>([])
            let err = Mutex<[UInt8]>([])
            let outcome = try await BlockingPool.shared.run {
                try MicroVM(kit: kit).run(
                    .init(
                        argv: ["sh", "-c", "echo hello from $(uname -r); echo oops >&2; cat; cd /tmp && pwd; exit 3"],
                        env: ["GREETING=hi"], layers: layers),
                    stdin: .bytes(Array("piped in\n".utf8)), timeout: 120,
                    onStdout: { bytes in out.withLock { $0 += bytes } },
                    onStderr: { bytes in err.withLock { $0 += bytes } })
            }
            #expect(outcome.termination.exitCode == 3, "\(outcome.console ?? "")")
            #expect(
                String(decoding: out.withLock { $0 }, as: UTF8.self) == "hello from \(kit.release)\npiped in\n/tmp\n")
            #expect(String(decoding: err.withLock { $0 }, as: UTF8.self) == "oops\n")
            #expect(outcome.bootSeconds > 0 && outcome.metrics.wallSeconds >= outcome.bootSeconds)
        }
    }
}

extension VMTests {
    @Suite(
        "VM backend through the engine: images made in a VM and in a container are interchangeable", .serialized,
        .enabled(if: geteuid() == 0, "needs root"),
        .enabled(
            if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64"), "needs qemu-system-x86"))
    struct VMBackendTests {
        @Test(
            "a VM run's changes (a new file, a deleted one) become an image the container backend reads, and the other way round"
        )
        func interchangeable() async throws {
            let store = try vmStore()
            let engine = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            // Container first: a file and a whiteout the VM must see.
            let made = try await engine.run(
                RunSpec(image: "busybox", command: ["sh", "-c", "echo from-container > /c && rm /bin/vi"]))
            let containerImage = try #require(made.record.resultImage)
            var spec = RunSpec(
                image: containerImage,
                command: ["sh", "-c", "cat /c; test -e /bin/vi || echo no-vi; echo from-vm > /v; rm /bin/ls; id -u"])
            spec.isolation = .vm
            spec.timeout = 120
            let vm = try await engine.run(spec)
            #expect(vm.record.exitCode == 0, "\(String(decoding: vm.stderr, as: UTF8.self))")
            #expect(String(decoding: vm.stdout, as: UTF8.self) == "from-container\nno-vi\n0\n")
            #expect(vm.record.backend == .vm && vm.record.acceleration == "tcg")
            // The metrics a container run has: CPU, memory, processes, block I/O.
            let metrics = vm.record.metrics
            #expect(metrics.processes >= 3 && metrics.bytesWritten > 0 && metrics.peakMemoryBytes > 0, "\(metrics)")
            #expect(metrics.cpuUserSeconds + metrics.cpuSystemSeconds > 0)
            let vmImage = try #require(vm.record.resultImage)
            // The container reads what the VM wrote and deleted.
            let read = try await engine.run(
                RunSpec(image: vmImage, command: ["sh", "-c", "cat /v /c; test -e /bin/ls || echo no-ls"]))
            #expect(String(decoding: read.stdout, as: UTF8.self) == "from-vm\nfrom-container\nno-ls\n")
            #expect(try store.checkConsistency(verifyContent: false).isConsistent)
        }
    }
}

extension VMTests {
    @Suite(
        "VM backend: limits, bad commands, pipelines", .serialized,
        .enabled(if: geteuid() == 0, "needs root"),
        .enabled(
            if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64"), "needs qemu-system-x86"))
    struct VMRunTests {
        @Test("a command that does not exist exits 127 with the reason; a timeout kills the VM and says so")
        func failures() async throws {
            let store = try vmStore()
            let engine = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            var missing = RunSpec(image: "busybox", command: ["no-such-command"])
            missing.isolation = .vm
            let miss = try await engine.run(missing)
            #expect(miss.record.exitCode == 127)
            #expect(String(decoding: miss.stderr, as: UTF8.self).contains("no-such-command: No such file or directory"))
            var slow = RunSpec(image: "busybox", command: ["sleep", "600"])
            slow.isolation = .vm
            slow.timeout = 5
            let started = Date()
            let timed = try await engine.run(slow)
            #expect(timed.record.timedOut && timed.record.exitCode == nil)
            #expect(Date().timeIntervalSince(started) < 60)
            // No QEMU outlives its run.
            let left = try ChildProcess.run(["pgrep", "-P", String(getpid()), "qemu-system-x86"])
            #expect(left.stdout.isEmpty)
        }

        @Test("two VMs restored from one template draw different random numbers and read the host's clock")
        func clones() async throws {
            let store = try vmStore()
            let engine = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            var outputs: [String] = []
            for _ in 0..<2 {
                var spec = RunSpec(
                    image: "busybox", command: ["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1; date +%s"],
                    disposable: true)
                spec.isolation = .vm
                let run = try await engine.run(spec)
                #expect(run.record.exitCode == 0, "\(String(decoding: run.stderr, as: UTF8.self))")
                outputs.append(String(decoding: run.stdout, as: UTF8.self))
            }
            let lines = outputs.map { $0.split(separator: "\n").map(String.init) }
            #expect(lines.count == 2 && lines[0].first != lines[1].first, "\(outputs)")
            for clock in lines.compactMap({ $0.last.flatMap { Double($0.trimmingCharacters(in: .whitespaces)) } }) {
                #expect(abs(clock - Date().timeIntervalSince1970) < 120)
            }
        }

        @Test("stdin from a pipe reaches the command as it is written, not at its end")
        func streamedStdin() async throws {
            let store = try vmStore()
            let engine = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            var fds: [Int32] = [0, 0]
            #expect(pipe(&fds) == 0)
            defer { close(fds[0]) }
            let writer = fds[1]
            let seen = Mutex("")
            var spec = RunSpec(
                image: "busybox", command: ["sh", "-c", "read a; echo got $a; read b; echo got $b"], disposable: true,
                stdin: .fileDescriptor(fds[0]),
                stdout: .capture(
                    limit: 1 << 16, onChunk: { bytes in seen.withLock { $0 += String(decoding: bytes, as: UTF8.self) } }
                ))
            spec.isolation = .vm
            spec.timeout = 120
            let run = Task { try await engine.run(spec) }
            _ = write(writer, "first\n", 6)
            // The answer to the first line comes while the pipe is still open.
            let started = Date()
            while !seen.withLock({ $0.contains("got first") }) && Date().timeIntervalSince(started) < 60 {
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(seen.withLock { $0 } == "got first\n")
            _ = write(writer, "second\n", 7)
            close(writer)
            let result = try await run.value
            #expect(result.record.exitCode == 0)
            #expect(String(decoding: result.stdout, as: UTF8.self) == "got first\ngot second\n")
        }

        @Test(
            "egress in a VM: virtio-net behind passt, the host's loopback at $CONTREE_HOST only when asked, resolv.conf not in the change, passt gone after"
        )
        func egress() async throws {
            let store = try vmStore()
            let engine = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            let served = "/tmp/contree-vm-egress-" + UUID().uuidString.prefix(8)
            try FileSystem.makeDirectories(served)
            defer { try? FileSystem.removeTree(served) }
            try FileSystem.writeFile(served + "/hello.txt", Array("hello from the host\n".utf8))
            let server = try HostHTTPServer(serving: served)
            var spec = RunSpec(
                image: "busybox",
                command: [
                    "sh", "-c",
                    "echo host=${CONTREE_HOST:-unset}; wget -q -O- http://$CONTREE_HOST:\(server.port)/hello.txt; grep nameserver /etc/resolv.conf; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '",
                ])
            spec.isolation = .vm
            spec.network = .egressHostLoopback
            let run = try await engine.run(spec)
            let out = String(decoding: run.stdout, as: UTF8.self)
            #expect(
                out == "host=10.0.2.2\nhello from the host\nnameserver 10.0.2.3\neth0 lo ",
                "\(out) \(String(decoding: run.stderr, as: UTF8.self))")
            let image = try #require(run.record.resultImage)
            let check = try await engine.run(
                RunSpec(image: image, command: ["sh", "-c", "test -e /etc/resolv.conf && echo present || echo absent"]))
            #expect(String(decoding: check.stdout, as: UTF8.self) == "absent\n", "busybox has none, nor its child")
            // Without host loopback: no $CONTREE_HOST, and 127.0.0.1 is the guest's own.
            spec.network = .egress
            spec.command = [
                "sh", "-c",
                "echo host=${CONTREE_HOST:-unset}; wget -q -T 5 -O- http://127.0.0.1:\(server.port)/hello.txt || echo refused",
            ]
            let closed = try await engine.run(spec)
            #expect(String(decoding: closed.stdout, as: UTF8.self) == "host=unset\nrefused\n")
            let left = try ChildProcess.run(["pgrep", "-f", "passt.*uplink.sock"])
            #expect(left.stdout.isEmpty, "no passt outlives its VM")
        }

        @Test(
            "a dependency cache in a VM: an ext4 disk of the directory, written by the guest, read back; not in the change"
        )
        func cacheDisk() async throws {
            let store = try vmStore()
            let engine = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            let cache = "/tmp/contree-vm-cache-" + UUID().uuidString.prefix(8)
            try FileSystem.makeDirectories(cache + "/sub")
            defer { try? FileSystem.removeTree(cache) }
            try FileSystem.writeFile(cache + "/sub/runs", Array("host\n".utf8))
            var spec = RunSpec(
                image: "busybox",
                command: ["sh", "-c", "cat /deps/sub/runs; echo vm >> /deps/sub/runs; ls -a /deps | tr '\\n' ' '"])
            spec.isolation = .vm
            spec.mounts = [BindMount(source: cache, target: "/deps")]
            let run = try await engine.run(spec)
            #expect(
                String(decoding: run.stdout, as: UTF8.self) == "host\n. .. sub ",
                "\(String(decoding: run.stderr, as: UTF8.self))")
            #expect(try FileSystem.readFile(cache + "/sub/runs") == Array("host\nvm\n".utf8))
            let image = try #require(run.record.resultImage)
            let check = try await engine.run(
                RunSpec(image: image, command: ["sh", "-c", "test -e /deps && echo present || echo absent"]))
            #expect(String(decoding: check.stdout, as: UTF8.self) == "absent\n", "the mount point left the change")
        }

        @Test("two forks from one image in VMs are independent; loopback is up as in a container")
        func forks() async throws {
            let store = try vmStore()
            let engine = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            let base = try await engine.run(RunSpec(image: "busybox", command: ["sh", "-c", "echo base > /b"]))
            let baseImage = try #require(base.record.resultImage)
            var results: [String] = []
            for name in ["left", "right"] {
                var spec = RunSpec(
                    image: baseImage,
                    command: [
                        "sh", "-c",
                        "echo \(name) > /side; cat /b; ip link show lo | grep -c UP; hostname; ls /dev | grep -c -e ^vd -e ^vport; true",
                    ],
                    hostname: "vm-\(name)")
                spec.isolation = .vm
                let run = try await engine.run(spec)
                // No disk and not the agent's port in the command's /dev.
                #expect(
                    String(decoding: run.stdout, as: UTF8.self) == "base\n1\nvm-\(name)\n0\n",
                    "\(String(decoding: run.stderr, as: UTF8.self))")
                results.append(try #require(run.record.resultImage))
            }
            for (image, name) in zip(results, ["left", "right"]) {
                let read = try await engine.run(RunSpec(image: image, command: ["cat", "/side", "/b"]))
                #expect(String(decoding: read.stdout, as: UTF8.self) == "\(name)\nbase\n")
                #expect(try store.image(image)?.parent != nil)
            }
        }

        @Test("a template that will not restore is dropped: the run boots instead, and the next run has a new template")
        func damagedTemplate() async throws {
            let store = try vmStore()
            let engine = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            var spec = RunSpec(image: "busybox", command: ["echo", "still runs"], disposable: true)
            spec.isolation = .vm
            _ = try await engine.run(spec)  // the template exists
            // The template of the runs' size (other tests' guests of other sizes keep theirs).
            let damaged = try VMBackend().machine(storeRoot: store.root, memoryBytes: nil).1
            try FileSystem.writeFile(damaged.state, Array("not a migration stream".utf8), mode: 0o644)
            let fresh = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            let run = try await fresh.run(spec)
            #expect(run.record.exitCode == 0 && String(decoding: run.stdout, as: UTF8.self) == "still runs\n")
            let again = try await fresh.run(spec)
            #expect(again.record.exitCode == 0)
            let rebuilt = try VMBackend().machine(storeRoot: store.root, memoryBytes: nil).1
            #expect(try FileSystem.readFile(rebuilt.state).count > 1000)  // the current one, made again
            #expect(!FileSystem.exists(damaged.state), "the damaged generation is gone")
            #expect(rebuilt.state != damaged.state, "a new generation, not the damaged files rewritten")
        }

        @Test("the quickstart pipeline with isolation: vm passes, with the same outputs and artifacts")
        func quickstart() async throws {
            let root = "/tmp/contree-vm-pipeline-" + UUID().uuidString.prefix(8)
            defer { try? FileManager.default.removeItem(atPath: root) }
            let examples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent().appendingPathComponent("examples").path
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            try FileManager.default.copyItem(atPath: examples + "/quickstart", toPath: root + "/quickstart")
            let yaml = try String(contentsOfFile: examples + "/quickstart.yaml", encoding: .utf8)
                .replacingOccurrences(of: "  timeout: 60s\n", with: "  timeout: 120s\n  isolation: vm\n")
            try yaml.write(toFile: root + "/quickstart.yaml", atomically: true, encoding: .utf8)
            let store = try vmStore()
            let engine = SandboxEngine(store: store, backends: [ContainerBackend(), VMBackend()])
            let plan = PipelinePlan(try PipelineParser.parse(file: root + "/quickstart.yaml"))
            let report = try await PipelineRunner(
                plan: plan, engine: engine, options: RunOptions(noCache: true, outDir: root + "/run")
            ).run()
            #expect(report.status == .passed, "\(report.nodes.map { "\($0.node): \($0.reason ?? "")" })")
            #expect(report.nodes.first { $0.node == "build" }?.outputs == ["version": "1.0.0"])
            let artifacts = report.nodes.first { $0.node == "package" }?.artifacts.map(\.path) ?? []
            #expect(artifacts.contains { $0.hasSuffix("greet-1.0.0.tar.gz") })
        }
    }
}
