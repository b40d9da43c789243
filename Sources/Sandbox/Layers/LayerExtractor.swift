import Glibc

/// Writes a tar stream into a fresh layer directory, refusing members that would land outside
/// it: `..` components, paths through symlinks, hard links to targets outside. OCI whiteouts
/// (`.wh.NAME`, `.wh..wh..opq`) become overlayfs whiteouts and opaque directories.
public struct LayerExtractor {
    public let root: String
    private var directoryTimes: [(String, Int64)] = []

    /// - Parameter root: an empty directory owned by the caller (under the store's `tmp/`).
    public init(root: String) {
        self.root = root
    }

    /// Extracts every entry of `reader` and then fixes directory times.
    public mutating func extract(_ reader: inout TarReader, source: String) throws {
        while let entry = try reader.next() {
            try add(entry, source: source) { buffer in try reader.readContent(into: buffer) }
        }
        try finish()
    }

    /// Normalizes a member name to components, or throws when it escapes.
    static func components(_ path: String, source: String) throws -> [String] {
        var parts: [String] = []
        for part in path.split(separator: "/", omittingEmptySubsequences: true) {
            if part == "." { continue }
            if part == ".." {
                throw SandboxError(
                    .pathEscapes,
                    "\(source): member \(path) contains '..' and would escape the image; the archive is refused")
            }
            parts.append(String(part))
        }
        return parts
    }

    /// Makes sure every parent of `parts` is a real directory inside the root, creating
    /// missing ones.
    private func parentDirectory(_ parts: [String], member: String, source: String) throws -> String {
        var path = root
        for part in parts.dropLast() {
            path += "/" + part
            if let st = try FileSystem.status(path) {
                if st.isSymlink {
                    throw SandboxError(
                        .pathEscapes,
                        "\(source): member \(member) goes through the symlink \(part); the archive is refused")
                }
                guard st.isDirectory else {
                    throw SandboxError(
                        .invalidArgument,
                        "\(source): member \(member) needs \(part) to be a directory, but it is a file")
                }
            } else {
                try FileSystem.makeDirectory(path, mode: 0o755)
            }
        }
        return path
    }

    mutating func add(
        _ entry: TarEntry, source: String, content: (UnsafeMutableRawBufferPointer) throws -> Int
    ) throws {
        let parts = try LayerExtractor.components(entry.path, source: source)
        guard let name = parts.last else { return }  // the root itself: nothing to create
        let parent = try parentDirectory(parts, member: entry.path, source: source)
        let path = parent + "/" + name

        if name == ".wh..wh..opq" {
            try FileSystem.setXattr(parent, "trusted.overlay.opaque", Array("y".utf8))
            return
        }
        if name.hasPrefix(".wh.") {
            let hidden = parent + "/" + name.dropFirst(4)
            try FileSystem.removeTree(hidden)
            if mknod(hidden, S_IFCHR | 0o000, 0) != 0 { throw SandboxError.system("mknod(whiteout \(hidden))") }
            return
        }
        // A later member replaces an earlier one, except directory over directory (merged).
        if let existing = try FileSystem.status(path), !(existing.isDirectory && entry.kind == .directory) {
            try FileSystem.removeTree(path)
        }
        switch entry.kind {
        case .directory:
            if !FileSystem.isDirectory(path) { try FileSystem.makeDirectory(path, mode: 0o700) }
            directoryTimes.append((path, entry.mtime))
        case .regular:
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
            guard fd >= 0 else { throw SandboxError.system("open(\(path), O_CREAT)") }
            defer { close(fd) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
            defer { buffer.deallocate() }
            while true {
                let n = try content(buffer)
                if n == 0 { break }
                try FileSystem.writeAll(fd: fd, UnsafeRawBufferPointer(rebasing: buffer[0..<n]), path: path)
            }
        case .symlink(let target):
            if symlink(target, path) != 0 { throw SandboxError.system("symlink(\(path))") }
        case .hardlink(let target):
            let targetParts = try LayerExtractor.components(target, source: source)
            let targetParent = try parentDirectory(targetParts, member: target, source: source)
            let targetPath = targetParent + "/" + (targetParts.last ?? "")
            guard let st = try FileSystem.status(targetPath), !st.isDirectory else {
                throw SandboxError(
                    .invalidArgument,
                    "\(source): hard link \(entry.path) points to \(target), which is not in the archive before it")
            }
            if link(targetPath, path) != 0 { throw SandboxError.system("link(\(path))") }
            return  // a hard link shares the target's metadata
        case .characterDevice(let major, let minor):
            if mknod(path, S_IFCHR | 0o600, makeDevice(major, minor)) != 0 {
                throw SandboxError.system("mknod(\(path))")
            }
        case .blockDevice(let major, let minor):
            if mknod(path, S_IFBLK | 0o600, makeDevice(major, minor)) != 0 {
                throw SandboxError.system("mknod(\(path))")
            }
        case .fifo:
            if mkfifo(path, 0o600) != 0 { throw SandboxError.system("mkfifo(\(path))") }
        }
        try Metadata.apply(
            to: path, isSymlink: { if case .symlink = entry.kind { return true } else { return false } }(),
            mode: entry.mode, uid: entry.uid, gid: entry.gid, mtime: entry.kind == .directory ? nil : entry.mtime,
            // overlayfs's own attributes (redirects, metacopy, opaque) never come from an archive.
            xattrs: entry.xattrs.filter { !$0.0.hasPrefix("trusted.overlay.") && !$0.0.hasPrefix("user.overlay.") })
    }

    /// Directory times last: creating children changes them.
    mutating func finish() throws {
        for (path, mtime) in directoryTimes.reversed() { try Metadata.setTime(path, mtime) }
        directoryTimes.removeAll()
    }
}

/// Ownership, permissions, times and xattrs of one path (never following a final symlink).
enum Metadata {
    static func apply(
        to path: String, isSymlink: Bool, mode: UInt32, uid: UInt32, gid: UInt32, mtime: Int64?,
        xattrs: [(String, [UInt8])]
    ) throws {
        if lchown(path, uid, gid) != 0 { throw SandboxError.system("lchown(\(path))") }
        if !isSymlink && chmod(path, mode_t(mode & 0o7777)) != 0 { throw SandboxError.system("chmod(\(path))") }
        for (name, value) in xattrs { try FileSystem.setXattr(path, name, value) }
        if let mtime { try setTime(path, mtime) }
    }

    static func setTime(_ path: String, _ mtime: Int64) throws {
        var times = [timespec(tv_sec: Int(mtime), tv_nsec: 0), timespec(tv_sec: Int(mtime), tv_nsec: 0)]
        if utimensat(AT_FDCWD, path, &times, AT_SYMLINK_NOFOLLOW) != 0 {
            throw SandboxError.system("utimensat(\(path))")
        }
    }
}
