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

    /// `lstat` of a path given as bytes, or nil when it does not exist.
    public static func status(_ path: RawPath) throws -> stat? {
        var st = stat()
        if path.withCString({ lstat($0, &st) }) == 0 { return st }
        if errno == ENOENT || errno == ENOTDIR { return nil }
        throw SandboxError.system("lstat(\(path))")
    }

    /// Names in a directory given as bytes (without `.` and `..`), sorted by their bytes.
    public static func list(_ path: RawPath) throws -> [RawPath] {
        let fd = path.withCString { open($0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        guard fd >= 0 else { throw SandboxError.system("open(\(path), O_DIRECTORY)") }
        return try DirectoryHandle(fd: fd, label: "", relative: path).entries()
    }

    /// Opens a path given as bytes, never following a final symlink. The caller closes it.
    public static func openFile(_ path: RawPath, flags: Int32, mode: mode_t = 0o600) throws -> Int32 {
        let fd = path.withCString { Glibc.open($0, flags | O_NOFOLLOW | O_CLOEXEC, mode) }
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        return fd
    }

    public static func readLink(_ path: RawPath) throws -> RawPath {
        var buffer = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = path.withCString { p in
            buffer.withUnsafeMutableBytes { readlink(p, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) }
        }
        guard n >= 0 else { throw SandboxError.system("readlink(\(path))") }
        return RawPath(buffer[0..<n])
    }

    /// The working directory (without Foundation's FileManager); `/` if it has gone.
    public static func currentDirectory() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return "/" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
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

    /// Names in a directory the store made (without `.` and `..`), sorted by their bytes. For
    /// names a sandbox or an archive chose, use `list(_: RawPath)`: a name that is not UTF-8
    /// appears here escaped, as no file is named.
    public static func list(_ path: String) throws -> [String] {
        try list(RawPath(path)).map { $0.string ?? $0.description }
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

    public static func readAll(fd: Int32, path: @autoclosure () -> String) throws -> [UInt8] {
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(\(path()))") }
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

    public static func writeAll(fd: Int32, _ bytes: [UInt8], path: @autoclosure () -> String) throws {
        try bytes.withUnsafeBytes { try writeAll(fd: fd, $0, path: path()) }
    }

    /// Writes every byte, retrying short writes and EINTR; `path` names the file in an error.
    public static func writeAll(fd: Int32, _ bytes: UnsafeRawBufferPointer, path: @autoclosure () -> String) throws {
        var done = 0
        while done < bytes.count {
            let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw SandboxError.system("write(\(path()))") }
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

    /// Removes a tree without following symlinks. Missing paths are fine. Any name and any
    /// depth: the tree is walked through directory descriptors (see `removeTree(in:_:)`).
    public static func removeTree(_ path: String) throws {
        var trimmed = path
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
        let slash = trimmed.lastIndex(of: "/")
        let parentPath = slash.map { $0 == trimmed.startIndex ? "/" : String(trimmed[..<$0]) } ?? "."
        let name = slash.map { String(trimmed[trimmed.index(after: $0)...]) } ?? trimmed
        let parent: DirectoryHandle
        do {
            parent = try DirectoryHandle(path: parentPath)
        } catch let error as SandboxError where error.errno == ENOENT {
            return
        }
        try removeTree(in: parent, RawPath(name))
    }

    /// Removes `name` in `directory` and everything below it, without following symlinks,
    /// holding two descriptors whatever the depth. It carries on past an entry it cannot
    /// remove and then throws the first failure with the count.
    public static func removeTree(in directory: DirectoryHandle, _ name: RawPath) throws {
        guard let st = try directory.status(name) else { return }
        guard st.isDirectory else { return try directory.remove(name, directory: false) }
        var failures: [SandboxError] = []
        func attempt(_ body: () throws -> Void) {
            do { try body() } catch let error as SandboxError { failures.append(error) } catch {
                failures.append(SandboxError(.systemCall, "\(error)"))
            }
        }
        attempt {
            try TreeWalker.walk(
                try directory.directory(name),
                visit: { entry in
                    if entry.status.isDirectory { return true }
                    attempt { try entry.parent.remove(entry.name, directory: false) }
                    return false
                },
                leave: { entry in attempt { try entry.parent.remove(entry.name, directory: true) } })
        }
        attempt { try directory.remove(name, directory: true) }
        guard let first = failures.first else { return }
        throw failures.count == 1
            ? first
            : SandboxError(
                first.code, "\(first.message) (and \(failures.count - 1) more entries could not be removed)",
                errno: first.errno)
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
        try copyContents(from: input, to: output, name: destination)
    }

    /// Copies the rest of `input` to `output` (in the kernel where it can).
    public static func copyContents(from input: Int32, to output: Int32, name: @autoclosure () -> String) throws {
        while true {
            let n = csb_copy_file_range(input, output, 1 << 30)
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS) {
                let bytes = try readAll(fd: input, path: name())
                try writeAll(fd: output, bytes, path: name())
                break
            }
            guard n >= 0 else { throw SandboxError.system("copy_file_range(\(name()))") }
            if n == 0 { break }
        }
    }
}

extension stat {
    public var isDirectory: Bool { (st_mode & S_IFMT) == S_IFDIR }
    public var isRegular: Bool { (st_mode & S_IFMT) == S_IFREG }
    public var isSymlink: Bool { (st_mode & S_IFMT) == S_IFLNK }
    /// An overlayfs whiteout: a character device with device number 0/0.
    package var isWhiteout: Bool { (st_mode & S_IFMT) == S_IFCHR && st_rdev == 0 }
}
