import CSandbox
import Glibc
import Synchronization
import SystemSupport

/// A network namespace that sandboxes join (a pipeline step and its services share one), with
/// `lo` up and, for egress, a user-mode NAT uplink: pasta (Debian's `passt`) answers the
/// namespace's tap device and turns its TCP, UDP and ICMP into ordinary sockets of the host. The
/// sandbox sees `lo` and `eth0` (10.0.2.100/24, gateway 10.0.2.2), never the host's interfaces;
/// DNS sent to 10.0.2.3 goes to the host's resolver. With host loopback, connections to the
/// gateway reach the host's 127.0.0.1 (`$CONTREE_HOST`); without it (pasta's `--no-map-gw`)
/// 10.0.2.2 is just another outside address and nothing reaches the host's loopback.
///
/// pasta runs under a guard (contree-init in guard mode, pid 1 of a pid namespace of its own,
/// with a parent-death signal): pasta drops its privileges, which clears a parent-death signal
/// of its own, but cannot leave the guard's namespace, whose end kills it. So no NAT helper
/// outlives its network (`close`), nor the host process when that is killed.
public final class SandboxNetwork: Sendable {
    /// The sandbox's own address, the gateway (the host's loopback when asked) and the DNS forwarder.
    public static let sandboxAddress = "10.0.2.100"
    public static let hostAddress = "10.0.2.2"
    public static let dnsAddress = "10.0.2.3"

    public let mode: NetworkMode
    /// The namespace (O_CLOEXEC); sandboxes join it through `csb_launch.netns_fd`.
    let namespaceFD: Int32
    private let uplink: NATUplink?

    /// A namespace with `lo` up; for an egress mode, with pasta attached and ready.
    /// - Throws: `unsupported` when egress is asked and pasta is not installed; `sandboxSetup`
    ///   when the namespace or the uplink cannot be made.
    public init(mode: NetworkMode) throws {
        self.mode = mode
        let program = mode.isEgress ? try NATUplink.program() : nil
        let fd = csb_netns_create()
        guard fd >= 0 else { throw SandboxError(.sandboxSetup, "cannot create a network namespace", errno: -fd) }
        namespaceFD = fd
        guard let program else {
            uplink = nil
            return
        }
        do {
            uplink = try NATUplink(
                program: program, mode: .pasta(namespaceFD: fd), hostLoopback: mode == .egressHostLoopback)
        } catch {
            Glibc.close(fd)
            throw error
        }
    }

    /// Stops the NAT helper (and waits until it is gone) and lets the namespace go once no
    /// sandbox is in it. Idempotent.
    public func close() { uplink?.close() }

    deinit {
        close()
        Glibc.close(namespaceFD)
    }

    /// What an egress sandbox's /etc/resolv.conf says, and where.
    public static let resolvConf = "nameserver \(dnsAddress)\noptions ndots:0\n"
    public static let resolvConfPath = "/etc/resolv.conf"

    /// A container's resolv.conf for egress: a file of the store (written when missing or
    /// different) mounted read-only at `resolvConfPath`.
    static func resolvConfMount(storeRoot: String) throws -> BindMount {
        let path = storeRoot + "/network/resolv.conf"
        let wanted = Array(resolvConf.utf8)
        if (try? FileSystem.readFile(path)) != wanted {
            try FileSystem.makeDirectory(storeRoot + "/network", mode: 0o755)
            try FileSystem.writeFile(path, wanted, mode: 0o644)
        }
        return BindMount(source: path, target: resolvConfPath, readOnly: true, isFile: true)
    }
}

/// The user-mode NAT behind egress: Debian's passt, as pasta (attached to a network namespace:
/// containers) or as passt (a stream socket QEMU's virtio-net connects to: VMs). Either way the
/// sandbox is 10.0.2.100/24 behind the gateway 10.0.2.2 (the host's loopback only when asked),
/// DNS sent to 10.0.2.3 goes to the host's resolver, and no port is forwarded either way. It
/// runs under a guard (see `SandboxNetwork`) and is ready when it says so on a pipe.
public final class NATUplink: Sendable {
    public enum Mode: Sendable {
        case pasta(namespaceFD: Int32)
        /// passt listening on a unix socket at this path, for QEMU's `-netdev stream`.
        case passt(socketPath: String)
    }

    private let helper: Mutex<(pidfd: Int32, pid: pid_t)?>

    /// The passt program (pasta is the same binary under another name).
    /// - Throws: `unsupported` when Debian's passt package is not installed.
    public static func program() throws -> String {
        guard let found = ChildProcess.lookup("passt") ?? ChildProcess.lookup("pasta") else {
            throw SandboxError(
                .unsupported,
                "network egress needs pasta, which is not installed; install Debian's passt package (apt-get install passt, as scripts/setup does) or run without egress"
            )
        }
        return found
    }

    /// Starts the uplink and waits until it is ready.
    public init(program: String, mode: Mode, hostLoopback: Bool) throws {
        helper = Mutex(try NATUplink.start(program, mode: mode, hostLoopback: hostLoopback))
    }

    /// Stops it and waits until it is gone. Idempotent.
    public func close() {
        let running = helper.withLock { state -> (pidfd: Int32, pid: pid_t)? in
            defer { state = nil }
            return state
        }
        if let running { NATUplink.stop(running) }
    }

    deinit { close() }

    private static func start(_ program: String, mode: Mode, hostLoopback: Bool) throws -> (pidfd: Int32, pid: pid_t) {
        let initProgram = try ContainerBackend.initProgram()
        var ready: [Int32] = [-1, -1]
        guard csb_pipe_cloexec(&ready) == 0 else { throw SandboxError.system("pipe2") }
        defer { Glibc.close(ready[0]) }
        let output = csb_memfd_cloexec("nat-output")
        guard output >= 0 else {
            Glibc.close(ready[1])
            throw SandboxError.system("memfd_create")
        }
        defer { Glibc.close(output) }
        // fd 3 is the ready pipe (its pid "file": written once the uplink is configured), fd 4
        // pasta's namespace. The name (argv[0]) picks the mode.
        var argv: [String]
        var fds: [Int32] = [ready[1]]
        switch mode {
        case .pasta(let namespace):
            argv = [program.hasSuffix("/pasta") ? program : program.replacing("/passt", with: "/pasta")]
            argv += ["--config-net", "--ns-ifname", "eth0", "--netns", "/proc/self/fd/4"]
            fds.append(namespace)
        case .passt(let socketPath):
            argv = [program.hasSuffix("/passt") ? program : program.replacing("/pasta", with: "/passt")]
            argv += ["--socket", socketPath]
        }
        argv += [
            "--foreground", "--quiet", "--runas", "0", "--address", SandboxNetwork.sandboxAddress, "--netmask", "24",
            "--gateway", SandboxNetwork.hostAddress, "--dns-forward", SandboxNetwork.dnsAddress, "--tcp-ports",
            "none", "--udp-ports", "none", "--pid", "/proc/self/fd/3",
        ]
        if case .pasta = mode { argv += ["--tcp-ns", "none", "--udp-ns", "none"] }
        if !hostLoopback { argv.append("--no-map-gw") }
        let arguments = CStringArray(argv)
        var pidfd: Int32 = -1
        var pid: pid_t = 0
        let rc = withExtendedLifetime(arguments) {
            csb_guard_start(initProgram, arguments.pointer, &fds, Int32(fds.count), output, &pidfd, &pid)
        }
        Glibc.close(ready[1])
        guard rc == 0 else { throw SandboxError(.sandboxSetup, "cannot start \(argv[0])", errno: -rc) }
        let started = (pidfd: pidfd, pid: pid)
        // Ready when a line arrives; end of file first means it gave up.
        var line: [UInt8] = []
        var poller = pollfd(fd: ready[0], events: Int16(POLLIN), revents: 0)
        let deadline = Monotonic.now + 10
        while !line.contains(UInt8(ascii: "\n")) {
            let left = Int32(max(0.0, (deadline - Monotonic.now) * 1000.0))
            let polled = poll(&poller, 1, left)
            if polled < 0 && errno == EINTR { continue }
            var chunk = [UInt8](repeating: 0, count: 64)
            let n = polled > 0 ? read(ready[0], &chunk, chunk.count) : -1
            if n > 0 {
                line += chunk[0..<n]
                continue
            }
            if n < 0 && errno == EINTR { continue }
            stop(started)
            var said = [UInt8](repeating: 0, count: 4096)
            let length = pread(output, &said, said.count, 0)
            let message = String(decoding: said[0..<max(0, length)], as: UTF8.self)
                .split(separator: "\n").filter { !$0.hasPrefix("Failed to send") }.suffix(3).joined(separator: "; ")
            throw SandboxError(
                .sandboxSetup,
                polled == 0
                    ? "the NAT uplink (\(argv[0])) was not ready within 10 s"
                    : "the NAT uplink (\(argv[0])) could not start\(message.isEmpty ? "" : ": " + message)")
        }
        return started
    }

    private static func stop(_ helper: (pidfd: Int32, pid: pid_t)) {
        _ = csb_pidfd_kill(helper.pidfd, SIGKILL)
        _ = try? ChildProcess.wait(helper.pid, "the NAT uplink's guard")
        Glibc.close(helper.pidfd)
    }
}

extension NetworkMode {
    /// Whether the sandbox reaches beyond the host (through the NAT helper).
    public var isEgress: Bool { self == .egress || self == .egressHostLoopback }
}
