import Glibc
import SystemSupport

/// Reads a tar stream (ustar, PAX, GNU long names, base-256 numbers) from a file descriptor,
/// one entry at a time.
public struct TarReader {
    private let fd: Int32
    private let name: String
    private var pending: Int64 = 0  // content bytes of the current entry not yet consumed
    private var padding: Int64 = 0
    private var globalPax: [String: [UInt8]] = [:]
    /// Sees every byte read from the stream, in order (to hash it as it is extracted).
    public var tap: ((UnsafeRawBufferPointer) -> Void)?

    /// - Parameters:
    ///   - fd: the stream (not closed by the reader).
    ///   - name: how errors name the stream (a file path).
    public init(fd: Int32, name: String) {
        self.fd = fd
        self.name = name
    }

    /// The next entry, or nil at the end of the archive. Unread content of the previous entry
    /// is skipped.
    public mutating func next() throws -> TarEntry? {
        try skip(pending + padding)
        pending = 0
        padding = 0
        var pax: [String: [UInt8]] = [:]
        var longName: [UInt8]?
        var longLink: [UInt8]?
        while true {
            var header = [UInt8](repeating: 0, count: 512)
            guard try readFully(&header, allowEOF: true) else { return nil }
            if header.allSatisfy({ $0 == 0 }) { return nil }
            guard verifyChecksum(header) else {
                throw SandboxError(
                    .invalidArgument, "\(name) is not a tar archive (bad header checksum); check the file")
            }
            let typeflag = header[156]
            let size = try number(header, 124, 12, field: "size")
            switch typeflag {
            case UInt8(ascii: "x"), UInt8(ascii: "g"):
                let body = try readBody(size)
                let records = try parsePax(body)
                if typeflag == UInt8(ascii: "x") {
                    pax.merge(records) { $1 }
                } else {
                    globalPax.merge(records) { $1 }
                }
                continue
            case UInt8(ascii: "L"):
                longName = Array(try readBody(size).prefix { $0 != 0 })
                continue
            case UInt8(ascii: "K"):
                longLink = Array(try readBody(size).prefix { $0 != 0 })
                continue
            default: break
            }
            let merged = globalPax.merging(pax) { $1 }
            var path = field(header, 0, 100)
            let prefix = field(header, 345, 155)
            if !prefix.isEmpty && header[257..<262].elementsEqual("ustar".utf8) {
                path = prefix + [UInt8(ascii: "/")] + path
            }
            if let longName { path = longName }
            if let p = merged["path"] { path = p }
            var link = field(header, 157, 100)
            if let longLink { link = longLink }
            if let l = merged["linkpath"] { link = l }
            let headerUID = try number(header, 108, 8, field: "uid")
            let headerGID = try number(header, 116, 8, field: "gid")
            let headerMtime = try number(header, 136, 12, field: "mtime")
            var entry = TarEntry(
                path: RawPath(path), kind: .regular,
                mode: UInt32(truncatingIfNeeded: try number(header, 100, 8, field: "mode")),
                uid: UInt32(truncatingIfNeeded: merged["uid"].flatMap(decimal) ?? headerUID),
                gid: UInt32(truncatingIfNeeded: merged["gid"].flatMap(decimal) ?? headerGID),
                size: merged["size"].flatMap(decimal) ?? size,
                mtime: merged["mtime"].flatMap { decimal(Array($0.prefix { $0 != UInt8(ascii: ".") })) } ?? headerMtime)
            entry.xattrs = merged.filter { $0.key.hasPrefix("SCHILY.xattr.") }
                .map { (String($0.key.dropFirst("SCHILY.xattr.".count)), $0.value) }.sorted { $0.0 < $1.0 }
            let major = UInt32(truncatingIfNeeded: (try? number(header, 329, 8, field: "devmajor")) ?? 0)
            let minor = UInt32(truncatingIfNeeded: (try? number(header, 337, 8, field: "devminor")) ?? 0)
            let linkString = RawPath(link)
            switch typeflag {
            case UInt8(ascii: "0"), 0, UInt8(ascii: "7"): entry.kind = .regular
            case UInt8(ascii: "1"): entry.kind = .hardlink(target: linkString)
            case UInt8(ascii: "2"): entry.kind = .symlink(target: linkString)
            case UInt8(ascii: "3"): entry.kind = .characterDevice(major: major, minor: minor)
            case UInt8(ascii: "4"): entry.kind = .blockDevice(major: major, minor: minor)
            case UInt8(ascii: "5"): entry.kind = .directory
            case UInt8(ascii: "6"): entry.kind = .fifo
            default:
                throw SandboxError(
                    .invalidArgument,
                    "\(name): entry \(entry.path) has unsupported tar type '\(Character(Unicode.Scalar(typeflag)))'")
            }
            while entry.kind == .directory, entry.path.bytes.last == UInt8(ascii: "/") { entry.path.bytes.removeLast() }
            let contentSize = entry.kind == .regular ? entry.size : 0
            pending = contentSize
            padding = (512 - contentSize % 512) % 512
            if entry.kind != .regular { entry.size = 0 }
            return entry
        }
    }

    /// Reads up to `buffer.count` bytes of the current entry's content; 0 at its end.
    public mutating func readContent(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard pending > 0 else { return 0 }
        let want = Int(min(Int64(buffer.count), pending))
        var got = 0
        while got < want {
            let n = read(fd, buffer.baseAddress! + got, want - got)
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(\(name))") }
            if n == 0 { throw SandboxError(.invalidArgument, "\(name) is truncated (it ends inside an entry)") }
            tap?(UnsafeRawBufferPointer(start: buffer.baseAddress! + got, count: n))
            got += n
        }
        pending -= Int64(got)
        return got
    }

    /// Reads the stream to its end (what follows the archive's end marker), for the tap.
    public mutating func drain() throws {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(\(name))") }
            if n == 0 { return }
            buffer.withUnsafeBytes { tap?(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        }
    }

    private func field(_ header: [UInt8], _ offset: Int, _ length: Int) -> [UInt8] {
        Array(header[offset..<(offset + length)].prefix { $0 != 0 })
    }

    private func number(_ header: [UInt8], _ offset: Int, _ length: Int, field: String) throws -> Int64 {
        let bytes = header[offset..<(offset + length)]
        if let first = bytes.first, first & 0x80 != 0 {
            // GNU base-256: big-endian two's complement, first byte's top bit as the marker.
            var value: Int64 = Int64(first & 0x3f)
            for b in bytes.dropFirst() { value = value << 8 | Int64(b) }
            return first & 0x40 != 0 ? -value : value
        }
        var value: Int64 = 0
        for b in bytes {
            if b == 0 || b == UInt8(ascii: " ") {
                if value == 0 { continue } else { break }
            }
            guard b >= UInt8(ascii: "0") && b <= UInt8(ascii: "7") else {
                throw SandboxError(.invalidArgument, "\(name): malformed \(field) field in a tar header")
            }
            value = value * 8 + Int64(b - UInt8(ascii: "0"))
        }
        return value
    }

    private func decimal(_ bytes: [UInt8]) -> Int64? { Int64(String(decoding: bytes, as: UTF8.self)) }

    private func verifyChecksum(_ header: [UInt8]) -> Bool {
        var unsigned: Int64 = 0
        var signed: Int64 = 0
        for (i, b) in header.enumerated() {
            let v = (148..<156).contains(i) ? UInt8(ascii: " ") : b
            unsigned += Int64(v)
            signed += Int64(Int8(bitPattern: v))
        }
        guard let stored = try? number(header, 148, 8, field: "checksum") else { return false }
        return stored == unsigned || stored == signed
    }

    private func parsePax(_ body: [UInt8]) throws -> [String: [UInt8]] {
        var records: [String: [UInt8]] = [:]
        var i = 0
        while i < body.count {
            guard let space = body[i...].firstIndex(of: UInt8(ascii: " ")),
                let length = Int(String(decoding: body[i..<space], as: UTF8.self)), length > 0,
                i + length <= body.count
            else {
                if body[i...].allSatisfy({ $0 == 0 }) { break }
                throw SandboxError(.invalidArgument, "\(name): malformed PAX extended header")
            }
            let record = body[(space + 1)..<(i + length - 1)]
            if let eq = record.firstIndex(of: UInt8(ascii: "=")) {
                let key = record[record.startIndex..<eq]
                // A key that is not UTF-8 (an xattr's name) is refused, not repaired into another.
                guard let text = String(validating: key, as: UTF8.self) else {
                    throw SandboxError(
                        .invalidArgument,
                        "\(name): a PAX record's key is not UTF-8 (\(RawPath.escape(Array(key)))); the archive is refused"
                    )
                }
                records[text] = Array(record[(eq + 1)...])
            }
            i += length
        }
        return records
    }

    private mutating func readBody(_ size: Int64) throws -> [UInt8] {
        guard size >= 0 && size < 64 << 20 else {
            throw SandboxError(.invalidArgument, "\(name): extended header of \(size) bytes is not plausible")
        }
        var body = [UInt8](repeating: 0, count: Int(size))
        _ = try readFully(&body, allowEOF: false)
        try skip((512 - size % 512) % 512)
        return body
    }

    private func readFully(_ buffer: inout [UInt8], allowEOF: Bool) throws -> Bool {
        var got = 0
        while got < buffer.count {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, $0.count - got) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(\(name))") }
            if n == 0 {
                if got == 0 && allowEOF { return false }
                throw SandboxError(.invalidArgument, "\(name) is truncated (it ends inside a header)")
            }
            if let tap { buffer.withUnsafeBytes { tap(UnsafeRawBufferPointer(rebasing: $0[got..<(got + n)])) } }
            got += n
        }
        return true
    }

    private func skip(_ count: Int64) throws {
        var remaining = count
        var buffer = [UInt8](repeating: 0, count: 65536)
        while remaining > 0 {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, Int(min(Int64($0.count), remaining))) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(\(name))") }
            if n == 0 { throw SandboxError(.invalidArgument, "\(name) is truncated (it ends inside an entry)") }
            if let tap { buffer.withUnsafeBytes { tap(UnsafeRawBufferPointer(rebasing: $0[0..<n])) } }
            remaining -= Int64(n)
        }
    }
}
