import Glibc

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
        /// The node's path inside the image (absolute, normalized).
        public var path: String
        /// For a directory: the layers where it exists as a directory (top first). For any
        /// other node: the single layer that provides it.
        public var layerIndexes: [Int]
        public var status: stat

        public var isDirectory: Bool { status.isDirectory }
        public var isSymlink: Bool { status.isSymlink }
        public var isRegular: Bool { status.isRegular }
    }

    /// Where a node's top-most copy lives on the host.
    public func physicalPath(_ node: Node) -> String { layers[node.layerIndexes[0]] + node.path }

    public var root: Node {
        var st = stat()
        _ = lstat(layers.first ?? "/nonexistent", &st)
        return Node(path: "", layerIndexes: Array(layers.indices), status: st)
    }

    /// Resolves `path` inside the image. Returns nil when it does not exist.
    /// - Parameter followFinal: resolve a symlink in the last component too.
    /// - Throws: `pathEscapes` when the path or a symlink on the way leaves the image.
    public func lookup(_ path: String, followFinal: Bool = true) throws -> Node? {
        var stack: [Node] = [root]
        var pending = Array(path.split(separator: "/").map(String.init).reversed())
        var hops = 0
        while let name = pending.popLast() {
            if name == "." || name.isEmpty { continue }
            if name == ".." {
                guard stack.count > 1 else {
                    throw SandboxError(
                        .pathEscapes, "\(path) climbs above the image's root with '..'; use a path inside the image")
                }
                stack.removeLast()
                continue
            }
            let current = stack[stack.count - 1]
            guard current.isDirectory else {
                throw SandboxError(.notFound, "\(current.path) is not a directory (while resolving \(path))")
            }
            guard let child = try child(of: current, named: name) else { return nil }
            if child.isSymlink && (!pending.isEmpty || followFinal) {
                hops += 1
                guard hops <= 40 else {
                    throw SandboxError(
                        .invalidArgument, "too many levels of symbolic links resolving \(path) in the image")
                }
                let target = try FileSystem.readLink(physicalPath(child))
                if target.hasPrefix("/") { stack = [root] }
                let parts = target.split(separator: "/").map(String.init)
                // A relative target climbing above the root points out of the image.
                var depth = stack.count - 1
                for part in parts {
                    if part == ".." { depth -= 1 } else if part != "." { depth += 1 }
                    if depth < 0 {
                        throw SandboxError(
                            .pathEscapes,
                            "the symlink \(child.path) -> \(target) points outside the image; it cannot be followed")
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
    public func child(of directory: Node, named name: String) throws -> Node? {
        let logical = directory.path + "/" + name
        var directoryLayers: [Int] = []
        var top: stat?
        for index in directory.layerIndexes {
            guard let st = try FileSystem.status(layers[index] + logical) else { continue }
            if st.isWhiteout { break }
            if st.isDirectory {
                if top == nil { top = st }
                directoryLayers.append(index)
                if LayerArchiver.isOpaque(layers[index] + logical) { break }
                continue
            }
            if directoryLayers.isEmpty { return Node(path: logical, layerIndexes: [index], status: st) }
            break  // a file below a directory is hidden by it
        }
        guard let top else { return nil }
        return Node(path: logical, layerIndexes: directoryLayers, status: top)
    }

    /// The merged entries of a directory, sorted by name.
    public func list(_ directory: Node) throws -> [(name: String, node: Node)] {
        var seen = Set<String>()
        var result: [(String, Node)] = []
        for index in directory.layerIndexes {
            for name in try FileSystem.list(layers[index] + directory.path) where !seen.contains(name) {
                seen.insert(name)
                if let node = try child(of: directory, named: name) { result.append((name, node)) }
            }
        }
        return result.sorted { Array($0.0.utf8).lexicographicallyPrecedes(Array($1.0.utf8)) }
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
        let base = node.path.isEmpty ? "" : String(node.path[..<(node.path.lastIndex(of: "/") ?? node.path.startIndex)])
        var hardlinks: [LayerArchiver.HardlinkKey: String] = [:]
        try walk(node) { n in
            guard !n.path.isEmpty else { return }
            let member = String(n.path.dropFirst(base.count + 1))
            let st = n.status
            let physical = physicalPath(n)
            var entry = TarEntry(
                path: member, kind: .regular, mode: UInt32(st.st_mode & 0o7777), uid: st.st_uid, gid: st.st_gid,
                mtime: Int64(st.st_mtim.tv_sec), xattrs: LayerArchiver.xattrs(of: physical))
            switch st.st_mode & S_IFMT {
            case S_IFDIR: entry.kind = .directory
            case S_IFLNK: entry.kind = .symlink(target: try FileSystem.readLink(physical))
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
                    try tar.append(entry) { emit in
                        try LayerArchiver.streamFile(physical, size: entry.size, emit: emit)
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
