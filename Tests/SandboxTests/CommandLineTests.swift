import ContreeTestSupport
import Foundation
import Glibc
import Testing

@testable import ImageFormats
@testable import ImageStore
@testable import Sandbox
@testable import SystemSupport

/// The CLI end to end: the binary users run, against a temporary store.
@Suite("The command line", .requiresRoot, .enabled(if: FileSystem.exists(Paths.cli), "needs `swift build` first"))
struct CommandLineTests {
    @Test("exec streams output, exits with the command's code, and --json prints the record")
    func execBasics() async throws {
        let t = try TemporaryStore()
        let hello = try await runCLI(["exec", "--", "sh", "-c", "echo hello; exit 7"], home: t.root)
        #expect(hello.status == 7 && hello.out == "hello\n")
        let json = try await runCLI(
            ["exec", "--json", "--tag", "with-file", "--", "sh", "-c", "echo data > /f"], home: t.root)
        #expect(json.status == 0)
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let record = try decoder.decode(RunRecord.self, from: Data(json.out.utf8))
        #expect(record.exitCode == 0 && record.resultImage != nil && record.metrics.diffFiles == 1)
        #expect(try t.store.resolveImage("with-file").uuid == record.resultImage)
        let missing = try await runCLI(["exec", "--", "no-such-binary"], home: t.root)
        #expect(missing.status == 127 && missing.err.contains("command not found"))
        let timeout = try await runCLI(["exec", "--timeout", "0.3", "--", "sleep", "10"], home: t.root)
        #expect(timeout.status == 124 && timeout.err.contains("timed out"))
    }

    @Test("bad references and missing host files fail with status 125 and a message naming them")
    func execErrors() async throws {
        let t = try TemporaryStore()
        let image = try await runCLI(["exec", "--image", "ghost:v1", "--", "true"], home: t.root)
        #expect(image.status == 125 && image.err.contains("ghost:v1"))
        let file = try await runCLI(["exec", "--file", "/nonexistent/in:/in", "--", "true"], home: t.root)
        #expect(file.status == 125 && file.err.contains("/nonexistent/in"))
        let mapping = try await runCLI(["exec", "--file", "no-colon", "--", "true"], home: t.root)
        #expect(mapping.status == 125 && mapping.err.contains("HOST:SANDBOX"))
    }

    @Test("image and inspect commands read, compare and export images")
    func imageAndInspect() async throws {
        let t = try TemporaryStore()
        #expect(
            try await runCLI(
                ["exec", "--tag", "v1", "--", "sh", "-c", "mkdir /app; echo one > /app/a; rm /etc/hosts"], home: t.root
            ).status == 0)
        let ls = try await runCLI(["inspect", "ls", "v1", "/app"], home: t.root)
        #expect(ls.status == 0 && ls.out == "a\n")
        let cat = try await runCLI(["inspect", "cat", "v1", "/app/a"], home: t.root)
        #expect(cat.out == "one\n")
        let gone = try await runCLI(["inspect", "cat", "v1", "/etc/hosts"], home: t.root)
        #expect(gone.status == 2 && gone.err.contains("/etc/hosts"))
        let escape = try await runCLI(["inspect", "cat", "v1", "/../../etc/passwd"], home: t.root)
        #expect(escape.status == 2 && escape.err.contains("climbs above"))
        let diff = try await runCLI(["image", "diff", "busybox", "v1"], home: t.root)
        #expect(diff.out.split(separator: "\n").contains("D /etc/hosts"))
        #expect(diff.out.split(separator: "\n").contains("A /app/a"))
        let scratch = try ScratchDirectory()
        let export = try await runCLI(["inspect", "export", "v1", "/app", scratch.path + "/app.tar"], home: t.root)
        #expect(export.status == 0)
        let names = try ChildProcess.run(["tar", "-tf", scratch.path + "/app.tar"])
        #expect(String(decoding: names.stdout, as: UTF8.self) == "app/\napp/a\n")
        let log = try await runCLI(["image", "log", "v1"], home: t.root)
        #expect(log.out.contains("(v1)") && log.out.contains("(busybox)"))
        let rm = try await runCLI(["image", "rm", "v1"], home: t.root)
        #expect(rm.status == 2 && rm.err.contains("--force"))
        #expect(try await runCLI(["fsck"], home: t.root).status == 0)
    }

    @Test("a sandbox dies with the CLI that started it")
    func sandboxDiesWithCLI() async throws {
        let t = try TemporaryStore()
        _ = try t.busybox()
        var environment = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") }
        environment.append("CONTREE_HOME=\(t.root)")
        let marker = "\(Int.random(in: 40_000...49_999))"
        let child = try ChildProcess.spawn(
            [Paths.cli, "exec", "--", "sleep", marker], environment: environment, captureStdout: true)
        func sleepers() throws -> Int { try processCount(commandLine: ["sleep", marker]) }
        var waited = 0
        while try sleepers() == 0 && waited < 100 {
            usleep(50_000)
            waited += 1
        }
        #expect(try sleepers() == 1, "the sandbox started")
        kill(child.pid, SIGKILL)
        _ = try ChildProcess.wait(child.pid, "contree-pipeline")
        close(child.stdout!)
        close(child.stderr)
        waited = 0
        while try sleepers() > 0 && waited < 100 {
            usleep(20_000)
            waited += 1
        }
        #expect(try sleepers() == 0, "the sandbox outlived its CLI")
    }

    @Test("every subcommand answers --help without running anything; --version prints the version")
    func helpEverywhere() async throws {
        let t = try TemporaryStore()
        func subcommands(_ path: [String]) async throws -> [[String]] {
            let help = try await runCLI(path + ["--help"], home: t.root)
            #expect(help.status == 0, "\(path) --help: \(help.err)")
            #expect(help.out.contains("USAGE:"), "\(path) --help printed no usage")
            guard let section = help.out.components(separatedBy: "SUBCOMMANDS:").last, help.out.contains("SUBCOMMANDS:")
            else { return [path] }
            let names = section.split(separator: "\n").compactMap { line -> String? in
                guard line.hasPrefix("  "), !line.hasPrefix("   "), let word = line.split(separator: " ").first else {
                    return nil
                }
                return String(word)
            }
            var all = [path]
            for name in names where name != "See" && name != "help" { all += try await subcommands(path + [name]) }
            return all
        }
        let all = try await subcommands([])
        #expect(all.count > 20, "\(all)")
        let version = try await runCLI(["--version"], home: t.root)
        #expect(
            version.status == 0
                && version.out.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ".").count == 3)
        // exec's command is captured as it is: --help before any command is for exec, after -- for the command.
        let execHelp = try await runCLI(["exec", "--image", "busybox", "--help"], home: t.root)
        #expect(execHelp.status == 0 && execHelp.out.contains("USAGE:"))
        #expect(try t.store.listImages().isEmpty, "exec --help ran nothing")
        let passed = try await runCLI(["exec", "--", "--help"], home: t.root)
        #expect(passed.status == 127)
        // image build takes the names an image: line takes; a malformed package list is refused.
        let build = try await runCLI(["image", "build", "debian:bookworm+Not_A_Package"], home: t.root)
        #expect(build.status == 2 && build.err.contains("is not a Debian package name"), "\(build.err)")
        // A command line the tool cannot use is invalid input: exit 2, as documented.
        #expect(try await runCLI(["image", "ls", "--bogus"], home: t.root).status == 2)
        #expect(try await runCLI(["nonsense"], home: t.root).status == 2)
    }

    @Test("fsck exits non-zero on a damaged store")
    func fsckFails() async throws {
        let t = try TemporaryStore()
        let image = try t.busybox()
        unlink(t.store.layerPath(image.layers[0]) + "/etc/passwd")
        let fsck = try await runCLI(["fsck"], home: t.root)
        #expect(fsck.status == 1 && fsck.out.contains("PROBLEM"))
    }

    @Test("killing the CLI at random moments never leaves a half-written image, and the next command cleans up")
    func killAtRandom() async throws {
        let t = try TemporaryStore()
        _ = try t.busybox()
        var environment = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") }
        environment.append("CONTREE_HOME=\(t.root)")
        // Runs that write many files and some megabytes make the commit (digest, sync, rename,
        // insert) long enough for kills to land anywhere in it. Kills spread uniformly over how
        // long a whole run takes: the median of the runs seen to end by themselves (three
        // unkilled ones first, then any that ends before its kill: a loaded machine changes it).
        let script =
            "dd if=/dev/urandom of=/blob bs=1M count=24 2>/dev/null; i=0; while [ $i -lt 300 ]; do echo $i > /f$i; i=$((i+1)); done"
        var spans: [Double] = []
        for _ in 0..<3 {
            let measured = Date()
            #expect(try await runCLI(["exec", "--", "sh", "-c", script], home: t.root).status == 0)
            spans.append(Date().timeIntervalSince(measured))
        }
        let imagesBefore = try t.store.listImages().count
        let kills = 24
        let env = environment
        try await BlockingPool.shared.run { [spans] in
            var spans = spans
            var generator = SystemRandomNumberGenerator()
            for _ in 0..<kills {
                let span = spans.sorted()[spans.count / 2]
                let started = Date()
                let child = try ChildProcess.spawn(
                    [Paths.cli, "exec", "--", "sh", "-c", script], environment: env, captureStdout: false,
                    stdoutFD: open("/dev/null", O_WRONLY | O_CLOEXEC))
                let killAt = Double.random(in: 0.01...(span * 1.05), using: &generator)
                var status: Int32 = 0
                var ended = false
                while !ended && Date().timeIntervalSince(started) < killAt {
                    ended = waitpid(child.pid, &status, WNOHANG) == child.pid
                    if !ended { usleep(2_000) }
                }
                if ended {
                    spans.append(Date().timeIntervalSince(started))
                } else {
                    kill(child.pid, SIGKILL)
                    _ = try ChildProcess.wait(child.pid, "contree-pipeline")
                }
                close(child.stderr)
            }
        }
        let finished = try t.store.listImages().count - imagesBefore
        #expect(finished < kills, "most runs were killed before they committed")
        // Before any command runs: the store is consistent even with the leftovers.
        let store = try Store(root: t.root)  // "the next command": opening the store recovers
        let report = try store.checkConsistency()
        #expect(report.isConsistent, "\(report.problems)")
        #expect(try FileSystem.list(store.tmpPath).isEmpty)
        #expect(try store.database.query("SELECT COUNT(*) AS n FROM leases").first?["n"].int == 0)
        let mounts = String(decoding: try FileSystem.readFile("/proc/self/mountinfo"), as: UTF8.self)
        #expect(!mounts.contains(t.root))
        // Every visible image is whole: its files read back.
        for image in try store.listImages() {
            let fs = ImageFilesystem(layersTopFirst: image.layers.reversed().map(store.layerPath))
            #expect(try fs.lookup("/bin/busybox") != nil)
        }
        // No sandbox outlived its CLI: the next command's recovery removes their cgroups (a
        // sandbox killed while it wrote may take a moment to go: on a loaded machine the kernel
        // reaps it within a few seconds, so commands keep coming for up to 5 s).
        let scope = Cgroup.scope(storeRoot: t.root)
        if case .v1(let parents) = Cgroup.layout, let pids = parents["pids"] {
            var left = try FileSystem.list(pids).filter { $0.contains(scope) }
            for _ in 0..<25 where !left.isEmpty {
                usleep(200_000)
                _ = try Store(root: t.root)
                left = try FileSystem.list(pids).filter { $0.contains(scope) }
            }
            #expect(left.isEmpty, "\(left)")
        }
        #expect(try await runCLI(["exec", "--", "true"], home: t.root).status == 0)
        #expect(try await runCLI(["fsck"], home: t.root).status == 0)
        _ = try await runCLI(["gc"], home: t.root)
        #expect(try store.checkConsistency().garbage.isEmpty)
    }
}

@Suite(
    "One store, many processes", .requiresRoot, .enabled(if: FileSystem.exists(Paths.cli), "needs `swift build` first"))
struct SharedStoreTests {
    @Test("execs, tags and gc from several processes at once leave a consistent store")
    func concurrentProcesses() async throws {
        let t = try TemporaryStore()
        _ = try t.busybox()
        var environment = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") }
        environment.append("CONTREE_HOME=\(t.root)")
        var children: [ChildProcess.Spawned] = []
        for i in 0..<6 {
            children.append(
                try ChildProcess.spawn(
                    [Paths.cli, "exec", "--tag", "p\(i)", "--", "sh", "-c", "echo \(i) > /mine; sleep 0.\(i)"],
                    environment: environment, captureStdout: true))
            children.append(try ChildProcess.spawn([Paths.cli, "gc"], environment: environment, captureStdout: true))
        }
        for child in children {
            #expect(try ChildProcess.wait(child.pid, "contree-pipeline") == 0)
            close(child.stdout!)
            close(child.stderr)
        }
        for i in 0..<6 {
            let image = try t.store.resolveImage("p\(i)")
            let fs = ImageFilesystem(layersTopFirst: image.layers.reversed().map(t.store.layerPath))
            let node = try #require(try fs.lookup("/mine"))
            #expect(try fs.readFile(node) == Array("\(i)\n".utf8))
        }
        #expect(try t.store.checkConsistency().isConsistent)
    }
}
