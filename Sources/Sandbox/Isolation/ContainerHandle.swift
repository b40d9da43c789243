import CSandbox
import Glibc
import SystemSupport

/// A running container sandbox as another process finds it again (a live container sandbox's
/// `sandbox exec`): its pid 1, that process's start time (a pid the kernel handed to another
/// process is not taken for it), its cgroup's directories and its file size limit.
public struct ContainerHandle: Codable, Sendable {
    public var pid: Int32
    public var startTicks: UInt64
    public var cgroups: [String: String]
    public var fileSizeLimit: UInt64

    enum CodingKeys: String, CodingKey {
        case pid, cgroups
        case startTicks = "start_ticks"
        case fileSizeLimit = "file_size_limit"
    }

    /// Whether its pid 1 still runs.
    public var isRunning: Bool { ChildProcess.startTicks(of: pid) == startTicks }

    /// Starts `spec` in the sandbox and waits for it.
    /// - Throws: `conflict` when the sandbox has ended.
    public func exec(_ spec: ExecSpec) async throws -> CommandOutcome {
        let container = try open()
        defer { container.close() }
        return try await container.exec(spec)
    }

    private func open() throws -> RunningContainer {
        let ended = SandboxError(.conflict, "the container sandbox has ended, so nothing can be started in it")
        let pidfd = csb_pidfd_open(pid)
        guard pidfd >= 0 else { throw ended }
        defer { close(pidfd) }
        guard isRunning else { throw ended }  // the pid was not reused before the pidfd held it
        let cgroup = Cgroup(existing: cgroups)
        return RunningContainer(
            pidfd: pidfd, pid: pid, cgroup: cgroup, storeRoot: "", runID: "", network: .none,
            fileSizeLimit: fileSizeLimit)
    }
}

extension RunControl {
    /// The running container sandbox's handle (nil before it runs, after, or for a VM).
    public var containerHandle: ContainerHandle? {
        guard let container = running as? RunningContainer else { return nil }
        return ContainerHandle(
            pid: container.pid, startTicks: ChildProcess.startTicks(of: container.pid) ?? 0,
            cgroups: container.cgroup.directories, fileSizeLimit: container.fileSizeLimit)
    }
}
