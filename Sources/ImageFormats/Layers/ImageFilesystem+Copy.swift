import Glibc
import SystemSupport

extension ImageFilesystem {
    /// Copies `node` and everything below it to `destination` (a host path that must not exist
    /// yet; its parent must), keeping modes and owners, and times, or with `time` every time set
    /// to it: then the same files (names, contents, modes, owners) give the same layer digest
    /// however often they were rewritten. Directories get their times last (adding their
    /// children changed them). Sockets and device nodes are left out; extended attributes are
    /// not copied.
    public func copyTree(_ node: Node, to destination: RawPath, time: timespec? = nil) throws {
        var directories: [(path: RawPath, status: stat)] = []
        let base = node.path.bytes.count
        try walk(node) { n in
            let target = destination + RawPath(n.path.bytes.dropFirst(base))
            let st = n.status
            switch st.st_mode & S_IFMT {
            case S_IFDIR:
                let rc = target.withCString { mkdir($0, mode_t(st.st_mode & 0o7777)) }
                guard rc == 0 else { throw SandboxError.system("mkdir(\(target))") }
                directories.append((target, st))
            case S_IFLNK:
                let link = try readLink(n)
                let rc = link.withCString { l in target.withCString { symlink(l, $0) } }
                guard rc == 0 else { throw SandboxError.system("symlink(\(target))") }
            case S_IFREG:
                let input = try openFile(n)
                defer { close(input) }
                let output = target.withCString {
                    open($0, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode_t(st.st_mode & 0o7777))
                }
                guard output >= 0 else { throw SandboxError.system("open(\(target))") }
                defer { close(output) }
                try FileSystem.copyContents(from: input, to: output, name: target.description)
                _ = fchmod(output, mode_t(st.st_mode & 0o7777))
            default:
                return
            }
            try ImageFilesystem.keep(st, on: target, time: time)
        }
        for (path, st) in directories.reversed() { try ImageFilesystem.keep(st, on: path, time: time) }
    }

    /// Sets owner and times (of the link itself for a symlink) as `st` has them.
    static func keep(_ st: stat, on path: RawPath, time: timespec?) throws {
        try path.withCString { p in
            guard lchown(p, st.st_uid, st.st_gid) == 0 else { throw SandboxError.system("lchown(\(path))") }
            if (st.st_mode & S_IFMT) != S_IFLNK { _ = chmod(p, mode_t(st.st_mode & 0o7777)) }
            var times = time.map { [$0, $0] } ?? [st.st_atim, st.st_mtim]
            guard utimensat(AT_FDCWD, p, &times, AT_SYMLINK_NOFOLLOW) == 0 else {
                throw SandboxError.system("utimensat(\(path))")
            }
        }
    }
}
