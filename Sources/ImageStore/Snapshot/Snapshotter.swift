import Glibc
import ImageFormats
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// The result of committing a directory of changes.
public struct CommitResult: Sendable {
    /// The image the changes made; the base itself when there were none.
    public var image: ImageRecord
    /// The new layer, or nil when nothing changed.
    public var layer: LayerSummary?
    /// Whether the chain was flattened into one layer.
    public var flattened: Bool
}

/// Turns directories of changes (overlayfs uppers, imports) into immutable layers and images.
///
/// Commit: compute the canonical digest, `syncfs`, rename the directory into `layers/<hex>`
/// (or drop it when an identical layer exists), then insert the image in one transaction, all
/// under the shared store lock so that `gc` cannot interleave.
public struct Snapshotter: Sendable {
    public let store: Store

    public init(store: Store) {
        self.store = store
    }

    /// Commits `directory` (inside `lease`'s work directory) as a new image on top of `base`.
    /// - Parameters:
    ///   - base: the image the changes apply to; nil for a root image.
    ///   - budget: what the archive may cost (a run's limit, its remaining time).
    ///   - record: extra rows written in the same transaction as the image (a run record).
    ///   - layersOf: the image whose layers the changes lie over, when not `base` (a run resumed
    ///     from a memory snapshot changes files relative to the snapshot's base); `base` stays
    ///     the new image's parent.
    ///   - newImage: make a new image even when nothing changed (one that carries more than its
    ///     files: a memory snapshot).
    /// - Returns: the base image unchanged when `directory` is empty and `base` is given (unless
    ///   `newImage`).
    /// - Throws: `limitExceeded` or `cancelled` from the budget, before anything is placed.
    public func commit(
        _ directory: String, base: ImageRecord?, layersOf: ImageRecord? = nil, config: ImageConfig, origin: String,
        lease: Lease,
        budget: ArchiveBudget = ArchiveBudget(), newImage: Bool = false,
        record: (Database.Transaction, ImageRecord, LayerSummary?) throws -> Void = { _, _, _ in }
    ) throws -> CommitResult {
        if let base, try FileSystem.list(directory).isEmpty {
            if config == base.config && !newImage && layersOf == nil {
                try store.database.transaction { tx in try record(tx, base, nil) }
                return CommitResult(image: base, layer: nil, flattened: false)
            }
            // Only the config changed: a new image over the same layers.
            let image = ImageRecord(
                uuid: UUID().uuidString.lowercased(), parent: base.uuid, layers: (layersOf ?? base).layers,
                config: config, size: (layersOf ?? base).size, created: Date(), origin: origin, tags: [])
            return try store.withStoreLock(exclusive: false) {
                try store.database.transaction { tx in
                    try store.insertImage(tx, image)
                    try record(tx, image, nil)
                    return CommitResult(image: image, layer: nil, flattened: false)
                }
            }
        }
        let summary = try LayerArchiver.archive(directory: directory, removingSockets: true, budget: budget)
        try FileSystem.syncFileSystem(directory)
        return try store.withStoreLock(exclusive: false) {
            try place(directory, digest: summary.digest)
            var layers = ((layersOf ?? base)?.layers ?? []) + [summary.digest]
            var newLayers = [summary]
            var flattened = false
            if layers.count > store.flattenThreshold {
                let flat = try flatten(layers, lease: lease)
                newLayers.append(flat)
                layers = [flat.digest]
                flattened = true
            }
            let image = ImageRecord(
                uuid: UUID().uuidString.lowercased(), parent: base?.uuid, layers: layers, config: config,
                size: 0, created: Date(), origin: origin, tags: [])
            return try store.database.transaction { tx in
                var sized = image
                for layer in newLayers { try store.recordLayer(tx, layer) }
                sized.size = try layers.reduce(Int64(0)) { total, digest in
                    total
                        + (try tx.query("SELECT size FROM layers WHERE digest = ?", [.text(digest)]).first?["size"].int
                            ?? 0)
                }
                try store.insertImage(tx, sized)
                try record(tx, sized, summary)
                return CommitResult(image: sized, layer: summary, flattened: flattened)
            }
        }
    }

    /// A new image over `base` with one layer already in the store on top (or none: a new
    /// config only). Used by imports that find a layer they already hold.
    public func stack(
        _ layer: String?, on base: ImageRecord?, config: ImageConfig, origin: String
    ) throws
        -> ImageRecord
    {
        let layers = (base?.layers ?? []) + (layer.map { [$0] } ?? [])
        return try store.withStoreLock(exclusive: false) {
            try store.database.transaction { tx in
                var image = ImageRecord(
                    uuid: UUID().uuidString.lowercased(), parent: base?.uuid, layers: layers, config: config, size: 0,
                    created: Date(), origin: origin, tags: [])
                for digest in layers {
                    guard let row = try tx.query("SELECT size FROM layers WHERE digest = ?", [.text(digest)]).first
                    else {
                        throw SandboxError(.notFound, "layer \(digest) is not in the store")
                    }
                    image.size += row["size"].int ?? 0
                }
                try store.insertImage(tx, image)
                return image
            }
        }
    }

    /// Moves a synced directory into `layers/`, or drops it when the layer already exists.
    /// Must run under the shared store lock.
    ///
    /// Identical changes share one directory, so an existing directory is trusted only when it
    /// provably holds what its name says: its row says this archiver named it, or archiving it
    /// again gives its name. Otherwise (a directory an older version named while it skipped
    /// names that are not UTF-8) it is replaced by this one, which has just been archived.
    private func place(_ directory: String, digest: String) throws {
        let destination = store.layerPath(digest)
        if FileSystem.exists(destination) {
            if try store.isProven(digest) { return try FileSystem.removeTree(directory) }
            let kept = try FileSystem.withLock(store.root + "/layers.prove.lock") { () throws -> Bool in
                if (try? LayerArchiver.archive(directory: destination).digest) == digest { return true }
                Trace.mark("commit: layer \(digest) holds more than its digest covers; replacing it")
                try FileSystem.rename(destination, directory + ".unproven")
                try FileSystem.rename(directory, destination)
                return false
            }
            if kept { try FileSystem.removeTree(directory) }
            try? FileSystem.removeTree(directory + ".unproven")
            try FileSystem.sync(store.layersPath)
            return
        }
        // Two runs that made the same change commit the same digest at the same time: the
        // second rename finds the first's directory, which has exactly this content.
        if Glibc.rename(directory, destination) != 0 {
            guard errno == ENOTEMPTY || errno == EEXIST, FileSystem.isDirectory(destination) else {
                throw SandboxError.system("rename(\(directory), \(destination))")
            }
            try FileSystem.removeTree(directory)
            return
        }
        try FileSystem.sync(store.layersPath)
    }

    /// Builds one layer holding the merged tree of `layers` (bottom first) and places it.
    private func flatten(_ layers: [String], lease: Lease) throws -> LayerSummary {
        let fs = ImageFilesystem(layersTopFirst: layers.reversed().map(store.layerPath))
        let directory = lease.workPath + "/flat"
        try FileSystem.removeTree(directory)
        try FileSystem.makeDirectory(directory, mode: 0o755)
        let rootStatus = fs.root.status
        try LayerFlattener.materialize(fs, into: directory)
        chmod(directory, rootStatus.st_mode & 0o7777)
        let summary = try LayerArchiver.archive(directory: directory, removingSockets: true)
        try FileSystem.syncFileSystem(directory)
        try place(directory, digest: summary.digest)
        return summary
    }

    /// Imports a root file system prepared in `directory` as a new root image.
    public func importRoot(
        _ directory: String, config: ImageConfig, origin: String, lease: Lease
    ) throws
        -> ImageRecord
    {
        try commit(directory, base: nil, config: config, origin: origin, lease: lease).image
    }
}
