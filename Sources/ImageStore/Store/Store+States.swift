import Glibc
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A state sealed and described, ready to be recorded (and moved into the store) with the image
/// that holds it.
public struct PlacedState: Sendable {
    public var digest: String
    public var bytes: Int64
    public var base: String
    public var kind: String
    public var metadata: String
    /// Where its files wait (in a lease's work directory, which gc leaves alone) until
    /// `recordState` moves them into the store.
    public var directory: String

    public init(digest: String, bytes: Int64, base: String, kind: String, metadata: String, directory: String) {
        self.digest = digest
        self.bytes = bytes
        self.base = base
        self.kind = kind
        self.metadata = metadata
        self.directory = directory
    }
}

/// State an image carries beside its files: a VM's memory snapshot (its RAM, its devices, its
/// upper disk). The files live in `states/<hex>/`, named by a digest of their content; the
/// `image_states` row says which image holds which state, of what kind, with what the module that
/// made it needs to restore it (`metadata`, its own JSON). `gc` removes a state no image holds;
/// `fsck` checks each one's files against its digest.
public struct ImageState: Sendable {
    public var image: String
    public var digest: String
    /// The image whose layers the state's files (its upper disk) lie over: a run resumed from
    /// the state changes files relative to it.
    public var base: String
    public var kind: String
    public var metadata: String
    public var bytes: Int64
    /// The directory holding the state's files.
    public var path: String
}

extension Store {
    public var statesPath: String { root + "/states" }

    /// The digest of a state's files: SHA-256 over each file's name and digest, by name. A
    /// file's digest is SHA-256 over the SHA-256 of each of its 1 MiB chunks (the last one
    /// shorter): a chunk in a hole of the sparse file (a guest's untouched RAM, an unwritten disk
    /// block) is known to be zeros and never read, and the digest depends only on the content.
    public static func stateDigest(of directory: String) throws -> Digest {
        var manifest = ""
        for name in try FileSystem.list(directory).sorted() {
            let path = directory + "/" + name
            guard let st = try FileSystem.status(path), st.isRegular else {
                throw SandboxError(.corrupt, "\(path) is not a regular file; a state holds files only")
            }
            manifest += "\(name)\t\(try hashFile(path).hex)\n"
        }
        return Digest.sha256(manifest)
    }

    static let stateChunk = 1 << 20
    /// SEEK_DATA (Linux), which Swift's Glibc does not export.
    static let seekData: Int32 = 3
    private static let zeroChunkDigest = Digest.sha256([UInt8](repeating: 0, count: stateChunk))

    private static func hashFile(_ path: String) throws -> Digest {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SandboxError.system("fstat(\(path))") }
        let size = Int64(st.st_size)
        var list = Digest.Hasher()
        var buffer = [UInt8](repeating: 0, count: stateChunk)
        var offset: Int64 = 0
        var dataStart = Int64(lseek(fd, 0, Store.seekData))  // -1 (ENXIO): no data at or after the offset
        while offset < size {
            let length = Int(min(Int64(stateChunk), size - offset))
            if dataStart >= 0 && dataStart < offset { dataStart = Int64(lseek(fd, off_t(offset), Store.seekData)) }
            if length == stateChunk && (dataStart < 0 || dataStart >= offset + Int64(length)) {
                list.update(zeroChunkDigest.bytes)  // a hole: zeros
                offset += Int64(length)
                continue
            }
            var done = 0
            while done < length {
                let n = buffer.withUnsafeMutableBytes {
                    pread(fd, $0.baseAddress! + done, length - done, off_t(offset) + off_t(done))
                }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw SandboxError.system("read(\(path))") }
                done += n
            }
            list.update(
                buffer.withUnsafeBytes { Digest.sha256(UnsafeRawBufferPointer(rebasing: $0[0..<length])) }.bytes)
            offset += Int64(length)
        }
        return list.finalize()
    }

    /// Hashes and syncs the directory `staging` (files only, in a lease's work directory) for
    /// `recordState` to move into the store: it stays where it is until then.
    /// - Returns: its digest and size.
    public static func sealState(_ staging: String) throws -> (digest: String, bytes: Int64) {
        let digest = try Store.stateDigest(of: staging)
        var bytes: Int64 = 0
        for name in try FileSystem.list(staging) {
            bytes += Int64((try FileSystem.status(staging + "/" + name))?.st_blocks ?? 0) * 512
        }
        for name in try FileSystem.list(staging) { try FileSystem.sync(staging + "/" + name) }
        return (digest.description, bytes)
    }

    /// Records that `image` holds `state`, in the transaction that records the image (which
    /// runs under the store's shared lock, so gc cannot come between): its files move from
    /// their lease's directory into `states/` (one with the same content already there is kept).
    public func recordState(
        _ tx: Database.Transaction, image: String, state: PlacedState
    ) throws {
        let target = statesPath + "/" + Store.hex(state.digest)
        if FileSystem.isDirectory(target) {
            try? FileSystem.removeTree(state.directory)
        } else {
            try FileSystem.makeDirectories(statesPath)
            try FileSystem.rename(state.directory, target)
        }
        try tx.query(
            "INSERT INTO image_states(image, digest, base, kind, metadata, bytes, created) VALUES(?, ?, ?, ?, ?, ?, ?)",
            [
                .text(image), .text(state.digest), .text(state.base), .text(state.kind), .text(state.metadata),
                .integer(state.bytes), .real(Store.now),
            ])
    }

    /// The state `image` holds, if any.
    public func state(of image: String) throws -> ImageState? {
        guard
            let row = try database.query(
                "SELECT digest, base, kind, metadata, bytes FROM image_states WHERE image = ?", [.text(image)]
            ).first, let digest = row["digest"].string
        else { return nil }
        return ImageState(
            image: image, digest: digest, base: row["base"].string ?? "", kind: row["kind"].string ?? "",
            metadata: row["metadata"].string ?? "{}",
            bytes: row["bytes"].int ?? 0, path: statesPath + "/" + Store.hex(digest))
    }

    /// Removes the state directories no image holds (and partial ones). Under the exclusive
    /// store lock (gc's).
    func removeUnheldStates(_ report: inout GarbageReport) throws {
        guard FileSystem.isDirectory(statesPath) else { return }
        let held = Set(
            try database.query("SELECT DISTINCT digest FROM image_states").compactMap {
                $0["digest"].string.map(Store.hex)
            })
        for name in try FileSystem.list(statesPath) where !held.contains(name) {
            let path = statesPath + "/" + name
            var bytes: Int64 = 0
            for file in (try? FileSystem.list(path)) ?? [] {
                bytes += Int64((try? FileSystem.status(path + "/" + file))??.st_blocks ?? 0) * 512
            }
            do {
                try FileSystem.removeTree(path)
                report.statesRemoved += 1
                report.bytesFreed += bytes
            } catch {
                report.failures.append("state \(name) could not be removed: \(error)")
            }
        }
    }

    /// Checks every recorded state: its directory is there and (unless not `verifyContent`)
    /// its files still hash to its digest.
    func checkStates(_ report: inout ConsistencyReport, verifyContent: Bool) throws {
        for row in try database.query("SELECT image, digest FROM image_states ORDER BY digest") {
            guard let digest = row["digest"].string, let image = row["image"].string else { continue }
            let path = statesPath + "/" + Store.hex(digest)
            guard FileSystem.isDirectory(path) else {
                report.problems.append("image \(image) holds state \(digest), whose directory \(path) is missing")
                continue
            }
            guard verifyContent else { continue }
            do {
                let found = try Store.stateDigest(of: path)
                if found.description != digest {
                    report.problems.append("state \(digest) has changed on disk: its files now hash to \(found)")
                }
            } catch {
                report.problems.append("state \(digest) cannot be read: \(error)")
            }
        }
    }
}
