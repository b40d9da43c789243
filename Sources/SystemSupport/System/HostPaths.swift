import CSandbox
import Glibc

/// Where host files named by input the operator did not write (a pipeline from a repository:
/// its inputs, secret files, local image paths) may be read.
///
/// `.beneath(root)`: a path is resolved inside `root` with `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_MAGICLINKS)`, so neither `..`, an absolute path, nor a symlink (absolute, or
/// relative and climbing out) nor a `/proc` magic link leads outside it; and only a regular
/// file on an ordinary file system is read (never procfs, sysfs and their kind, which a bind
/// mount could bring inside). `.anywhere`: the path as given (`run --allow-host-paths`).
public enum HostPaths: Sendable, Equatable {
    case anywhere
    case beneath(String)

    /// The directory relative paths are taken from.
    public var base: String? {
        if case .beneath(let root) = self { return root }
        return nil
    }

    /// The absolute path `path` names: relative paths are taken from `base` (or `directory`).
    public func absolute(_ path: String, directory: String? = nil) -> String {
        if path.hasPrefix("/") { return path }
        let from = base ?? directory ?? FileSystem.currentDirectory()
        return from == "/" ? "/" + path : from + "/" + path
    }

    /// Opens a host file for reading under this policy. The caller closes the descriptor.
    /// - Parameters:
    ///   - path: relative to the root (or absolute, and then inside it).
    ///   - what: how the error names the file ("input src/a.c", "secret token").
    /// - Throws: `pathEscapes` when the path leads outside the root; `invalidArgument` when it
    ///   is not a regular file on an ordinary file system; `notFound` when it does not exist.
    public func open(_ path: String, what: String) throws -> Int32 {
        guard case .beneath(let root) = self else {
            let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY)
            guard fd >= 0 else {
                throw SandboxError(
                    errno == ENOENT ? .notFound : .systemCall, "\(what): cannot open \(path)", errno: errno)
            }
            return try HostPaths.checked(fd, path: path, what: what)
        }
        let relative = try HostPaths.relative(path, to: root, what: what)
        let directory = try DirectoryHandle(path: root)
        var fd = csb_open_beneath(directory.fd, relative, O_RDONLY)
        if fd < 0 && errno == ENOSYS {
            // Before Linux 5.6: walk it a component at a time and follow no symlink at all.
            let parts = relative.split(separator: "/").map { RawPath(String($0)) }
            fd =
                (try? directory.directory(atPath: RawPath(parts.dropLast().map(\.bytes).joined(separator: [0x2f])))
                    .openFile(parts.last ?? ".", flags: O_RDONLY)) ?? -1
            if fd < 0 { errno = ELOOP }
        }
        guard fd >= 0 else {
            switch errno {
            case EXDEV, ELOOP:
                throw SandboxError(
                    .pathEscapes,
                    "\(what): \(path) leads outside \(root) (through '..', an absolute path or a symlink); keep it inside the pipeline's directory, or run with --allow-host-paths"
                )
            case ENOENT:
                throw SandboxError(.notFound, "\(what): \(path) does not exist under \(root)", errno: ENOENT)
            default:
                throw SandboxError(.systemCall, "\(what): cannot open \(path) under \(root)", errno: errno)
            }
        }
        return try HostPaths.checked(fd, path: path, what: what)
    }

    /// Checks that a file, or a directory tree (an OCI layout), may be read under this policy:
    /// beneath the root, and for a tree, nothing in it but directories and regular files (no
    /// symlink inside it can lead out). Returns the path made absolute.
    public func check(_ path: String, what: String) throws -> String {
        guard case .beneath(let root) = self else { return absolute(path) }
        let relative = try HostPaths.relative(path, to: root, what: what)
        let directory = try DirectoryHandle(path: root)
        let fd = csb_open_beneath(directory.fd, relative, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else {
            // Not a directory beneath the root: a file is checked as one; otherwise `open`
            // throws the reason (outside the root, missing).
            close(try open(path, what: what))
            return absolute(path)
        }
        try TreeWalker.walk(DirectoryHandle(fd: fd, label: absolute(path))) { entry in
            guard entry.status.isDirectory || entry.status.isRegular else {
                throw SandboxError(
                    .pathEscapes,
                    "\(what): \(entry.parent.label(entry.name)) is a symlink or a special file; a directory a pipeline names may hold only directories and regular files (or run with --allow-host-paths)"
                )
            }
            return entry.status.isDirectory
        }
        return absolute(path)
    }

    /// `path` relative to `root`, refusing an absolute path outside it.
    static func relative(_ path: String, to root: String, what: String) throws -> String {
        guard path.hasPrefix("/") else { return path.isEmpty ? "." : path }
        let prefix = root.hasSuffix("/") ? root : root + "/"
        guard path.hasPrefix(prefix) else {
            throw SandboxError(
                .pathEscapes,
                "\(what): \(path) is outside \(root); name a file inside the pipeline's directory, or run with --allow-host-paths"
            )
        }
        return String(path.dropFirst(prefix.count))
    }

    /// File systems whose "files" are kernel state, not data a pipeline may read.
    private static let pseudoFileSystems: Set<Int> = [
        0x9fa0,  // proc
        0x6265_6572,  // sysfs
        0x6462_6720,  // debugfs
        0x7472_6163,  // tracefs
        0x7363_6673,  // securityfs
        0x0027_e0eb,  // cgroup
        0x6367_7270,  // cgroup2
        0xcafe_4a11,  // bpf
        0x1cd1,  // devpts
        0xde5e_81e4,  // efivarfs
        0x6265_6570,  // configfs
        0x6165_676c,  // pstore
        0xf97c_ff8c,  // selinuxfs
        0x6573_5543,  // fusectl
        0x4249_4e4d,  // binfmt_misc
    ]

    /// Keeps `fd` only when it is a regular file on an ordinary file system.
    private static func checked(_ fd: Int32, path: String, what: String) throws -> Int32 {
        var st = stat()
        let type = csb_fs_type(fd)
        guard fstat(fd, &st) == 0, st.isRegular, type >= 0, !pseudoFileSystems.contains(type) else {
            close(fd)
            throw SandboxError(
                .invalidArgument, "\(what): \(path) is not a regular file on an ordinary file system; name a file")
        }
        return fd
    }
}
