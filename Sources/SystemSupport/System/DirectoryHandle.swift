import CSandbox
import Glibc

/// An open directory. Everything inside it is reached through its descriptor (`openat`,
/// `fstatat`, `readlinkat`, `unlinkat`, …) by a raw name, never by a path string the kernel
/// would resolve again: no name is too long, no byte is lost, no symlink is followed.
///
/// The descriptor is immutable and closed when the handle goes away.
public final class DirectoryHandle: Sendable {
    public let fd: Int32
    /// Where it was opened: a path, and the names below it (kept as bytes; only an error
    /// message spells them out).
    let base: String
    let relative: RawPath

    /// Opens the directory at `path`, which must not be a symlink.
    public convenience init(path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw SandboxError.system("open(\(path), O_DIRECTORY)") }
        self.init(fd: fd, label: path)
    }

    /// Takes ownership of `fd`, an open directory.
    package init(fd: Int32, label: String, relative: RawPath = "") {
        self.fd = fd
        self.base = label
        self.relative = relative
    }

    deinit { close(fd) }

    /// How errors name this directory (the path it was opened as, escaped for display).
    public var label: String {
        relative.isEmpty ? base : base.isEmpty ? relative.description : base + "/" + relative.description
    }

    /// How errors name `name` inside this directory.
    public func label(_ name: RawPath) -> String { label + "/" + name.description }

    /// A handle for `fd`, the directory `name` inside this one.
    func child(fd: Int32, _ name: RawPath) -> DirectoryHandle {
        DirectoryHandle(fd: fd, label: base, relative: relative.appending(name))
    }

    /// The names in the directory (without `.` and `..`), sorted by their bytes.
    public func entries() throws -> [RawPath] {
        // fdopendir takes the descriptor it is given: hand it a duplicate, rewound.
        let copy = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard copy >= 0 else { throw SandboxError.system("openat(\(label), .)") }
        guard let dir = fdopendir(copy) else {
            close(copy)
            throw SandboxError.system("fdopendir(\(label))")
        }
        defer { closedir(dir) }
        var names: [RawPath] = []
        while true {
            errno = 0
            guard let entry = readdir(dir) else {
                if errno != 0 { throw SandboxError.system("readdir(\(label))") }
                break
            }
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in RawPath(raw.prefix { $0 != 0 }) }
            if name.bytes != [0x2e] && name.bytes != [0x2e, 0x2e] { names.append(name) }
        }
        return names.sorted()
    }

    /// `fstat` of the directory itself.
    public func status() throws -> stat {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SandboxError.system("fstat(\(label))") }
        return st
    }

    /// `fstatat` without following a symlink; nil when the name does not exist.
    public func status(_ name: RawPath) throws -> stat? {
        var st = stat()
        let rc = name.withCString { fstatat(fd, $0, &st, AT_SYMLINK_NOFOLLOW) }
        if rc == 0 { return st }
        if errno == ENOENT || errno == ENOTDIR { return nil }
        throw SandboxError.system("fstatat(\(label(name)))")
    }

    /// Opens the subdirectory `name` (refusing a symlink).
    public func directory(_ name: RawPath) throws -> DirectoryHandle {
        let child = name.withCString { openat(fd, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        guard child >= 0 else { throw SandboxError.system("openat(\(label(name)), O_DIRECTORY)") }
        return self.child(fd: child, name)
    }

    /// Opens the directory at the relative path `path` one component at a time, refusing
    /// symlinks and `..` anywhere on the way.
    public func directory(atPath path: RawPath) throws -> DirectoryHandle {
        var current = self
        for part in path.components where part.bytes != [0x2e] {
            guard part.bytes != [0x2e, 0x2e] else {
                throw SandboxError(.pathEscapes, "\(path) climbs out of \(label) with '..'")
            }
            current = try current.directory(part)
        }
        return current
    }

    /// Opens `name` with `flags` (`O_NOFOLLOW | O_CLOEXEC` always added). The caller closes it.
    public func openFile(_ name: RawPath, flags: Int32, mode: mode_t = 0o600) throws -> Int32 {
        let opened = name.withCString { openat(fd, $0, flags | O_NOFOLLOW | O_CLOEXEC, mode) }
        guard opened >= 0 else { throw SandboxError.system("openat(\(label(name)))") }
        return opened
    }

    /// The target of the symlink `name`, as bytes.
    public func readLink(_ name: RawPath) throws -> RawPath {
        var buffer = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = name.withCString { path in
            buffer.withUnsafeMutableBytes {
                readlinkat(fd, path, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count)
            }
        }
        guard n >= 0 else { throw SandboxError.system("readlinkat(\(label(name)))") }
        return RawPath(buffer[0..<n])
    }

    public func makeDirectory(_ name: RawPath, mode: mode_t) throws {
        if name.withCString({ mkdirat(fd, $0, mode) }) != 0 { throw SandboxError.system("mkdirat(\(label(name)))") }
    }

    /// Removes a file, symlink or (with `directory`) an empty directory; a missing name is fine.
    public func remove(_ name: RawPath, directory: Bool) throws {
        if name.withCString({ unlinkat(fd, $0, directory ? AT_REMOVEDIR : 0) }) != 0 && errno != ENOENT {
            throw SandboxError.system("\(directory ? "rmdir" : "unlink")(\(label(name)))")
        }
    }

    /// The path through which the name-based xattr calls (which take no directory descriptor
    /// on the kernels Debian ships) reach `name` inside this directory: `/proc/self/fd/N/name`.
    /// The l-variants do not follow `name` itself when it is a symlink.
    private func procPath(_ name: RawPath) -> RawPath {
        RawPath("/proc/self/fd/\(fd)/") + name
    }

    /// Extended attribute names of `name` (or of the directory itself when nil), not following
    /// a symlink. A name that is not UTF-8 is refused: no layer may hold what its digest hides.
    public func xattrNames(_ name: RawPath? = nil) throws -> [String] {
        let list: [UInt8] =
            try readXattr(name, what: "llistxattr") { path, buffer, size in
                if let path { return llistxattr(path, buffer, size) }
                return flistxattr(fd, buffer, size)
            } ?? []
        return try list.split(separator: 0).map { raw in
            guard let text = String(validating: raw, as: UTF8.self) else {
                throw SandboxError(
                    .invalidArgument,
                    "\(name.map(label) ?? label) has an extended attribute whose name is not UTF-8 (\(RawPath.escape(Array(raw)))); remove it"
                )
            }
            return text
        }
    }

    /// The value of xattr `attribute` of `name` (or of the directory), or nil when it has none.
    public func xattr(_ name: RawPath? = nil, _ attribute: String) throws -> [UInt8]? {
        try readXattr(name, what: "lgetxattr(\(attribute))") { path, buffer, size in
            if let path { return lgetxattr(path, attribute, buffer, size) }
            return fgetxattr(fd, attribute, buffer, size)
        }
    }

    /// Sets xattr `attribute` of `name` (or of the directory itself when nil).
    public func setXattr(_ name: RawPath?, _ attribute: String, _ value: [UInt8]) throws {
        let rc = value.withUnsafeBytes { bytes in
            guard let name else { return fsetxattr(fd, attribute, bytes.baseAddress, bytes.count, 0) }
            return procPath(name).withCString { lsetxattr($0, attribute, bytes.baseAddress, bytes.count, 0) }
        }
        if rc != 0 { throw SandboxError.system("lsetxattr(\(name.map(label) ?? label), \(attribute))") }
    }

    /// Sizes, then reads, an xattr list or value (retrying when it grew in between); nil when
    /// there is no such attribute (or no xattrs on this file system).
    private func readXattr(
        _ name: RawPath?, what: String, _ call: (UnsafePointer<CChar>?, UnsafeMutableRawPointer?, Int) -> Int
    ) throws -> [UInt8]? {
        let path = name.map(procPath)
        func run(_ buffer: UnsafeMutableRawPointer?, _ size: Int) -> Int {
            if let path { return path.withCString { call($0, buffer, size) } }
            return call(nil, buffer, size)
        }
        while true {
            let size = run(nil, 0)
            if size < 0 {
                if errno == ENODATA || errno == ENOTSUP { return nil }
                throw SandboxError.system("\(what) of \(name.map(label) ?? label)")
            }
            if size == 0 { return [] }
            var buffer = [UInt8](repeating: 0, count: size)
            let n = buffer.withUnsafeMutableBytes { run($0.baseAddress, size) }
            if n < 0 && errno == ERANGE { continue }
            if n < 0 && errno == ENODATA { return nil }
            guard n >= 0 else { throw SandboxError.system("\(what) of \(name.map(label) ?? label)") }
            return Array(buffer[0..<n])
        }
    }
}
