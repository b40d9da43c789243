import Glibc
import ImageFormats
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// What `gc` removed.
public struct GarbageReport: Sendable, Codable {
    public var layersRemoved: Int = 0
    public var bytesFreed: Int64 = 0
    public var abandonedWork: Int = 0
    public var imagesRemoved: Int = 0
    /// Files derived from layers that are gone (the VM backend's erofs images).
    public var derivedRemoved: Int = 0
    /// Memory snapshots (`states/`) no image holds any more.
    public var statesRemoved: Int = 0
    /// What could not be removed (gc carried on past it); empty when all went.
    public var failures: [String] = []

    enum CodingKeys: String, CodingKey {
        case derivedRemoved = "derived_removed"
        case statesRemoved = "states_removed"
        case layersRemoved = "layers_removed"
        case bytesFreed = "bytes_freed"
        case abandonedWork = "abandoned_work"
        case imagesRemoved = "images_removed"
        case failures
    }
}

/// What `fsck` found. `problems` make the store inconsistent; `garbage` is what a crash or a
/// dead process left and `gc` (or the next command) removes.
public struct ConsistencyReport: Sendable, Codable {
    public var problems: [String] = []
    public var garbage: [String] = []
    public var imagesChecked = 0
    public var layersChecked = 0
    public var isConsistent: Bool { problems.isEmpty }

    enum CodingKeys: String, CodingKey {
        case problems, garbage
        case imagesChecked = "images_checked"
        case layersChecked = "layers_checked"
    }
}

extension Store {
    /// Removes what nothing references: layers no image or live lease uses, layer directories
    /// without a row (a commit that died before its transaction), abandoned work.
    /// - Parameters:
    ///   - pruneUntaggedOlderThan: also remove untagged images older than this many seconds that
    ///     no tagged image descends from and no lease uses.
    ///   - derived: files other modules derive from layers (the VM backend's erofs images): those
    ///     whose layer is gone go too.
    public func collectGarbage(
        pruneUntaggedOlderThan: Double? = nil, derived: [any DerivedLayerFiles] = []
    ) throws -> GarbageReport {
        var report = GarbageReport()
        return try withStoreLock(exclusive: true) {
            let abandoned = try recoverAbandonedWork(scanningCgroups: true)
            report.abandonedWork = abandoned.removed.count
            report.failures += abandoned.failures
            if let age = pruneUntaggedOlderThan { report.imagesRemoved = try pruneUntagged(olderThan: age) }
            let doomed: [(String, Int64)] = try database.transaction { tx in
                var live = Set(
                    try tx.query("SELECT DISTINCT layer FROM image_layers").compactMap { $0["layer"].string })
                for row in try tx.query("SELECT layers FROM leases") {
                    let layers = try JSONDecoder().decode(
                        [String].self, from: Data((row["layers"].string ?? "[]").utf8))
                    live.formUnion(layers)
                }
                let all = try tx.query("SELECT digest, size FROM layers")
                let dead = all.compactMap { row -> (String, Int64)? in
                    guard let digest = row["digest"].string, !live.contains(digest) else { return nil }
                    return (digest, row["size"].int ?? 0)
                }
                for (digest, _) in dead { try tx.query("DELETE FROM layers WHERE digest = ?", [.text(digest)]) }
                return dead
            }
            // A directory that will not go is reported, and the rest still go: its row is gone,
            // so the next gc finds it as a directory without a row and tries again.
            func remove(_ path: String, what: String) -> Bool {
                do {
                    try FileSystem.removeTree(path)
                    return true
                } catch {
                    report.failures.append("\(what) could not be removed: \(error)")
                    return false
                }
            }
            for (digest, size) in doomed where remove(layerPath(digest), what: "layer \(digest)") {
                report.layersRemoved += 1
                report.bytesFreed += size
            }
            // Directories without a row: commits that died between rename and transaction.
            let known = Set(
                try database.query("SELECT digest FROM layers").compactMap { $0["digest"].string.map(Store.hex) })
            for name in try FileSystem.list(layersPath) where !known.contains(name) {
                if remove(layersPath + "/" + name, what: "layer directory \(name)") { report.layersRemoved += 1 }
            }
            try removeUnheldStates(&report)
            // Files derived from a layer go with it. Not from a directory shared with other
            // stores (reached through a symlink): their layers are not known here.
            for provider in derived {
                let directory = root + "/" + provider.directory
                guard FileSystem.isDirectory(directory), !isShared(provider.directory) else { continue }
                for name in try FileSystem.list(directory) {
                    guard let layer = provider.layer(ofFile: name), !known.contains(layer) else { continue }
                    let blocks = Int64((try? FileSystem.status(directory + "/" + name))??.st_blocks ?? 0)
                    guard remove(directory + "/" + name, what: provider.directory + "/" + name) else { continue }
                    report.bytesFreed += blocks * 512
                    report.derivedRemoved += 1
                }
            }
            return report
        }
    }

    /// Removes those of `uuids` that nothing keeps: no tag, no pin, no child image. Leaves go
    /// first, so a chain of them goes whole; an image something keeps keeps its ancestors.
    /// - Returns: how many images were removed (their layers go with the next `gc`).
    public func removeUnreferenced(_ uuids: Set<String>) throws -> Int {
        try database.transaction { tx in
            var left = uuids
            var removed = 0
            var progressed = true
            while progressed {
                progressed = false
                for uuid in left.sorted() {
                    let kept = try tx.query(
                        """
                        SELECT 1 FROM tags WHERE image = ?1 UNION ALL SELECT 1 FROM pins WHERE image = ?1
                        UNION ALL SELECT 1 FROM images WHERE parent = ?1 LIMIT 1
                        """, [.text(uuid)])
                    guard kept.isEmpty else { continue }
                    try tx.query("DELETE FROM images WHERE uuid = ?", [.text(uuid)])
                    removed += tx.changes
                    left.remove(uuid)
                    progressed = true
                }
            }
            return removed
        }
    }

    /// Whether a directory under the root is reached through a symlink (shared with others).
    private func isShared(_ relative: String) -> Bool {
        var path = root
        for part in relative.split(separator: "/") {
            path += "/" + part
            if (try? FileSystem.status(path))??.isSymlink ?? false { return true }
        }
        return false
    }

    private func pruneUntagged(olderThan age: Double) throws -> Int {
        try database.transaction { tx in
            let cutoff = Store.now - age
            var keep = Set<String>()
            // Tagged and pinned images (a pipeline's step cache) and all their ancestors stay.
            var frontier = try tx.query("SELECT image FROM tags UNION SELECT image FROM pins").compactMap {
                $0["image"].string
            }
            while let uuid = frontier.popLast() {
                guard keep.insert(uuid).inserted else { continue }
                if let parent = try tx.query("SELECT parent FROM images WHERE uuid = ?", [.text(uuid)]).first?["parent"]
                    .string
                {
                    frontier.append(parent)
                }
            }
            var removed = 0
            for row in try tx.query("SELECT uuid FROM images WHERE created < ?", [.real(cutoff)]) {
                guard let uuid = row["uuid"].string, !keep.contains(uuid) else { continue }
                try tx.query("DELETE FROM images WHERE uuid = ?", [.text(uuid)])
                removed += 1
            }
            return removed
        }
    }

    /// Checks that the store is consistent: the database passes SQLite's integrity check, every
    /// image's layers exist with the right digests, tags and chains are whole.
    /// - Parameter verifyContent: recompute every layer's digest from its files (reads all bytes).
    public func checkConsistency(verifyContent: Bool = true) throws -> ConsistencyReport {
        var report = ConsistencyReport()
        let integrity = try database.query("PRAGMA integrity_check").first?["integrity_check"].string
        if integrity != "ok" { report.problems.append("database integrity check: \(integrity ?? "no answer")") }
        let foreign = try database.query("PRAGMA foreign_key_check")
        if !foreign.isEmpty { report.problems.append("database has \(foreign.count) dangling references") }

        var layerRows: [String: SQLRow] = [:]
        for row in try database.query("SELECT digest, size, files, entries FROM layers") {
            if let digest = row["digest"].string { layerRows[digest] = row }
        }
        for (digest, row) in layerRows.sorted(by: { $0.key < $1.key }) {
            report.layersChecked += 1
            let path = layerPath(digest)
            guard FileSystem.isDirectory(path) else {
                report.problems.append("layer \(digest) is recorded but its directory \(path) is missing")
                continue
            }
            guard verifyContent else { continue }
            do {
                let summary = try LayerArchiver.archive(directory: path)
                if summary.digest != digest {
                    report.problems.append(
                        "layer \(digest) has changed on disk: its content now hashes to \(summary.digest)")
                } else if summary.bytes != row["size"].int || Int64(summary.entries) != row["entries"].int {
                    report.problems.append("layer \(digest): size or entry count differs from its record")
                }
            } catch {
                report.problems.append("layer \(digest) cannot be read: \(error)")
            }
        }
        for image in try listImages() {
            report.imagesChecked += 1
            if image.layers.isEmpty { report.problems.append("image \(image.uuid) has no layers") }
            for layer in image.layers where layerRows[layer] == nil {
                report.problems.append("image \(image.uuid) uses layer \(layer), which is not in the store")
            }
        }
        let positions = try database.query(
            "SELECT image, COUNT(*) AS n, MAX(position) AS top FROM image_layers GROUP BY image")
        for row in positions where (row["n"].int ?? 0) != (row["top"].int ?? -1) + 1 {
            report.problems.append("image \(row["image"].string ?? "?") has a gap in its layer chain")
        }
        try checkStates(&report, verifyContent: verifyContent)
        // Garbage: not inconsistent, but worth saying.
        let known = Set(layerRows.keys.map(Store.hex))
        for name in try FileSystem.list(layersPath) where !known.contains(name) {
            report.garbage.append("layer directory \(name) has no record (an interrupted commit; `gc` removes it)")
        }
        for name in try FileSystem.list(tmpPath) where !isLeaseAlive(name) {
            report.garbage.append("work directory tmp/\(name) belongs to no live process (removed by the next command)")
        }
        return report
    }
}
