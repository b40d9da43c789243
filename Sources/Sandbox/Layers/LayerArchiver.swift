import Crypto
import Glibc

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

/// Turns a layer directory (overlayfs upper form) into its canonical tar stream: entries in
/// byte order, parents first, whiteouts as `.wh.NAME`, opaque directories as `.wh..wh..opq`,
/// overlay's private xattrs left out, times in whole seconds. The same tree always gives the
/// same bytes, so the stream's sha256 identifies the layer.
public enum LayerArchiver {
    static let opaqueXattrs = ["trusted.overlay.opaque", "user.overlay.opaque"]

    /// Computes the layer's summary; if `writer` is given, also writes the stream to it.
    public static func archive(
        directory: String, to writer: ((UnsafeRawBufferPointer) throws -> Void)? = nil
    )
        throws -> LayerSummary
    {
        var hasher = SHA256()
        var summary = LayerSummary(digest: "", files: 0, entries: 0, bytes: 0)
        let tar = TarWriter { chunk in
            hasher.update(bufferPointer: chunk)
            try writer?(chunk)
        }
        var hardlinks: [HardlinkKey: String] = [:]
        try walk(root: directory, relative: "", tar: tar, summary: &summary, hardlinks: &hardlinks)
        try tar.finish()
        summary.digest = "sha256:" + hasher.finalize().hexString
        return summary
    }

    struct HardlinkKey: Hashable {
        var device: UInt
        var inode: UInt
    }

    private static func walk(
        root: String, relative: String, tar: TarWriter, summary: inout LayerSummary,
        hardlinks: inout [HardlinkKey: String]
    ) throws {
        let directory = relative.isEmpty ? root : root + "/" + relative
        if !relative.isEmpty && isOpaque(directory) {
            try tar.append(TarEntry(path: relative + "/.wh..wh..opq", kind: .regular, mode: 0))
            summary.entries += 1
            summary.files += 1
        }
        for name in try FileSystem.list(directory) {
            let path = directory + "/" + name
            let member = relative.isEmpty ? name : relative + "/" + name
            guard let st = try FileSystem.status(path) else { continue }
            if st.isWhiteout {
                let parent = relative.isEmpty ? "" : relative + "/"
                try tar.append(TarEntry(path: parent + ".wh." + name, kind: .regular, mode: 0))
                summary.entries += 1
                summary.files += 1
                continue
            }
            let type = st.st_mode & S_IFMT
            if type == S_IFSOCK { continue }  // sockets cannot be archived; they die with the run
            var entry = TarEntry(
                path: member, kind: .regular, mode: UInt32(st.st_mode & 0o7777), uid: st.st_uid, gid: st.st_gid,
                mtime: Int64(st.st_mtim.tv_sec), xattrs: xattrs(of: path))
            switch type {
            case S_IFDIR:
                entry.kind = .directory
                try tar.append(entry)
                summary.entries += 1
                try walk(root: root, relative: member, tar: tar, summary: &summary, hardlinks: &hardlinks)
                continue
            case S_IFLNK:
                entry.kind = .symlink(target: try FileSystem.readLink(path))
            case S_IFCHR:
                entry.kind = .characterDevice(major: deviceMajor(st.st_rdev), minor: deviceMinor(st.st_rdev))
            case S_IFBLK:
                entry.kind = .blockDevice(major: deviceMajor(st.st_rdev), minor: deviceMinor(st.st_rdev))
            case S_IFIFO:
                entry.kind = .fifo
            default:
                if st.st_nlink > 1 {
                    let key = HardlinkKey(device: st.st_dev, inode: st.st_ino)
                    if let first = hardlinks[key] {
                        entry.kind = .hardlink(target: first)
                        entry.xattrs = []
                        try tar.append(entry)
                        summary.entries += 1
                        summary.files += 1
                        continue
                    }
                    hardlinks[key] = member
                }
                entry.size = Int64(st.st_size)
                summary.bytes += entry.size
                try tar.append(entry) { emit in try streamFile(path, size: entry.size, emit: emit) }
                summary.entries += 1
                summary.files += 1
                continue
            }
            try tar.append(entry)
            summary.entries += 1
            summary.files += 1
        }
    }

    static func isOpaque(_ directory: String) -> Bool {
        opaqueXattrs.contains { FileSystem.xattr(directory, $0) == Array("y".utf8) }
    }

    /// The xattrs that belong in a layer: everything but overlayfs's own bookkeeping.
    static func xattrs(of path: String) -> [(String, [UInt8])] {
        FileSystem.xattrNames(path).filter { !$0.hasPrefix("trusted.overlay.") && !$0.hasPrefix("user.overlay.") }
            .sorted().compactMap { name in FileSystem.xattr(path, name).map { (name, $0) } }
    }

    /// Streams a regular file's bytes in chunks.
    static func streamFile(_ path: String, size: Int64, emit: (UnsafeRawBufferPointer) throws -> Void) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        defer { close(fd) }
        let capacity = Int(min(max(size, 4096), 1 << 20))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
        defer { buffer.deallocate() }
        var remaining = size
        while remaining > 0 {
            let n = read(fd, buffer.baseAddress, Int(min(Int64(capacity), remaining)))
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(\(path))") }
            if n == 0 {
                throw SandboxError(.corrupt, "\(path) shrank while it was read; nothing may write to a layer")
            }
            try emit(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            remaining -= Int64(n)
        }
    }
}

extension Sequence where Element == UInt8 {
    var hexString: String {
        var s = ""
        for byte in self {
            s += String(byte >> 4, radix: 16) + String(byte & 0xf, radix: 16)
        }
        return s
    }
}

extension SHA256.Digest {
    var hexString: String { Array(self).hexString }
}

func deviceMajor(_ dev: UInt) -> UInt32 {
    UInt32(truncatingIfNeeded: ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt(0xfff)))
}
func deviceMinor(_ dev: UInt) -> UInt32 { UInt32(truncatingIfNeeded: (dev & 0xff) | ((dev >> 12) & ~UInt(0xff))) }
func makeDevice(_ major: UInt32, _ minor: UInt32) -> dev_t {
    let ma = UInt64(major), mi = UInt64(minor)
    return dev_t((ma & 0xfff) << 8 | (ma & ~UInt64(0xfff)) << 32 | (mi & 0xff) | (mi & ~UInt64(0xff)) << 12)
}
