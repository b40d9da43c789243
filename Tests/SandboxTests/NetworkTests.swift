import ContreeTestSupport
import Glibc
import Testing

@testable import Sandbox
@testable import SystemSupport

/// Egress through pasta, against a server on the host's loopback (never another address).
@Suite("network egress", .requiresRoot, .serialized)
struct NetworkTests {
    @Test("egress with host loopback reaches a server on the host's 127.0.0.1 at $CONTREE_HOST, sees only lo and eth0")
    func hostLoopback() async throws {
        let t = try TemporaryStore()
        let served = try ScratchDirectory()
        try served.write("hello.txt", "hello from the host\n")
        let server = try HostHTTPServer(serving: served.path)
        let run = try await t.sh(
            """
            echo "host=$CONTREE_HOST"
            wget -q -O- "http://$CONTREE_HOST:\(server.port)/hello.txt"
            cat /etc/resolv.conf
            tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '; echo
            """
        ) { $0.network = .egressHostLoopback }
        #expect(run.record.exitCode == 0, "\(run.err)")
        #expect(run.err.isEmpty, "\(run.err) port \(server.port)")
        let lines = run.out.split(separator: "\n").map(String.init)
        #expect(lines.first == "host=10.0.2.2")
        #expect(lines.contains("hello from the host"))
        #expect(lines.contains("nameserver 10.0.2.3"))
        #expect(lines.last == "eth0 lo ", "the sandbox sees its own two interfaces, none of the host's")
        // The generated resolv.conf was a mount: the run's image has what busybox has there.
        let probe = "test -e /etc/resolv.conf && echo present || echo absent"
        let before = try await t.sh(probe)
        let image = try t.image(of: run)
        let after = try await t.sh(probe, image: image.uuid)
        #expect(after.out == before.out)
    }

    @Test("egress without host loopback: no $CONTREE_HOST, and the host's loopback is not the sandbox's")
    func noHostLoopback() async throws {
        let t = try TemporaryStore()
        let served = try ScratchDirectory()
        try served.write("hello.txt", "hello\n")
        let server = try HostHTTPServer(serving: served.path)
        let run = try await t.sh(
            """
            echo "host=${CONTREE_HOST:-unset}"
            wget -q -T 5 -O- "http://127.0.0.1:\(server.port)/hello.txt" || echo refused
            """
        ) { $0.network = .egress }
        #expect(run.out == "host=unset\nrefused\n", "\(run.err)")
    }

    @Test("no NAT helper outlives the CLI that started it (SIGKILL)")
    func helperDiesWithCLI() async throws {
        let t = try TemporaryStore()
        _ = try t.busybox()
        var environment = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") }
        environment.append("CONTREE_HOME=\(t.root)")
        let child = try ChildProcess.spawn(
            [Paths.cli, "exec", "--network", "egress", "--", "sleep", "30"], environment: environment,
            captureStdout: true)
        defer {
            close(child.stdout!)
            close(child.stderr)
        }
        // The CLI's children: the sandbox's pid 1 and the guard, whose child is pasta.
        var helper: pid_t?
        for _ in 0..<800 where helper == nil {
            for guardProcess in childProcesses(of: child.pid) {
                helper = childProcesses(of: guardProcess.pid).first { $0.name.hasPrefix("pas") }?.pid
                if helper != nil { break }
            }
            if helper == nil { usleep(25_000) }
        }
        let pasta = try #require(helper, "pasta ran under the CLI")
        kill(child.pid, SIGKILL)
        _ = try ChildProcess.wait(child.pid, "contree-pipeline")
        var waited = 0
        while isAlive(pasta) && waited < 100 {
            usleep(20_000)
            waited += 1
        }
        #expect(!isAlive(pasta), "pasta outlived its CLI")
    }

    @Test("egress without pasta installed is a clear error that starts nothing")
    func withoutPasta() async throws {
        let t = try TemporaryStore()
        _ = try t.busybox()
        let environment =
            ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") && !$0.hasPrefix("PATH=") }
            + ["CONTREE_HOME=\(t.root)", "PATH=/nonexistent"]
        let result = try ChildProcess.run(
            [Paths.cli, "exec", "--network", "egress", "--", "true"], environment: environment)
        #expect(result.status != 0)
        #expect(result.stderrText.contains("pasta") && result.stderrText.contains("apt-get install passt"))
        let ok = try ChildProcess.run([Paths.cli, "exec", "--", "true"], environment: environment)
        #expect(ok.status == 0, "\(ok.stderrText)")
    }
}
