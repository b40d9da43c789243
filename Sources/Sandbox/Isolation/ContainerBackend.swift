import CSandbox
import Glibc
import Synchronization
import SystemSupport

/// The container backend: Linux namespaces (user, mount, pid, net, uts, ipc, cgroup), an
/// overlayfs root over an idmapped view of the store, pivot_root, a masked /proc, a minimal
/// /dev, no /sys, capabilities dropped, no_new_privs and a seccomp deny list. The fork-to-exec
/// path is C (`CSandbox`); this type prepares it and supervises the run.
public struct ContainerBackend: IsolationBackend {
    public let kind = IsolationKind.container
    /// Host uid/gid that the sandbox's root maps to, and how many ids are mapped.
    public static let idBase: UInt32 = 100_000
    public static let idCount: UInt32 = 65_536

    public init() {}

    /// Prepares the host for a first sandbox, once per process: starts paying the cgroup
    /// migration's grace period in the background (see `Cgroup.prime`). Call it as early as
    /// possible; `SandboxEngine` calls it too.
    public static func warmUp() {
        warmedUp.withLock { done in
            guard !done else { return }
            done = true
            Cgroup.prime()
        }
    }

    private static let warmedUp = Mutex(false)

    /// The contree-init program: `$CONTREE_INIT`, or next to the running binary.
    static func initProgram() throws -> String {
        try ContainerBackend.companionProgram("contree-init", override: "CONTREE_INIT")
    }

    /// A program built with this one (`contree-init`, `contree-agent`): `$OVERRIDE`, or next to
    /// the running binary (SwiftPM puts every product of the package in one directory).
    public static func companionProgram(_ name: String, override: String) throws -> String {
        if let explicit = getenv(override), explicit.pointee != 0 { return String(cString: explicit) }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        if n > 0 {
            let exe = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let candidate = String(exe[..<(exe.lastIndex(of: "/") ?? exe.endIndex)]) + "/" + name
            if access(candidate, X_OK) == 0 { return candidate }
        }
        throw SandboxError(
            .unsupported,
            "\(name) was not found next to this program; build the package (`swift build`) or set \(override)")
    }

    public func run(_ request: LaunchRequest) async throws -> CommandOutcome {
        let cancel = csb_eventfd_cloexec()
        guard cancel >= 0 else { throw SandboxError.system("eventfd") }
        let signal = CancelSignal(fd: cancel)
        defer { signal.close() }
        return try await withTaskCancellationHandler {
            try await BlockingPool.shared.run { try ContainerLaunch(request: request, cancelFD: cancel).execute() }
        } onCancel: {
            signal.fire()
        }
    }

    /// The user namespace every sandbox of this process joins (0 -> idBase). Sandboxes are kept
    /// apart by their other namespaces; sharing one mapping is what lets them share layers.
    static func userNamespace() throws -> Int32 {
        try sharedUserNamespace.withLock { fd in
            if let fd { return fd }
            guard geteuid() == 0 else {
                throw SandboxError(
                    .sandboxSetup, "the container backend needs root (it creates namespaces and mounts); run it as root"
                )
            }
            let created = csb_userns_create(idBase, idCount)
            guard created >= 0 else {
                throw SandboxError(
                    .sandboxSetup,
                    "cannot create the sandbox's user namespace; check that user namespaces are enabled (sysctl user.max_user_namespaces)",
                    errno: -created)
            }
            fd = created
            return created
        }
    }

    private static let sharedUserNamespace = Mutex<Int32?>(nil)
}

/// Fires an eventfd once; closes it when the run is over.
final class CancelSignal: Sendable {
    private let state: Mutex<Int32>
    init(fd: Int32) { state = Mutex(fd) }
    func fire() {
        state.withLock { fd in
            guard fd >= 0 else { return }
            var one: UInt64 = 1
            _ = Glibc.write(fd, &one, 8)
        }
    }
    func close() {
        state.withLock { fd in
            if fd >= 0 { _ = Glibc.close(fd) }
            fd = -1
        }
    }
}
