import Glibc
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

extension Store {
    /// Keeps `image` from `gc --prune-untagged` on behalf of `owner` (a pipeline's step cache,
    /// a server's session). Removing the image removes its pins.
    public func pin(_ image: String, owner: String) throws {
        try database.query(
            "INSERT OR IGNORE INTO pins(owner, image, created) SELECT ?, uuid, ? FROM images WHERE uuid = ?",
            [.text(owner), .real(Store.now), .text(image)])
    }

    /// `pin` inside a transaction of the caller's (with the rows that make the image theirs).
    public func pin(_ tx: Database.Transaction, _ image: String, owner: String) throws {
        try tx.query(
            "INSERT OR IGNORE INTO pins(owner, image, created) SELECT ?, uuid, ? FROM images WHERE uuid = ?",
            [.text(owner), .real(Store.now), .text(image)])
    }

    public func unpin(_ image: String, owner: String) throws {
        try database.transaction { tx in try unpin(tx, image, owner: owner) }
    }

    public func unpin(_ tx: Database.Transaction, _ image: String, owner: String) throws {
        try tx.query("DELETE FROM pins WHERE owner = ? AND image = ?", [.text(owner), .text(image)])
    }

    /// A random 32-byte key private to this store (created on first use, mode 0600): what
    /// fingerprints of secrets are keyed with, so that a fingerprint reveals nothing elsewhere.
    public func secretKey() throws -> [UInt8] {
        let path = root + "/secret.key"
        if let bytes = try? FileSystem.readFile(path), bytes.count == 32 { return bytes }
        // SystemRandomNumberGenerator reads the kernel's CSPRNG (getrandom).
        var generator = SystemRandomNumberGenerator()
        let key = (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let temporary = path + ".\(getpid()).new"
        try FileSystem.writeFile(temporary, key, mode: 0o600, sync: true)
        // Two processes racing: the first link wins and both read it back.
        if link(temporary, path) != 0 && errno != EEXIST { throw SandboxError.system("link(\(path))") }
        unlink(temporary)
        let stored = try FileSystem.readFile(path)
        guard stored.count == 32 else {
            throw SandboxError(
                .corrupt, "\(path) is damaged (not 32 bytes); remove it (cached steps with secrets will rerun)")
        }
        return stored
    }
}
