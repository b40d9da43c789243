import Glibc

/// Materializes an image's merged tree as one layer directory. Regular files are hard links
/// to the (immutable) files of the source layers, so flattening costs a link per file, not a
/// copy of the bytes.
enum LayerFlattener {
    static func materialize(_ fs: ImageFilesystem, into destination: String) throws {
        var directoryTimes: [(String, Int64)] = []
        try fs.walk(fs.root) { node in
            guard !node.path.isEmpty else { return }
            let target = destination + node.path
            let source = fs.physicalPath(node)
            let st = node.status
            let mtime = Int64(st.st_mtim.tv_sec)
            switch st.st_mode & S_IFMT {
            case S_IFDIR:
                try FileSystem.makeDirectory(target, mode: 0o700)
                try Metadata.apply(
                    to: target, isSymlink: false, mode: UInt32(st.st_mode), uid: st.st_uid, gid: st.st_gid,
                    mtime: nil, xattrs: LayerArchiver.xattrs(of: source))
                directoryTimes.append((target, mtime))
            case S_IFREG:
                if link(source, target) != 0 {
                    guard errno == EMLINK || errno == EXDEV else {
                        throw SandboxError.system("link(\(source), \(target))")
                    }
                    try FileSystem.copyContents(from: source, to: target, mode: 0o600)
                    try Metadata.apply(
                        to: target, isSymlink: false, mode: UInt32(st.st_mode), uid: st.st_uid, gid: st.st_gid,
                        mtime: mtime, xattrs: LayerArchiver.xattrs(of: source))
                }
            case S_IFLNK:
                if symlink(try FileSystem.readLink(source), target) != 0 {
                    throw SandboxError.system("symlink(\(target))")
                }
                try Metadata.apply(
                    to: target, isSymlink: true, mode: 0, uid: st.st_uid, gid: st.st_gid, mtime: mtime, xattrs: [])
            default:
                if mknod(target, st.st_mode, st.st_rdev) != 0 { throw SandboxError.system("mknod(\(target))") }
                try Metadata.apply(
                    to: target, isSymlink: false, mode: UInt32(st.st_mode), uid: st.st_uid, gid: st.st_gid,
                    mtime: mtime, xattrs: LayerArchiver.xattrs(of: source))
            }
        }
        for (path, mtime) in directoryTimes.reversed() { try Metadata.setTime(path, mtime) }
    }
}
