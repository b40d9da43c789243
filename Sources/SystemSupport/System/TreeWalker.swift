import Glibc

/// Walks a directory tree depth first: parents before their children, names in byte order,
/// symlinks never followed. It holds two descriptors whatever the depth (it climbs back with
/// `..`, checking that it arrives where it left), so a tree deeper than `PATH_MAX` or than the
/// descriptor limit is walked like any other.
public enum TreeWalker {
    /// One entry of the tree.
    public struct Entry {
        /// The directory that holds the entry, open.
        public let parent: DirectoryHandle
        public let name: RawPath
        /// The entry's path relative to the root of the walk.
        public let path: RawPath
        public let status: stat
        /// How deep the entry is (1 for a child of the root).
        public let depth: Int
    }

    /// A directory being walked. It keeps no handle: holding every ancestor open would cost
    /// a descriptor per level.
    private struct Frame {
        var names: [RawPath]
        var next = 0
        var name: RawPath = ""
        var path: RawPath = ""
        var status: stat
        var depth = 0
        /// How the directory's handle was named, to name it again when `..` reopens it.
        var base: String
        var relative: RawPath
    }

    /// - Parameters:
    ///   - root: the directory to walk (itself not visited).
    ///   - visit: called for every entry; return true to descend into a directory.
    ///   - enter: called with a directory's own handle right after `visit` chose to descend.
    ///   - leave: called after a directory's children, while its parent is open.
    public static func walk(
        _ root: DirectoryHandle, visit: (Entry) throws -> Bool,
        enter: (Entry, DirectoryHandle) throws -> Void = { _, _ in },
        leave: (Entry) throws -> Void = { _ in }
    ) throws {
        let rootStatus = try root.status()
        var frames = [Frame(names: try root.entries(), status: rootStatus, base: root.base, relative: root.relative)]
        var current = root
        while !frames.isEmpty {
            let top = frames.count - 1
            if frames[top].next < frames[top].names.count {
                let name = frames[top].names[frames[top].next]
                frames[top].next += 1
                guard let st = try current.status(name) else { continue }  // gone meanwhile
                let entry = Entry(
                    parent: current, name: name, path: frames[top].path.appending(name), status: st, depth: frames.count
                )
                guard try visit(entry), st.isDirectory else { continue }
                let child = try current.directory(name)
                let opened = try child.status()
                guard opened.st_dev == st.st_dev && opened.st_ino == st.st_ino else {
                    throw SandboxError(.corrupt, "\(child.label) changed while it was walked; nothing may write to it")
                }
                try enter(entry, child)
                frames.append(
                    Frame(
                        names: try child.entries(), name: name, path: entry.path, status: st, depth: entry.depth,
                        base: child.base, relative: child.relative))
                current = child
                continue
            }
            let done = frames.removeLast()
            guard let parentFrame = frames.last else { break }
            let up = openat(current.fd, "..", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard up >= 0 else { throw SandboxError.system("openat(\(current.label)/..)") }
            let parent = DirectoryHandle(fd: up, label: parentFrame.base, relative: parentFrame.relative)
            let arrived = try parent.status()
            guard arrived.st_dev == parentFrame.status.st_dev && arrived.st_ino == parentFrame.status.st_ino else {
                throw SandboxError(.corrupt, "\(current.label) moved while it was walked; nothing may write to it")
            }
            current = parent
            try leave(Entry(parent: parent, name: done.name, path: done.path, status: done.status, depth: done.depth))
        }
    }
}
