import Glibc
import SystemSupport

/// A read-only view of an image's merged file tree, computed from its layer directories the way
/// overlayfs would: upper layers hide lower ones, whiteouts delete, opaque directories cut off
/// everything below them. Symlinks are resolved inside the image, never on the host; a path
/// or link that climbs above the image's root is an error.
public struct ImageFilesystem: Sendable {
    /// Physical layer directories, top-most first.
    public let layers: [String]

    public init(layersTopFirst: [String]) {
        self.layers = layersTopFirst
    }

    /// A node of the merged tree.
    public struct Node: Sendable {
        /// The node's path inside the image (absolute, normalized; empty for the root), as bytes.
        public var path: RawPath
        /// For a directory: the layers where it exists as a directory (top first). For any
        /// other node: the single layer that provides it.
        public var layerIndexes: [Int]
        public var status: stat

        public var isDirectory: Bool { status.isDirectory }
        public var isSymlink: Bool { status.isSymlink }
        public var isRegular: Bool { status.isRegular }
        /// The path for people (`/` for the root; odd bytes escaped).
        public var displayPath: String { path.isEmpty ? "/" : path.description }
    }

    /// Where a node's top-most copy lives on the host.
    public func physicalPath(_ node: Node) -> RawPath { RawPath(layers[node.layerIndexes[0]]) + node.path }

    /// Opens a node's top-most copy for reading (never following a symlink). The caller closes it.
    public func openFile(_ node: Node) throws -> Int32 {
        try FileSystem.openFile(physicalPath(node), flags: O_RDONLY)
    }

    /// A regular file node's bytes.
    public func readFile(_ node: Node) throws -> [UInt8] {
        let fd = try openFile(node)
        defer { close(fd) }
        return try FileSystem.readAll(fd: fd, path: node.displayPath)
    }

    /// The target of a symlink node.
    public func readLink(_ node: Node) throws -> RawPath { try FileSystem.readLink(physicalPath(node)) }

    public var root: Node {
        var st = stat()
        _ = lstat(layers.first ?? "/nonexistent", &st)
        return Node(path: "", layerIndexes: Array(layers.indices), status: st)
    }

    /// Resolves `path` inside the image. Returns nil when it does not exist.
    /// - Parameter followFinal: resolve a symlink in the last component too.
    /// - Throws: `pathEscapes` when the path or a symlink on the way leaves the image.
    public func lookup(_ path: String, followFinal: Bool = true) throws -> Node? {
        try lookup(RawPath(path), followFinal: followFinal)
    }

    public func lookup(_ path: RawPath, followFinal: Bool = true) throws -> Node? {
        var stack: [Node] = [root]
        var pending = Array(path.components.reversed())
        var hops = 0
        while let name = pending.popLast() {
            if name.bytes == [0x2e] { continue }
            if name.bytes == [0x2e, 0x2e] {
                guard stack.count > 1 else {
                    throw SandboxError(
                        .pathEscapes, "\(path) climbs above the image's root with '..'; use a path inside the image")
                }
                stack.removeLast()
                continue
            }
            let current = stack[stack.count - 1]
            guard current.isDirectory else {
                throw SandboxError(.notFound, "\(current.displayPath) is not a directory (while resolving \(path))")
            }
            guard let child = try child(of: current, named: name) else { return nil }
            if child.isSymlink && (!pending.isEmpty || followFinal) {
                hops += 1
                guard hops <= 40 else {
                    throw SandboxError(
                        .invalidArgument, "too many levels of symbolic links resolving \(path) in the image")
                }
                let target = try readLink(child)
                if target.bytes.first == UInt8(ascii: "/") { stack = [root] }
                let parts = target.components
                // A relative target climbing above the root points out of the image.
                var depth = stack.count - 1
                for part in parts {
                    if part.bytes == [0x2e, 0x2e] { depth -= 1 } else if part.bytes != [0x2e] { depth += 1 }
                    if depth < 0 {
                        throw SandboxError(
                            .pathEscapes,
                            "the symlink \(child.displayPath) -> \(target) points outside the image; it cannot be followed"
                        )
                    }
                }
                pending.append(contentsOf: parts.reversed())
                continue
            }
            stack.append(child)
        }
        return stack[stack.count - 1]
    }

    /// The merged entry `name` inside directory `directory`, or nil.
    public func child(of directory: Node, named name: RawPath) throws -> Node? {
        let logical = directory.path + "/" + name
        var directoryLayers: [Int] = []
        var top: stat?
        for index in directory.layerIndexes {
            let physical = RawPath(layers[index]) + logical
            guard let st = try FileSystem.status(physical) else { continue }
            if st.isWhiteout { break }
            if st.isDirectory {
                if top == nil { top = st }
                directoryLayers.append(index)
                if try LayerArchiver.isOpaque(physical) { break }
                continue
            }
            if directoryLayers.isEmpty { return Node(path: logical, layerIndexes: [index], status: st) }
            break  // a file below a directory is hidden by it
        }
        guard let top else { return nil }
        return Node(path: logical, layerIndexes: directoryLayers, status: top)
    }

    public func child(of directory: Node, named name: String) throws -> Node? {
        try child(of: directory, named: RawPath(name))
    }

    /// The merged entries of a directory, sorted by name.
    public func list(_ directory: Node) throws -> [(name: RawPath, node: Node)] {
        var seen = Set<RawPath>()
        var result: [(RawPath, Node)] = []
        for index in directory.layerIndexes {
            for name in try FileSystem.list(RawPath(layers[index]) + directory.path) where !seen.contains(name) {
                seen.insert(name)
                if let node = try child(of: directory, named: name) { result.append((name, node)) }
            }
        }
        return result.sorted { $0.0 < $1.0 }
    }

    /// Calls `visit` for `node` and, for a directory, everything below it (parents first).
    public func walk(_ node: Node, _ visit: (Node) throws -> Void) throws {
        try visit(node)
        guard node.isDirectory else { return }
        for (_, child) in try list(node) { try walk(child, visit) }
    }

    /// Writes `node` and everything below it as a tar stream; member names are relative to
    /// the node's parent directory (or to the root when the node is the root).
    public func export(_ node: Node, to sink: @escaping (UnsafeRawBufferPointer) throws -> Void) throws {
        let tar = TarWriter(sink: sink)
        let base = node.path.isEmpty ? 1 : node.path.bytes.count - node.path.lastComponent.bytes.count
        var hardlinks: [LayerArchiver.HardlinkKey: RawPath] = [:]
        try walk(node) { n in
            guard !n.path.isEmpty else { return }
            let member = RawPath(n.path.bytes.dropFirst(base))
            let st = n.status
            let physical = physicalPath(n)
            var entry = TarEntry(
                path: member, kind: .regular, mode: UInt32(st.st_mode & 0o7777), uid: st.st_uid, gid: st.st_gid,
                mtime: Int64(st.st_mtim.tv_sec), xattrs: try LayerArchiver.xattrs(of: physical))
            switch st.st_mode & S_IFMT {
            case S_IFDIR: entry.kind = .directory
            case S_IFLNK: entry.kind = .symlink(target: try readLink(n))
            case S_IFCHR: entry.kind = .characterDevice(major: deviceMajor(st.st_rdev), minor: deviceMinor(st.st_rdev))
            case S_IFBLK: entry.kind = .blockDevice(major: deviceMajor(st.st_rdev), minor: deviceMinor(st.st_rdev))
            case S_IFIFO: entry.kind = .fifo
            case S_IFREG:
                let key = LayerArchiver.HardlinkKey(device: st.st_dev, inode: st.st_ino)
                if st.st_nlink > 1, let first = hardlinks[key] {
                    entry.kind = .hardlink(target: first)
                    entry.xattrs = []
                } else {
                    if st.st_nlink > 1 { hardlinks[key] = member }
                    entry.size = Int64(st.st_size)
                    let fd = try openFile(n)
                    defer { close(fd) }
                    try tar.append(entry) { emit in
                        try LayerArchiver.streamFile(fd, size: entry.size, name: physical.description, emit: emit)
                    }
                    return
                }
            default: return
            }
            try tar.append(entry)
        }
        try tar.finish()
    }
}
