import Crypto

/// A sha256 digest, the one way this project names content: layers and blobs, step and score
/// keys, input and artifact files, uploads. `description` is the OCI form `sha256:<hex>`.
public struct Digest: Hashable, Sendable, CustomStringConvertible {
    /// The 32 bytes.
    public let bytes: [UInt8]

    public init(_ digest: SHA256.Digest) { bytes = Array(digest) }

    /// The digest of `bytes`.
    public static func sha256<Bytes: Sequence>(_ bytes: Bytes) -> Digest where Bytes.Element == UInt8 {
        Digest(SHA256.hash(data: Array(bytes)))
    }

    /// The digest of a string's UTF-8.
    public static func sha256(_ text: String) -> Digest { sha256(Array(text.utf8)) }

    /// Lower-case hex, 64 characters.
    public var hex: String { Hex.encode(bytes) }

    /// `sha256:<hex>`.
    public var description: String { "sha256:" + hex }

    /// A digest fed as it streams.
    public struct Hasher {
        private var inner = SHA256()

        public init() {}

        public mutating func update(_ buffer: UnsafeRawBufferPointer) { inner.update(bufferPointer: buffer) }

        public mutating func update<Bytes: Sequence>(_ bytes: Bytes) where Bytes.Element == UInt8 {
            inner.update(data: Array(bytes))
        }

        public func finalize() -> Digest { Digest(inner.finalize()) }
    }
}

/// Bytes as lower-case hex.
public enum Hex {
    private static let digits = Array("0123456789abcdef".utf8)

    public static func encode<Bytes: Sequence>(_ bytes: Bytes) -> String where Bytes.Element == UInt8 {
        var characters: [UInt8] = []
        characters.reserveCapacity(bytes.underestimatedCount * 2)
        for byte in bytes {
            characters.append(digits[Int(byte >> 4)])
            characters.append(digits[Int(byte & 0xf)])
        }
        return String(decoding: characters, as: UTF8.self)
    }
}
