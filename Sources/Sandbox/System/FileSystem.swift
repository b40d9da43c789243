import CSandbox
import Glibc

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Thin, throwing wrappers over the file system calls the store needs. Every error names the
/// call and the path. Nothing here follows a symlink unless it says so.
public enum FileSystem {
    /// A pipe whose ends are close-on-exec from the start (no sandbox launched meanwhile
    /// inherits them). - Returns: (read, write).
    public static func makePipe() throws -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        guard csb_pipe_cloexec(&fds) == 0 else { throw SandboxError.system("pipe2") }
        return (fds[0], fds[1])
    }

    /// `lstat`, or nil when the path does not exist.
    public static func status(_ path: String) throws -> stat? {
        var st = stat()
        if lstat(path, &st) == 0 { return st }
        if errno == ENOENT || errno == ENOTDIR { return nil }
        throw SandboxError.system("lstat(\(path))")
    }

    public static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    public static func makeDirectory(_ path: String, mode: mode_t = 0o755) throws {
        if mkdir(path, mode) != 0 && errno != EEXIST { throw SandboxError.system("mkdir(\(path))") }
    }

    public static func makeDirectories(_ path: String, mode: mode_t = 0o755) throws {
        var current = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            current += "/" + part
            if mkdir(current, mode) != 0 && errno != EEXIST {
                throw SandboxError.system("mkdir(\(current))")
            }
        }
    }

    /// Names in a directory (without `.` and `..`), sorted by their bytes.
    public static func list(_ path: String) throws -> [String] {
        guard let dir = opendir(path) else { throw SandboxError.system("opendir(\(path))") }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
    }

    public static func readLink(_ path: String) throws -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink(path, &buffer, buffer.count - 1)
        guard n >= 0 else { throw SandboxError.system("readlink(\(path))") }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public static func readFile(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        defer { close(fd) }
        return try readAll(fd: fd, path: path)
    }

    public static func readAll(fd: Int32, path: String) throws -> [UInt8] {
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(\(path))") }
            if n == 0 { break }
            out.append(contentsOf: buffer[0..<n])
        }
        return out
    }

    /// Writes a file in full; with `sync`, fsyncs it before closing.
    public static func writeFile(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644, sync: Bool = false) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode)
        guard fd >= 0 else { throw SandboxError.system("open(\(path), O_CREAT)") }
        defer { close(fd) }
        try writeAll(fd: fd, bytes, path: path)
        if sync && fsync(fd) != 0 { throw SandboxError.system("fsync(\(path))") }
    }

    public static func writeAll(fd: Int32, _ bytes: [UInt8], path: String) throws {
        try bytes.withUnsafeBytes { try writeAll(fd: fd, $0, path: path) }
    }

    public static func writeAll(fd: Int32, _ bytes: UnsafeRawBufferPointer, path: String) throws {
        var done = 0
        while done < bytes.count {
            let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw SandboxError.system("write(\(path))") }
            done += n
        }
    }

    /// fsync of a file or directory by path.
    public static func sync(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SandboxError.system("open(\(path)) for fsync") }
        defer { close(fd) }
        if fsync(fd) != 0 { throw SandboxError.system("fsync(\(path))") }
    }

    /// syncfs of the file system holding `path`.
    public static func syncFileSystem(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECTORY)
        guard fd >= 0 else { throw SandboxError.system("open(\(path)) for syncfs") }
        defer { close(fd) }
        if csb_syncfs(fd) != 0 { throw SandboxError.system("syncfs(\(path))") }
    }

    public static func rename(_ from: String, _ to: String) throws {
        if Glibc.rename(from, to) != 0 { throw SandboxError.system("rename(\(from), \(to))") }
    }

    /// Removes a tree without following symlinks. Missing paths are fine.
    public static func removeTree(_ path: String) throws {
        var st = stat()
        if lstat(path, &st) != 0 {
            if errno == ENOENT { return }
            throw SandboxError.system("lstat(\(path))")
        }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            // An immutable-looking tree may have dirs without write permission; we are root,
            // but a later chmod-less rmdir of a dir with 0 mode still works for root.
            for name in try list(path) { try removeTree(path + "/" + name) }
            if rmdir(path) != 0 && errno != ENOENT { throw SandboxError.system("rmdir(\(path))") }
        } else if unlink(path) != 0 && errno != ENOENT {
            throw SandboxError.system("unlink(\(path))")
        }
    }

    /// Extended attribute names of a path (not following symlinks).
    public static func xattrNames(_ path: String) -> [String] {
        let size = llistxattr(path, nil, 0)
        guard size > 0 else { return [] }
        var buffer = [CChar](repeating: 0, count: size)
        let n = llistxattr(path, &buffer, size)
        guard n > 0 else { return [] }
        return buffer[0..<n].split(separator: 0).map {
            String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    public static func xattr(_ path: String, _ name: String) -> [UInt8]? {
        let size = lgetxattr(path, name, nil, 0)
        guard size >= 0 else { return nil }
        var buffer = [UInt8](repeating: 0, count: max(size, 1))
        let n = lgetxattr(path, name, &buffer, buffer.count)
        guard n >= 0 else { return nil }
        return Array(buffer[0..<n])
    }

    public static func setXattr(_ path: String, _ name: String, _ value: [UInt8]) throws {
        let rc = value.withUnsafeBytes { lsetxattr(path, name, $0.baseAddress, $0.count, 0) }
        if rc != 0 { throw SandboxError.system("lsetxattr(\(path), \(name))") }
    }

    /// Copies one regular file's bytes (the caller sets metadata).
    public static func copyContents(from source: String, to destination: String, mode: mode_t) throws {
        let input = open(source, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard input >= 0 else { throw SandboxError.system("open(\(source))") }
        defer { close(input) }
        let output = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard output >= 0 else { throw SandboxError.system("open(\(destination), O_CREAT)") }
        defer { close(output) }
        while true {
            let n = csb_copy_file_range(input, output, 1 << 30)
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS) {
                let bytes = try readAll(fd: input, path: source)
                try writeAll(fd: output, bytes, path: destination)
                break
            }
            guard n >= 0 else { throw SandboxError.system("copy_file_range(\(source))") }
            if n == 0 { break }
        }
    }
}

extension stat {
    var isDirectory: Bool { (st_mode & S_IFMT) == S_IFDIR }
    var isRegular: Bool { (st_mode & S_IFMT) == S_IFREG }
    var isSymlink: Bool { (st_mode & S_IFMT) == S_IFLNK }
    /// An overlayfs whiteout: a character device with device number 0/0.
    var isWhiteout: Bool { (st_mode & S_IFMT) == S_IFCHR && st_rdev == 0 }
}
