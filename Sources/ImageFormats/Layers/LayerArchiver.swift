import Glibc
import SystemSupport

/// What a layer holds, computed from its canonical tar stream.
public struct LayerSummary: Sendable, Equatable {
    /// `sha256:<hex>` of the canonical tar stream: the OCI `diff_id` of this layer.
    public var digest: String
    /// Non-directory entries (files, links, devices, whiteouts).
    public var files: Int
    /// Entries of any kind.
    public var entries: Int
    /// Bytes of regular file content.
    public var bytes: Int64
}

/// What an archive may cost before it stops: checked before a file's bytes are read, and
/// between chunks, so that a change past the limit costs no more than the limit.
public struct ArchiveBudget: Sendable {
    /// The most bytes of file content the layer may hold.
    public var maxBytes: Int64?
    /// The most bytes of holes one file may have: a layer holds a file whole, so a sparse
    /// `truncate -s 200G` would cost 200 GiB of hashing and storage.
    public var maxHoleBytes: Int64?
    /// Stops the archive (a timeout, a cancelled run).
    public var cancellation: Cancellation?

    public init(maxBytes: Int64? = nil, maxHoleBytes: Int64? = nil, cancellation: Cancellation? = nil) {
        self.maxBytes = maxBytes
        self.maxHoleBytes = maxHoleBytes
        self.cancellation = cancellation
    }

    /// For a run's change: its limit, at most 1 GiB of holes per file.
    public static func commit(maxBytes: Int64?, cancellation: Cancellation?) -> ArchiveBudget {
        ArchiveBudget(maxBytes: maxBytes, maxHoleBytes: 1 << 30, cancellation: cancellation)
    }
}

/// Turns a layer directory (overlayfs upper form) into its canonical tar stream: entries in
/// byte order, parents first, whiteouts as `.wh.NAME`, opaque directories as `.wh..wh..opq`,
/// overlay's private xattrs left out, times in whole seconds. The same tree always gives the
/// same bytes, so the stream's sha256 identifies the layer.
///
/// The stream covers every entry of the directory, byte for byte (names are bytes, not text,
/// and the walk goes through directory descriptors, so no name is lost or too long); what
/// cannot be represented is refused. A layer directory is shared by every image whose change
/// has its digest, so a file the digest did not cover would appear in all of them.
public enum LayerArchiver {
    static let opaqueXattrs = ["trusted.overlay.opaque", "user.overlay.opaque"]
    /// Recorded with each layer this archiver named. 2: names as bytes, every entry covered.
    package static let format = 2

    /// Computes the layer's summary; if `writer` is given, also writes the stream to it.
    /// - Parameter removingSockets: unlink sockets instead of refusing them (an upper being
    ///   committed: a socket dies with the run that bound it, and a tar cannot hold one).
    /// - Throws: `invalidArgument` for an entry the stream cannot represent (a socket, an
    ///   xattr whose name is not UTF-8), `corrupt` when a file changes while it is read.
    public static func archive(
        directory: String, removingSockets: Bool = false, budget: ArchiveBudget = ArchiveBudget(),
        to writer: ((UnsafeRawBufferPointer) throws -> Void)? = nil
    )
        throws -> LayerSummary
    {
        var hasher = Digest.Hasher()
        var summary = LayerSummary(digest: "", files: 0, entries: 0, bytes: 0)
        let tar = TarWriter { chunk in
            hasher.update(chunk)
            try writer?(chunk)
        }
        var hardlinks: [HardlinkKey: RawPath] = [:]
        func add(
            _ entry: TarEntry, isFile: Bool = true,
            content: ((UnsafeRawBufferPointer) throws -> Void) throws -> Void = { _ in }
        ) throws {
            try tar.append(entry, content: content)
            summary.entries += 1
            if isFile { summary.files += 1 }
        }
        try TreeWalker.walk(
            try DirectoryHandle(path: directory),
            visit: { item in
                try budget.cancellation?.check()
                let st = item.status
                let parentPrefix = item.path.bytes.dropLast(item.name.bytes.count)
                if st.isWhiteout {
                    try add(TarEntry(path: RawPath(parentPrefix) + ".wh." + item.name, kind: .regular, mode: 0))
                    return false
                }
                let type = st.st_mode & S_IFMT
                if type == S_IFSOCK {
                    guard removingSockets else {
                        throw SandboxError(
                            .invalidArgument,
                            "\(item.parent.label(item.name)) is a socket, which a layer cannot hold; remove it")
                    }
                    try item.parent.remove(item.name, directory: false)
                    return false
                }
                var entry = TarEntry(
                    path: item.path, kind: .regular, mode: UInt32(st.st_mode & 0o7777), uid: st.st_uid, gid: st.st_gid,
                    mtime: Int64(st.st_mtim.tv_sec), xattrs: try xattrs(of: item.name, in: item.parent))
                switch type {
                case S_IFDIR:
                    entry.kind = .directory
                    try add(entry, isFile: false)
                    return true
                case S_IFLNK: entry.kind = .symlink(target: try item.parent.readLink(item.name))
                case S_IFCHR:
                    entry.kind = .characterDevice(major: deviceMajor(st.st_rdev), minor: deviceMinor(st.st_rdev))
                case S_IFBLK: entry.kind = .blockDevice(major: deviceMajor(st.st_rdev), minor: deviceMinor(st.st_rdev))
                case S_IFIFO: entry.kind = .fifo
                default:
                    if st.st_nlink > 1 {
                        let key = HardlinkKey(device: st.st_dev, inode: st.st_ino)
                        if let first = hardlinks[key] {
                            entry.kind = .hardlink(target: first)
                            entry.xattrs = []
                            try add(entry)
                            return false
                        }
                        hardlinks[key] = item.path
                    }
                    entry.size = Int64(st.st_size)
                    try check(st, name: item.path, total: summary.bytes, against: budget)
                    summary.bytes += entry.size
                    let fd = try item.parent.openFile(item.name, flags: O_RDONLY)
                    defer { close(fd) }
                    try add(entry) { emit in
                        try streamFile(fd, size: entry.size, name: item.parent.label(item.name)) { chunk in
                            try budget.cancellation?.check()
                            try emit(chunk)
                        }
                    }
                    return false
                }
                try add(entry)
                return false
            },
            enter: { item, directory in
                if try isOpaque(directory) {
                    try add(TarEntry(path: item.path + "/.wh..wh..opq", kind: .regular, mode: 0))
                }
            })
        try tar.finish()
        summary.digest = hasher.finalize().description
        return summary
    }

    /// Refuses a file before its bytes are read: past the change's limit, or mostly holes.
    private static func check(_ st: stat, name: RawPath, total: Int64, against budget: ArchiveBudget) throws {
        let size = Int64(st.st_size)
        if let limit = budget.maxBytes, total + size > limit {
            throw SandboxError(
                .limitExceeded,
                "the change holds more than \(ByteCount.format(limit)), the most this run may keep (max_layer_bytes; /\(name) alone is \(ByteCount.format(size))); nothing was kept"
            )
        }
        let allocated = Int64(st.st_blocks) * 512
        if let holes = budget.maxHoleBytes, size - allocated > holes {
            throw SandboxError(
                .limitExceeded,
                "/\(name) is a sparse file of \(ByteCount.format(size)) with \(ByteCount.format(allocated)) written; a layer holds files whole, so nothing was kept: remove it before the run ends, or run with --disposable"
            )
        }
    }

    struct HardlinkKey: Hashable {
        var device: UInt
        var inode: UInt
    }

    static func isOpaque(_ directory: DirectoryHandle) throws -> Bool {
        try opaqueXattrs.contains { try directory.xattr(nil, $0) == Array("y".utf8) }
    }

    static func isOpaque(_ directory: String) throws -> Bool {
        try isOpaque(RawPath(directory))
    }

    /// Whether a directory given as bytes is opaque (overlayfs hides everything below it).
    package static func isOpaque(_ path: RawPath) throws -> Bool {
        let fd = try FileSystem.openFile(path, flags: O_RDONLY | O_DIRECTORY)
        return try isOpaque(DirectoryHandle(fd: fd, label: "", relative: path))
    }

    /// Whether an xattr belongs in a layer: everything but overlayfs's own bookkeeping.
    static func isLayerXattr(_ name: String) -> Bool {
        !name.hasPrefix("trusted.overlay.") && !name.hasPrefix("user.overlay.")
    }

    /// The xattrs of `name` in `directory` that belong in a layer, sorted by name.
    static func xattrs(of name: RawPath, in directory: DirectoryHandle) throws -> [(String, [UInt8])] {
        try directory.xattrNames(name).filter(isLayerXattr).sorted().compactMap { attribute in
            try directory.xattr(name, attribute).map { (attribute, $0) }
        }
    }

    /// The xattrs that belong in a layer, of a path (not following a final symlink).
    static func xattrs(of path: RawPath) throws -> [(String, [UInt8])] {
        let parent = RawPath(path.bytes.dropLast(path.lastComponent.bytes.count))
        let fd = try FileSystem.openFile(parent.isEmpty ? "." : parent, flags: O_RDONLY | O_DIRECTORY)
        return try xattrs(of: path.lastComponent, in: DirectoryHandle(fd: fd, label: "", relative: parent))
    }

    /// Streams a regular file's bytes in chunks.
    static func streamFile(_ path: String, size: Int64, emit: (UnsafeRawBufferPointer) throws -> Void) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        defer { close(fd) }
        try streamFile(fd, size: size, name: path, emit: emit)
    }

    /// Streams `size` bytes of an open regular file in chunks.
    static func streamFile(
        _ fd: Int32, size: Int64, name: @autoclosure () -> String, emit: (UnsafeRawBufferPointer) throws -> Void
    ) throws {
        let capacity = Int(min(max(size, 4096), 1 << 20))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
        defer { buffer.deallocate() }
        var remaining = size
        while remaining > 0 {
            let n = read(fd, buffer.baseAddress, Int(min(Int64(capacity), remaining)))
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(\(name()))") }
            if n == 0 {
                throw SandboxError(.corrupt, "\(name()) shrank while it was read; nothing may write to a layer")
            }
            try emit(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            remaining -= Int64(n)
        }
    }
}

func deviceMajor(_ dev: UInt) -> UInt32 {
    UInt32(truncatingIfNeeded: ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt(0xfff)))
}
func deviceMinor(_ dev: UInt) -> UInt32 { UInt32(truncatingIfNeeded: (dev & 0xff) | ((dev >> 12) & ~UInt(0xff))) }
func makeDevice(_ major: UInt32, _ minor: UInt32) -> dev_t {
    let ma = UInt64(major), mi = UInt64(minor)
    return dev_t((ma & 0xfff) << 8 | (ma & ~UInt64(0xfff)) << 32 | (mi & 0xff) | (mi & ~UInt64(0xff)) << 12)
}
