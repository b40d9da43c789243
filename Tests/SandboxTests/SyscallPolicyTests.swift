import ContreeTestSupport
import Foundation
import Glibc
import Testing

@testable import Sandbox
@testable import SystemSupport

/// The seccomp policy is an allowlist: what it does not name is refused, and socket() opens only
/// UNIX, INET, INET6 and NETLINK sockets (AF_VSOCK reaches the host VM's vsock from any network
/// namespace).
@Suite("The system call policy: default deny", .requiresRoot)
struct SyscallPolicyTests {
    @Test("a static probe sees vsock, unknown and new system calls refused, and ordinary ones work")
    func probe() async throws {
        let scratch = try ScratchDirectory()
        let source = Paths.packageRoot + "/Tests/Fixtures/syscall-probe.c"
        let binary = scratch.path + "/probe"
        let build = try await BlockingPool.shared.run {
            try ChildProcess.run(["cc", "-static", "-O1", "-o", binary, source])
        }
        try #require(build.succeeded, "cc: \(build.stderrText)")
        let t = try TemporaryStore()
        let run = try await t.sh("/probe") {
            $0.files = [FileMapping(hostPath: binary, sandboxPath: "/probe", mode: 0o755)]
            $0.disposable = true
        }
        var results: [String: String] = [:]
        for line in run.out.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2 { results[String(parts[0])] = String(parts[1]) }
        }
        #expect(results["socket-vsock"] == "EAFNOSUPPORT", "\(run.out)")
        #expect(results["socket-vsock-high-bits"] == "EAFNOSUPPORT")
        #expect(results["socket-packet"] == "EAFNOSUPPORT")
        #expect(results["socket-unix"] == "ok" && results["socket-inet6"] == "ok")
        #expect(results["modify_ldt"] == "EPERM")
        #expect(["EPERM", "ENOSYS"].contains(results["memfd_secret"]))
        #expect(results["open_tree_attr"] == "ENOSYS")
        #expect(results["unknown-1000"] == "ENOSYS")
        #expect(results["io_uring_setup"] == "EPERM")
        #expect(results["ioctl-tiocsti-high-bits"] == "EPERM")
        #expect(results["unshare-user"] == "EPERM")
        #expect(results["getpid"] == "ok")
    }
}

@Suite("The command's output reaches the caller through a pipe", .requiresRoot)
struct OutputRelayTests {
    @Test("a command cannot reopen the caller's log file through /proc/self/fd/1 and read what it held")
    func noLogFileReopen() async throws {
        let t = try TemporaryStore()
        let scratch = try ScratchDirectory()
        let log = try scratch.write("ci.log", "SECRET-PRIOR-LOG\n")
        let script =
            "readlink /proc/self/fd/1; dd if=/proc/self/fd/1 bs=1 count=16 2>/dev/null & sleep 0.5; kill $! 2>/dev/null; echo done"
        let home = t.root
        let status = try await BlockingPool.shared.run { () -> Int32 in
            let out = open(log, O_WRONLY | O_APPEND | O_CLOEXEC)
            defer { close(out) }
            var env = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") }
            env.append("CONTREE_HOME=\(home)")
            let child = try ChildProcess.spawn(
                [Paths.cli, "exec", "--disposable", "--", "sh", "-c", script], environment: env, captureStdout: false,
                stdoutFD: out)
            close(child.stderr)
            return try ChildProcess.wait(child.pid, "contree-pipeline exec")
        }
        #expect(status == 0)
        let written = try String(contentsOfFile: log, encoding: .utf8)
        #expect(written.components(separatedBy: "SECRET-PRIOR-LOG").count == 2, "\(written)")
        #expect(written.contains("pipe:[") && written.hasSuffix("done\n"), "\(written)")
    }
}
