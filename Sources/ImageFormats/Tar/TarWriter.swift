import Glibc
import SystemSupport

/// One member of a tar stream.
public struct TarEntry: Sendable {
    public enum Kind: Sendable, Equatable {
        case regular
        case directory
        case symlink(target: RawPath)
        case hardlink(target: RawPath)
        case characterDevice(major: UInt32, minor: UInt32)
        case blockDevice(major: UInt32, minor: UInt32)
        case fifo
    }

    /// Relative path without a leading `./` or `/`; directories without a trailing slash.
    /// Bytes, as the file system has them (not necessarily UTF-8).
    public var path: RawPath
    public var kind: Kind
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var size: Int64
    public var mtime: Int64
    /// Extended attributes (name, value), written as `SCHILY.xattr.` PAX records.
    public var xattrs: [(String, [UInt8])]

    public init(
        path: RawPath, kind: Kind, mode: UInt32, uid: UInt32 = 0, gid: UInt32 = 0, size: Int64 = 0,
        mtime: Int64 = 0, xattrs: [(String, [UInt8])] = []
    ) {
        self.path = path
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime = mtime
        self.xattrs = xattrs
    }
}

/// Writes a POSIX.1-2001 (PAX) tar stream, deterministically: the same entries give the same
/// bytes. Long names, big ids and sizes, and xattrs go into PAX extended headers; user and
/// group names stay empty (ids are numeric in layers).
public struct TarWriter {
    private let sink: (UnsafeRawBufferPointer) throws -> Void

    /// - Parameter sink: receives the stream in order, in blocks of 512 bytes or more.
    public init(sink: @escaping (UnsafeRawBufferPointer) throws -> Void) {
        self.sink = sink
    }

    /// Appends an entry; for regular files, `content` must supply exactly `entry.size` bytes
    /// by calling the given writer one or more times.
    public func append(
        _ entry: TarEntry, content: ((UnsafeRawBufferPointer) throws -> Void) throws -> Void = { _ in }
    ) throws {
        var name = entry.path.bytes
        if entry.kind == .directory && name.last != UInt8(ascii: "/") { name.append(UInt8(ascii: "/")) }
        var pax: [(String, [UInt8])] = []
        var linkName: [UInt8] = []
        var typeflag: UInt8
        switch entry.kind {
        case .regular: typeflag = UInt8(ascii: "0")
        case .directory: typeflag = UInt8(ascii: "5")
        case .symlink(let target):
            typeflag = UInt8(ascii: "2")
            linkName = target.bytes
        case .hardlink(let target):
            typeflag = UInt8(ascii: "1")
            linkName = target.bytes
        case .characterDevice: typeflag = UInt8(ascii: "3")
        case .blockDevice: typeflag = UInt8(ascii: "4")
        case .fifo: typeflag = UInt8(ascii: "6")
        }
        let size: Int64 = entry.kind == .regular ? entry.size : 0

        var header = [UInt8](repeating: 0, count: 512)
        if let (prefix, base) = TarWriter.split(name) {
            header.replaceSubrange(0..<base.count, with: base)
            header.replaceSubrange(345..<(345 + prefix.count), with: prefix)
        } else {
            pax.append(("path", name))
            let short = Array(name.suffix(99))
            header.replaceSubrange(0..<short.count, with: short)
        }
        if linkName.count > 100 {
            pax.append(("linkpath", linkName))
            linkName = Array(linkName.prefix(100))
        }
        header.replaceSubrange(157..<(157 + linkName.count), with: linkName)
        TarWriter.octal(&header, 100, 8, UInt64(entry.mode & 0o7777))
        for (offset, id, key) in [(108, entry.uid, "uid"), (116, entry.gid, "gid")] {
            if id > 0o7777777 {
                pax.append((key, Array(String(id).utf8)))
                TarWriter.octal(&header, offset, 8, 0)
            } else {
                TarWriter.octal(&header, offset, 8, UInt64(id))
            }
        }
        if size > 0o77777777777 {
            pax.append(("size", Array(String(size).utf8)))
            TarWriter.octal(&header, 124, 12, 0)
        } else {
            TarWriter.octal(&header, 124, 12, UInt64(size))
        }
        if entry.mtime < 0 || entry.mtime > 0o77777777777 {
            pax.append(("mtime", Array(String(entry.mtime).utf8)))
            TarWriter.octal(&header, 136, 12, 0)
        } else {
            TarWriter.octal(&header, 136, 12, UInt64(entry.mtime))
        }
        header[156] = typeflag
        header.replaceSubrange(257..<263, with: Array("ustar\0".utf8))
        header.replaceSubrange(263..<265, with: Array("00".utf8))
        switch entry.kind {
        case .characterDevice(let major, let minor), .blockDevice(let major, let minor):
            TarWriter.octal(&header, 329, 8, UInt64(major))
            TarWriter.octal(&header, 337, 8, UInt64(minor))
        default:
            TarWriter.octal(&header, 329, 8, 0)
            TarWriter.octal(&header, 337, 8, 0)
        }
        for (key, value) in entry.xattrs.sorted(by: { $0.0 < $1.0 }) {
            pax.append(("SCHILY.xattr." + key, value))
        }
        if !pax.isEmpty { try writePax(pax, for: name) }
        TarWriter.checksum(&header)
        try header.withUnsafeBytes { try sink($0) }

        guard size > 0 else { return }
        var written: Int64 = 0
        try content { chunk in
            written += Int64(chunk.count)
            guard written <= size else {
                throw SandboxError(
                    .corrupt, "\(entry.path) grew while it was archived; retry once nothing writes to it")
            }
            try sink(chunk)
        }
        guard written == size else {
            throw SandboxError(
                .corrupt, "\(entry.path) changed size while it was archived (\(written) of \(size) bytes)")
        }
        try pad(size)
    }

    /// Writes the two zero blocks that end an archive.
    public func finish() throws {
        let zeros = [UInt8](repeating: 0, count: 1024)
        try zeros.withUnsafeBytes { try sink($0) }
    }

    private func writePax(_ records: [(String, [UInt8])], for name: [UInt8]) throws {
        var body: [UInt8] = []
        for (key, value) in records {
            // "LEN KEY=VALUE\n", where LEN counts its own digits.
            let rest = 1 + key.utf8.count + 1 + value.count + 1
            var length = rest + String(rest).count
            if String(length).count != String(rest).count { length = rest + String(length).count }
            body += Array(String(length).utf8) + [UInt8(ascii: " ")] + Array(key.utf8) + [UInt8(ascii: "=")]
            body += value + [UInt8(ascii: "\n")]
        }
        var header = [UInt8](repeating: 0, count: 512)
        let base = name.split(separator: UInt8(ascii: "/")).last.map(Array.init) ?? []
        let paxName = Array(("PaxHeaders.0/").utf8) + base.prefix(80)
        header.replaceSubrange(0..<paxName.count, with: paxName)
        TarWriter.octal(&header, 100, 8, 0o644)
        TarWriter.octal(&header, 108, 8, 0)
        TarWriter.octal(&header, 116, 8, 0)
        TarWriter.octal(&header, 124, 12, UInt64(body.count))
        TarWriter.octal(&header, 136, 12, 0)
        header[156] = UInt8(ascii: "x")
        header.replaceSubrange(257..<263, with: Array("ustar\0".utf8))
        header.replaceSubrange(263..<265, with: Array("00".utf8))
        TarWriter.checksum(&header)
        try header.withUnsafeBytes { try sink($0) }
        try body.withUnsafeBytes { try sink($0) }
        try pad(Int64(body.count))
    }

    private func pad(_ size: Int64) throws {
        let rest = Int(size % 512)
        guard rest != 0 else { return }
        let zeros = [UInt8](repeating: 0, count: 512 - rest)
        try zeros.withUnsafeBytes { try sink($0) }
    }

    /// Splits a name into ustar (prefix, name) fields, or nil when it needs a PAX path record.
    static func split(_ name: [UInt8]) -> (prefix: [UInt8], name: [UInt8])? {
        if name.count <= 100 { return ([], name) }
        guard name.count <= 256 else { return nil }
        // The split must happen at a slash, with prefix <= 155 and the rest <= 100.
        let trailing = name.last == UInt8(ascii: "/") ? 1 : 0
        var i = min(155, name.count - 1 - trailing)
        while i > 0 {
            if name[i] == UInt8(ascii: "/") && name.count - i - 1 <= 100 && name.count - i - 1 > 0 {
                return (Array(name[0..<i]), Array(name[(i + 1)...]))
            }
            i -= 1
        }
        return nil
    }

    static func octal(_ header: inout [UInt8], _ offset: Int, _ width: Int, _ value: UInt64) {
        let digits = Array(String(value, radix: 8).utf8)
        let padded = [UInt8](repeating: UInt8(ascii: "0"), count: max(0, width - 1 - digits.count)) + digits
        header.replaceSubrange(offset..<(offset + width - 1), with: padded.suffix(width - 1))
        header[offset + width - 1] = 0
    }

    static func checksum(_ header: inout [UInt8]) {
        for i in 148..<156 { header[i] = UInt8(ascii: " ") }
        let sum = header.reduce(0) { $0 + UInt64($1) }
        let digits = Array(String(sum, radix: 8).utf8)
        let padded = [UInt8](repeating: UInt8(ascii: "0"), count: max(0, 6 - digits.count)) + digits
        header.replaceSubrange(148..<154, with: padded.suffix(6))
        header[154] = 0
        header[155] = UInt8(ascii: " ")
    }
}
