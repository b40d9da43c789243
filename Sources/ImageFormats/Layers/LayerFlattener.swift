import Glibc
import SystemSupport

/// Materializes an image's merged tree as one layer directory. Regular files are hard links
/// to the (immutable) files of the source layers, so flattening costs a link per file, not a
/// copy of the bytes.
package enum LayerFlattener {
    package static func materialize(_ fs: ImageFilesystem, into destination: String) throws {
        var tree = DirectoryTree(root: destination)
        var directoryTimes: [(RawPath, Int64)] = []
        try fs.walk(fs.root) { node in
            guard !node.path.isEmpty else { return }
            let parts = node.path.components
            let name = parts[parts.count - 1]
            let target = try tree.directory(parts.dropLast(), member: node.path, source: destination)
            let source = fs.physicalPath(node)
            let st = node.status
            let mtime = Int64(st.st_mtim.tv_sec)
            let xattrs = st.isSymlink ? [] : try LayerArchiver.xattrs(of: source)
            switch st.st_mode & S_IFMT {
            case S_IFDIR:
                try target.makeDirectory(name, mode: 0o700)
                try Metadata.apply(
                    in: target, name, isSymlink: false, mode: UInt32(st.st_mode), uid: st.st_uid, gid: st.st_gid,
                    mtime: nil, xattrs: xattrs)
                directoryTimes.append((node.path, mtime))
            case S_IFREG:
                let linked = source.withCString { s in name.withCString { linkat(AT_FDCWD, s, target.fd, $0, 0) } }
                if linked != 0 {
                    guard errno == EMLINK || errno == EXDEV else {
                        throw SandboxError.system("link(\(source), \(target.label(name)))")
                    }
                    let input = try fs.openFile(node)
                    defer { close(input) }
                    let output = try target.openFile(name, flags: O_WRONLY | O_CREAT | O_EXCL)
                    defer { close(output) }
                    try FileSystem.copyContents(from: input, to: output, name: target.label(name))
                    try Metadata.apply(
                        in: target, name, isSymlink: false, mode: UInt32(st.st_mode), uid: st.st_uid, gid: st.st_gid,
                        mtime: mtime, xattrs: xattrs)
                }
            case S_IFLNK:
                let link = try fs.readLink(node)
                if link.withCString({ l in name.withCString { symlinkat(l, target.fd, $0) } }) != 0 {
                    throw SandboxError.system("symlink(\(target.label(name)))")
                }
                try Metadata.apply(
                    in: target, name, isSymlink: true, mode: 0, uid: st.st_uid, gid: st.st_gid, mtime: mtime, xattrs: []
                )
            default:
                if name.withCString({ mknodat(target.fd, $0, st.st_mode, st.st_rdev) }) != 0 {
                    throw SandboxError.system("mknod(\(target.label(name)))")
                }
                try Metadata.apply(
                    in: target, name, isSymlink: false, mode: UInt32(st.st_mode), uid: st.st_uid, gid: st.st_gid,
                    mtime: mtime, xattrs: xattrs)
            }
        }
        for (path, mtime) in directoryTimes.reversed() {
            let parts = path.components
            try Metadata.setTime(
                in: try tree.directory(parts.dropLast(), member: path, source: destination), parts[parts.count - 1],
                mtime)
        }
    }
}
