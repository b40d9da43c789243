import Glibc
import ImageFormats
import SystemSupport

/// One changed path between two images.
public struct ImageChange: Sendable, Equatable, Encodable {
    public enum Kind: String, Sendable, Encodable {
        case added = "A"
        case deleted = "D"
        case modified = "M"
    }

    public var kind: Kind
    /// The path in the image, as bytes (`description` escapes it for a terminal).
    public var path: RawPath

    enum CodingKeys: String, CodingKey { case kind, path }

    /// `{"kind": "A", "path": "/x"}`; a path that is not UTF-8 is escaped.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(kind, forKey: .kind)
        try container.encode(path.text, forKey: .path)
    }
}

/// Computes which paths differ between two images. Only the layers the two chains do not
/// share are examined, so comparing an image with its parent costs the size of the change,
/// not of the image.
public enum ImageDiff {
    public static func changes(from a: ImageRecord, to b: ImageRecord, store: Store) throws -> [ImageChange] {
        var common = 0
        while common < min(a.layers.count, b.layers.count) && a.layers[common] == b.layers[common] { common += 1 }
        let fsA = ImageFilesystem(layersTopFirst: a.layers.reversed().map(store.layerPath))
        let fsB = ImageFilesystem(layersTopFirst: b.layers.reversed().map(store.layerPath))
        var touched = Set<RawPath>()
        for layer in a.layers[common...] + b.layers[common...] {
            try collect(RawPath(store.layerPath(layer)), relative: "", into: &touched, fsA: fsA, fsB: fsB)
        }
        var changes: [ImageChange] = []
        for path in touched.sorted() {
            let left = try node(fsA, path)
            let right = try node(fsB, path)
            switch (left, right) {
            case (nil, nil): continue
            case (nil, .some): changes.append(ImageChange(kind: .added, path: path))
            case (.some, nil): changes.append(ImageChange(kind: .deleted, path: path))
            case (.some(let l), .some(let r)):
                if try differs(l, r, fsA, fsB) { changes.append(ImageChange(kind: .modified, path: path)) }
            }
        }
        return changes
    }

    /// The node at `path` without following symlinks anywhere on the way (paths come from
    /// layer walks, so every parent is a real directory where the node exists).
    private static func node(_ fs: ImageFilesystem, _ path: RawPath) throws -> ImageFilesystem.Node? {
        var current = fs.root
        for part in path.components {
            guard current.isDirectory, let next = try fs.child(of: current, named: part) else { return nil }
            current = next
        }
        return current
    }

    private static func collect(
        _ layer: RawPath, relative: RawPath, into touched: inout Set<RawPath>, fsA: ImageFilesystem,
        fsB: ImageFilesystem
    ) throws {
        let directory = layer + relative
        if !relative.isEmpty, try LayerArchiver.isOpaque(directory) {
            // Everything below an opaque directory may have changed on either side.
            for fs in [fsA, fsB] {
                if let n = try node(fs, relative), n.isDirectory { try fs.walk(n) { touched.insert($0.path) } }
            }
        }
        for name in try FileSystem.list(directory) {
            let path = relative + "/" + name
            guard let st = try FileSystem.status(layer + path) else { continue }
            touched.insert(path)
            if st.isWhiteout {
                for fs in [fsA, fsB] {
                    if let n = try node(fs, path), n.isDirectory { try fs.walk(n) { touched.insert($0.path) } }
                }
            } else if st.isDirectory {
                try collect(layer, relative: path, into: &touched, fsA: fsA, fsB: fsB)
            }
        }
    }

    private static func differs(
        _ l: ImageFilesystem.Node, _ r: ImageFilesystem.Node, _ fsA: ImageFilesystem, _ fsB: ImageFilesystem
    ) throws -> Bool {
        let a = l.status
        let b = r.status
        if a.st_mode != b.st_mode || a.st_uid != b.st_uid || a.st_gid != b.st_gid { return true }
        if a.isDirectory { return false }
        if a.st_dev == b.st_dev && a.st_ino == b.st_ino { return false }
        if a.isSymlink {
            return try fsA.readLink(l) != fsB.readLink(r)
        }
        if a.isRegular {
            if a.st_size != b.st_size { return true }
            let fx = try fsA.openFile(l)
            defer { close(fx) }
            let fy = try fsB.openFile(r)
            defer { close(fy) }
            return try !sameContent(fx, fy, name: l.displayPath)
        }
        return a.st_rdev != b.st_rdev
    }

    private static func sameContent(_ fx: Int32, _ fy: Int32, name: String) throws -> Bool {
        var bx = [UInt8](repeating: 0, count: 65536)
        var by = [UInt8](repeating: 0, count: 65536)
        while true {
            let nx = bx.withUnsafeMutableBytes { read(fx, $0.baseAddress, $0.count) }
            var ny = 0
            while ny < max(nx, 0) {
                let n = by.withUnsafeMutableBytes { read(fy, $0.baseAddress! + ny, nx - ny) }
                if n <= 0 { break }
                ny += n
            }
            if nx < 0 { throw SandboxError.system("read(\(name))") }
            if nx != ny || bx[0..<nx] != by[0..<ny] { return false }
            if nx == 0 { return true }
        }
    }
}
