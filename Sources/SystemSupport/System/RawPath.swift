/// A file name, or a path relative to some directory, as the kernel keeps it: bytes. A sandbox
/// may name a file with any byte but `/` and NUL, so a name need not be UTF-8, and a `String`
/// made from it would be a different name (U+FFFD in place of each bad byte). Names from a
/// sandbox, a tar header or a layer directory stay `RawPath`s until a person reads them.
public struct RawPath: Hashable, Comparable, Sendable, ExpressibleByStringLiteral, CustomStringConvertible {
    public var bytes: [UInt8]

    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public init<S: Sequence>(_ bytes: S) where S.Element == UInt8 { self.bytes = Array(bytes) }
    /// The UTF-8 bytes of `string` (lossless: every String is valid UTF-8).
    public init(_ string: String) { bytes = Array(string.utf8) }
    public init(stringLiteral value: String) { self.init(value) }

    public var isEmpty: Bool { bytes.isEmpty }

    /// Byte order: the order of the canonical tar stream.
    public static func < (a: RawPath, b: RawPath) -> Bool { a.bytes.lexicographicallyPrecedes(b.bytes) }

    /// The text, when the bytes are valid UTF-8; nil otherwise.
    public var string: String? { String(validating: bytes, as: UTF8.self) }

    /// For formats that carry any character (JSON): the text itself when the bytes are UTF-8,
    /// escaped as `description` escapes it otherwise.
    public var text: String { string ?? description }

    /// For people, and never ambiguous: valid UTF-8 prints as itself, except control characters
    /// (`\n`, `\t`, `\x1b`, …), the direction overrides (`\u{202e}`) and the backslash (`\\`);
    /// a byte that is not part of valid UTF-8 prints as `\xNN`.
    public var description: String { RawPath.escape(bytes) }

    package static func escape(_ bytes: [UInt8]) -> String {
        if bytes.allSatisfy({ $0 >= 0x20 && $0 < 0x7f && $0 != 0x5c }) { return String(decoding: bytes, as: UTF8.self) }
        var out = ""
        var i = 0
        while i < bytes.count {
            let length = RawPath.scalarLength(bytes, at: i)
            guard length > 0,
                let scalar = String(validating: bytes[i..<(i + length)], as: UTF8.self)?.unicodeScalars.first
            else {
                out += "\\x" + hex(bytes[i])
                i += 1
                continue
            }
            switch scalar.value {
            case 0x5c: out += "\\\\"
            case 0x0a: out += "\\n"
            case 0x09: out += "\\t"
            case 0x0d: out += "\\r"
            case 0..<0x20, 0x7f: out += "\\x" + hex(UInt8(scalar.value))
            // C1 controls, bidirectional overrides and isolates: they reorder what follows.
            case 0x80..<0xa0, 0x202a...0x202e, 0x2066...0x2069, 0x200e, 0x200f, 0x061c:
                out += "\\u{" + String(scalar.value, radix: 16) + "}"
            default: out.unicodeScalars.append(scalar)
            }
            i += length
        }
        return out
    }

    /// The length of the UTF-8 sequence a lead byte announces (0 for a byte that cannot lead).
    private static func scalarLength(_ bytes: [UInt8], at i: Int) -> Int {
        let lead = bytes[i]
        let length: Int
        switch lead {
        case 0..<0x80: return 1
        case 0xc2..<0xe0: length = 2
        case 0xe0..<0xf0: length = 3
        case 0xf0..<0xf5: length = 4
        default: return 0
        }
        return i + length <= bytes.count ? length : 0
    }

    private static func hex(_ byte: UInt8) -> String {
        let digits = Array("0123456789abcdef".utf8)
        return String(decoding: [digits[Int(byte >> 4)], digits[Int(byte & 0xf)]], as: UTF8.self)
    }

    /// The non-empty components between slashes.
    public var components: [RawPath] {
        bytes.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: true).map { RawPath($0) }
    }

    /// The last component (the whole path when it has no slash).
    public var lastComponent: RawPath {
        guard let slash = bytes.lastIndex(of: UInt8(ascii: "/")) else { return self }
        return RawPath(bytes[(slash + 1)...])
    }

    /// `self/name`, or `name` when self is empty.
    public func appending(_ name: RawPath) -> RawPath {
        if bytes.isEmpty { return name }
        return RawPath(bytes + [UInt8(ascii: "/")] + name.bytes)
    }

    public func hasPrefix(_ prefix: String) -> Bool { bytes.starts(with: prefix.utf8) }

    public func dropFirst(_ count: Int) -> RawPath { RawPath(bytes.dropFirst(count)) }

    public static func + (a: RawPath, b: RawPath) -> RawPath { RawPath(a.bytes + b.bytes) }

    /// Calls `body` with the bytes as a NUL-terminated C string. A name with a NUL byte cannot
    /// exist; the C string would end early, so such a path is refused by its callers first.
    public func withCString<T>(_ body: (UnsafePointer<CChar>) throws -> T) rethrows -> T {
        try (bytes + [0]).withUnsafeBufferPointer { buffer in
            try buffer.withMemoryRebound(to: CChar.self) { try body($0.baseAddress!) }
        }
    }

    /// True when the path has a NUL byte (no file can have such a name).
    public var containsNUL: Bool { bytes.contains(0) }
}
