import Glibc
import SystemSupport

/// Writes a tar stream into a fresh layer directory, refusing members that would land outside
/// it: `..` components, paths through symlinks, hard links to targets outside. OCI whiteouts
/// (`.wh.NAME`, `.wh..wh..opq`) become overlayfs whiteouts and opaque directories.
///
/// Names are bytes from the tar header to the file system, and every file is created through
/// a descriptor of its parent directory (`mkdirat`, `openat`, `symlinkat`, …), so no name is
/// changed and no path is too long.
public struct LayerExtractor {
    public let root: String
    private var tree: DirectoryTree
    private var directoryTimes: [RawPath: Int64] = [:]

    /// - Parameter root: an empty directory owned by the caller (under the store's `tmp/`).
    public init(root: String) {
        self.root = root
        self.tree = DirectoryTree(root: root)
    }

    /// Extracts every entry of `reader` and then fixes directory times.
    public mutating func extract(_ reader: inout TarReader, source: String) throws {
        while let entry = try reader.next() {
            try add(entry, source: source) { buffer in try reader.readContent(into: buffer) }
        }
        try finish()
    }

    /// Normalizes a member name to components, or throws when it escapes.
    package static func components(_ path: RawPath, source: String) throws -> [RawPath] {
        var parts: [RawPath] = []
        for part in path.components {
            if part.bytes == [0x2e] { continue }
            if part.bytes == [0x2e, 0x2e] {
                throw SandboxError(
                    .pathEscapes,
                    "\(source): member \(path) contains '..' and would escape the image; the archive is refused")
            }
            parts.append(part)
        }
        guard !path.containsNUL else {
            throw SandboxError(
                .invalidArgument, "\(source): member \(path) has a NUL byte in its name; the archive is refused")
        }
        return parts
    }

    mutating func add(
        _ entry: TarEntry, source: String, content: (UnsafeMutableRawBufferPointer) throws -> Int
    ) throws {
        let parts = try LayerExtractor.components(entry.path, source: source)
        guard let name = parts.last else { return }  // the root itself: nothing to create
        let parent = try tree.directory(parts.dropLast(), member: entry.path, source: source)

        if name.bytes == Array(".wh..wh..opq".utf8) {
            try parent.setXattr(nil, "trusted.overlay.opaque", Array("y".utf8))
            return
        }
        if name.hasPrefix(".wh..wh.") { return }  // other AUFS bookkeeping (.wh..wh.plnk): nothing to make
        if name.hasPrefix(".wh.") {
            let hidden = name.dropFirst(4)
            guard !hidden.isEmpty, hidden.bytes != [0x2e], hidden.bytes != [0x2e, 0x2e] else {
                throw SandboxError(
                    .invalidArgument,
                    "\(source): member \(entry.path) is a whiteout of '\(hidden)', which names no file; the archive is refused"
                )
            }
            try FileSystem.removeTree(in: parent, hidden)
            if hidden.withCString({ mknodat(parent.fd, $0, S_IFCHR | 0o000, 0) }) != 0 {
                throw SandboxError.system("mknodat(whiteout \(parent.label(hidden)))")
            }
            return
        }
        // A later member replaces an earlier one, except directory over directory (merged).
        if let existing = try parent.status(name), !(existing.isDirectory && entry.kind == .directory) {
            try FileSystem.removeTree(in: parent, name)
        }
        let created: Int32
        switch entry.kind {
        case .directory:
            if !(try parent.status(name)?.isDirectory ?? false) { try parent.makeDirectory(name, mode: 0o700) }
            directoryTimes[RawPath(parts.map(\.bytes).joined(separator: [0x2f]))] = entry.mtime
            created = 0
        case .regular:
            let fd = try parent.openFile(name, flags: O_WRONLY | O_CREAT | O_EXCL)
            defer { close(fd) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
            defer { buffer.deallocate() }
            while true {
                let n = try content(buffer)
                if n == 0 { break }
                try FileSystem.writeAll(
                    fd: fd, UnsafeRawBufferPointer(rebasing: buffer[0..<n]), path: parent.label(name))
            }
            created = 0
        case .symlink(let target):
            guard !target.containsNUL else {
                throw SandboxError(.invalidArgument, "\(source): symlink \(entry.path) has a NUL byte in its target")
            }
            created = target.withCString { t in name.withCString { symlinkat(t, parent.fd, $0) } }
        case .hardlink(let target):
            let targetParts = try LayerExtractor.components(target, source: source)
            let targetParent = try tree.directory(targetParts.dropLast(), member: target, source: source)
            let targetName = targetParts.last ?? "."
            guard let st = try targetParent.status(targetName), !st.isDirectory else {
                throw SandboxError(
                    .invalidArgument,
                    "\(source): hard link \(entry.path) points to \(target), which is not in the archive before it")
            }
            let rc = targetName.withCString { t in name.withCString { linkat(targetParent.fd, t, parent.fd, $0, 0) } }
            if rc != 0 { throw SandboxError.system("linkat(\(parent.label(name)))") }
            return  // a hard link shares the target's metadata
        case .characterDevice(let major, let minor):
            created = name.withCString { mknodat(parent.fd, $0, S_IFCHR | 0o600, makeDevice(major, minor)) }
        case .blockDevice(let major, let minor):
            created = name.withCString { mknodat(parent.fd, $0, S_IFBLK | 0o600, makeDevice(major, minor)) }
        case .fifo:
            created = name.withCString { mkfifoat(parent.fd, $0, 0o600) }
        }
        if created != 0 { throw SandboxError.system("creating \(parent.label(name))") }
        try Metadata.apply(
            in: parent, name, isSymlink: { if case .symlink = entry.kind { return true } else { return false } }(),
            mode: entry.mode, uid: entry.uid, gid: entry.gid, mtime: entry.kind == .directory ? nil : entry.mtime,
            // overlayfs's own attributes (redirects, metacopy, opaque) never come from an archive.
            xattrs: entry.xattrs.filter { LayerArchiver.isLayerXattr($0.0) })
    }

    /// Directory times last: creating children changes them. One walk, children first.
    mutating func finish() throws {
        guard !directoryTimes.isEmpty else { return }
        let times = directoryTimes
        try TreeWalker.walk(
            try DirectoryHandle(path: root), visit: { $0.status.isDirectory },
            leave: { directory in
                if let mtime = times[directory.path] {
                    try Metadata.setTime(in: directory.parent, directory.name, mtime)
                }
            })
        directoryTimes.removeAll()
    }
}

/// Opens directories below a root by their components, creating missing ones and refusing
/// symlinks and non-directories on the way. Archives list a directory's members together, so
/// the last directory opened is kept and a member below it costs one `openat`, not one per level.
public struct DirectoryTree {
    public let rootPath: String
    private var root: DirectoryHandle?
    private var last: (parts: [RawPath], handle: DirectoryHandle)?

    public init(root: String) {
        self.rootPath = root
    }

    /// The directory `parts` below the root, made where missing.
    /// - Parameters: `member` and `source` name what is being written, in errors.
    public mutating func directory(
        _ parts: ArraySlice<RawPath>, member: RawPath, source: String
    ) throws
        -> DirectoryHandle
    {
        let parts = Array(parts)
        var current: DirectoryHandle
        var start = 0
        if let last, parts.starts(with: last.parts) {
            current = last.handle
            start = last.parts.count
        } else {
            if root == nil { root = try DirectoryHandle(path: rootPath) }
            current = root!
        }
        for part in parts[start...] {
            if let st = try current.status(part) {
                if st.isSymlink {
                    throw SandboxError(
                        .pathEscapes,
                        "\(source): member \(member) goes through the symlink \(part), which is refused")
                }
                guard st.isDirectory else {
                    throw SandboxError(
                        .invalidArgument,
                        "\(source): member \(member) needs \(part) to be a directory, but it is a file")
                }
            } else {
                try current.makeDirectory(part, mode: 0o755)
            }
            current = try current.directory(part)
        }
        last = (parts, current)
        return current
    }
}

/// Ownership, permissions, times and xattrs of one entry (never following a final symlink).
package enum Metadata {
    static func apply(
        in directory: DirectoryHandle, _ name: RawPath, isSymlink: Bool, mode: UInt32, uid: UInt32, gid: UInt32,
        mtime: Int64?, xattrs: [(String, [UInt8])]
    ) throws {
        if name.withCString({ fchownat(directory.fd, $0, uid, gid, AT_SYMLINK_NOFOLLOW) }) != 0 {
            throw SandboxError.system("fchownat(\(directory.label(name)))")
        }
        // Not a symlink (checked by the caller, who just made it): fchmodat cannot follow one here.
        if !isSymlink && name.withCString({ fchmodat(directory.fd, $0, mode_t(mode & 0o7777), 0) }) != 0 {
            throw SandboxError.system("fchmodat(\(directory.label(name)))")
        }
        for (attribute, value) in xattrs { try directory.setXattr(name, attribute, value) }
        if let mtime { try setTime(in: directory, name, mtime) }
    }

    static func setTime(in directory: DirectoryHandle, _ name: RawPath, _ mtime: Int64) throws {
        var times = [timespec(tv_sec: Int(mtime), tv_nsec: 0), timespec(tv_sec: Int(mtime), tv_nsec: 0)]
        if name.withCString({ utimensat(directory.fd, $0, &times, AT_SYMLINK_NOFOLLOW) }) != 0 {
            throw SandboxError.system("utimensat(\(directory.label(name)))")
        }
    }

    package static func setTime(_ path: String, _ mtime: Int64) throws {
        var times = [timespec(tv_sec: Int(mtime), tv_nsec: 0), timespec(tv_sec: Int(mtime), tv_nsec: 0)]
        if utimensat(AT_FDCWD, path, &times, AT_SYMLINK_NOFOLLOW) != 0 {
            throw SandboxError.system("utimensat(\(path))")
        }
    }
}
