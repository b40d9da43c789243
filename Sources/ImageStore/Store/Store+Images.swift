import ImageFormats
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

extension Store {
    /// The image with this exact UUID, or nil.
    public func image(_ uuid: String) throws -> ImageRecord? {
        try images(where: "i.uuid = ?", [.text(uuid.lowercased())]).first
    }

    /// Whether the image `uuid` exists (without reading its record).
    public func hasImage(_ uuid: String) throws -> Bool {
        try !database.query("SELECT 1 FROM images WHERE uuid = ?", [.text(uuid.lowercased())]).isEmpty
    }

    /// Every image, oldest first.
    public func listImages() throws -> [ImageRecord] {
        try images(where: "1", [])
    }

    /// Resolves a reference: a UUID, a unique UUID prefix of at least 8 characters, or a tag.
    /// Built-in names are resolved by `BaseImages`, which builds them on first use.
    /// - Throws: `notFound` naming the reference.
    public func resolveImage(_ reference: String) throws -> ImageRecord {
        if let record = try findImage(reference) { return record }
        throw SandboxError(
            .notFound,
            "unknown image '\(reference)': no image has this UUID or tag; `contree-pipeline image ls` lists them")
    }

    /// Like `resolveImage`, but nil when nothing matches.
    public func findImage(_ reference: String) throws -> ImageRecord? {
        let ref = reference.trimmingPrefix("image:")
        if let tagged = try database.query("SELECT image FROM tags WHERE name = ?", [.text(String(ref))]).first,
            let uuid = tagged["image"].string
        {
            return try image(uuid)
        }
        let lower = ref.lowercased()
        if Store.isUUID(lower) { return try image(lower) }
        if lower.count >= 8, lower.allSatisfy({ $0.isHexDigit || $0 == "-" }) {
            let matches = try database.query(
                "SELECT uuid FROM images WHERE uuid LIKE ? LIMIT 2", [.text(lower + "%")])
            if matches.count > 1 {
                throw SandboxError(.invalidArgument, "image prefix '\(reference)' is ambiguous; give more characters")
            }
            if let uuid = matches.first?["uuid"].string { return try image(uuid) }
        }
        return nil
    }

    static func isUUID(_ s: String) -> Bool {
        let parts = s.split(separator: "-", omittingEmptySubsequences: false)
        return parts.map(\.count) == [8, 4, 4, 4, 12] && parts.allSatisfy { $0.allSatisfy(\.isHexDigit) }
    }

    /// Images ordered by creation, with their layers and tags.
    func images(where condition: String, _ bindings: [SQLValue]) throws -> [ImageRecord] {
        let rows = try database.query(
            """
            SELECT i.uuid, i.parent, i.config, i.size, i.created, i.origin,
                   (SELECT group_concat(layer, ' ') FROM
                      (SELECT layer FROM image_layers WHERE image = i.uuid ORDER BY position)) AS layers,
                   (SELECT group_concat(name, ' ') FROM
                      (SELECT name FROM tags WHERE image = i.uuid ORDER BY name)) AS tags
            FROM images i WHERE \(condition) ORDER BY i.created, i.uuid
            """, bindings)
        let decoder = JSONDecoder()
        return try rows.map { row in
            ImageRecord(
                uuid: row["uuid"].string ?? "", parent: row["parent"].string,
                layers: (row["layers"].string ?? "").split(separator: " ").map(String.init),
                config: try decoder.decode(ImageConfig.self, from: Data((row["config"].string ?? "{}").utf8)),
                size: row["size"].int ?? 0, created: Date(timeIntervalSince1970: row["created"].double ?? 0),
                origin: row["origin"].string ?? "",
                tags: (row["tags"].string ?? "").split(separator: " ").map(String.init))
        }
    }

    /// Inserts a new image and any new layer rows inside a transaction.
    /// Records a layer whose directory is in place and proven (named by this archiver), or
    /// marks an existing row proven.
    func recordLayer(_ tx: Database.Transaction, _ layer: LayerSummary) throws {
        try tx.query(
            """
            INSERT INTO layers(digest, size, files, entries, created, archive_format) VALUES(?, ?, ?, ?, ?, ?)
            ON CONFLICT(digest) DO UPDATE SET archive_format = excluded.archive_format
            """,
            [
                .text(layer.digest), .integer(layer.bytes), .integer(Int64(layer.files)),
                .integer(Int64(layer.entries)), .real(Store.now), .integer(Int64(LayerArchiver.format)),
            ])
    }

    /// Whether a layer's row says this archiver named its directory.
    func isProven(_ digest: String) throws -> Bool {
        try database.query("SELECT archive_format FROM layers WHERE digest = ?", [.text(digest)]).first?[
            "archive_format"
        ].int == Int64(LayerArchiver.format)
    }

    func insertImage(_ tx: Database.Transaction, _ record: ImageRecord) throws {
        let config = String(decoding: try JSONEncoder().encode(record.config), as: UTF8.self)
        try tx.query(
            "INSERT INTO images(uuid, parent, config, size, created, origin) VALUES(?, ?, ?, ?, ?, ?)",
            [
                .text(record.uuid), record.parent.sql, .text(config), .integer(record.size),
                .real(record.created.timeIntervalSince1970), .text(record.origin),
            ])
        for (position, layer) in record.layers.enumerated() {
            try tx.query(
                "INSERT INTO image_layers(image, position, layer) VALUES(?, ?, ?)",
                [.text(record.uuid), .integer(Int64(position)), .text(layer)])
        }
    }

    /// The total content size of a layer chain.
    func size(ofLayers layers: [String]) throws -> Int64 {
        var total: Int64 = 0
        for layer in layers {
            total +=
                try database.query("SELECT size FROM layers WHERE digest = ?", [.text(layer)]).first?["size"].int ?? 0
        }
        return total
    }

    // MARK: Tags

    /// Validates a tag name (the CLI's and the API's): ASCII letters, digits and `._:/-@+,`,
    /// starting with a letter or digit, at most 256 characters, no `..` segment, not shaped like
    /// a UUID. No control character, NUL or direction override can hide in one.
    public static func validateTag(_ name: String) throws {
        let allowed = name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "._:/-@+,".contains($0)) }
        guard !name.isEmpty, name.utf8.count <= 256, allowed,
            name.first?.isLetter == true || name.first?.isNumber == true,
            !name.split(separator: "/", omittingEmptySubsequences: false).contains("..")
        else {
            throw SandboxError(
                .invalidArgument,
                "invalid tag '\(RawPath(name))': use letters, digits and . _ : / - @ + , (starting with a letter or digit, at most 256, no '..' part)"
            )
        }
        guard !isUUID(name.lowercased()) else {
            throw SandboxError(.invalidArgument, "invalid tag '\(name)': a tag may not look like an image UUID")
        }
    }

    /// Points `name` at `uuid`, moving the tag if it exists.
    public func tag(_ name: String, image uuid: String) throws {
        try Store.validateTag(name)
        try database.transaction { tx in try tag(tx, name, image: uuid) }
    }

    /// `tag(_:image:)` inside a transaction (one that may have just inserted the image).
    package func tag(_ tx: Database.Transaction, _ name: String, image uuid: String) throws {
        guard try !tx.query("SELECT 1 FROM images WHERE uuid = ?", [.text(uuid)]).isEmpty else {
            throw SandboxError(.notFound, "unknown image \(uuid); `contree-pipeline image ls` lists images")
        }
        try tx.query(
            "INSERT INTO tags(name, image, updated) VALUES(?, ?, ?) ON CONFLICT(name) DO UPDATE SET image = excluded.image, updated = excluded.updated",
            [.text(name), .text(uuid), .real(Store.now)])
    }

    /// Removes a tag (the image stays).
    /// Removes a tag. - Returns: the image it pointed at (which stays).
    @discardableResult
    public func untag(_ name: String) throws -> String {
        try database.transaction { tx in
            guard
                let image = try tx.query("SELECT image FROM tags WHERE name = ?", [.text(name)]).first?["image"].string
            else {
                throw SandboxError(.notFound, "no tag named '\(name)'; `contree-pipeline image ls` lists tags")
            }
            try tx.query("DELETE FROM tags WHERE name = ?", [.text(name)])
            return image
        }
    }

    // MARK: Lineage and removal

    /// The image and its ancestors, newest first. An ancestor that was removed ends the list
    /// with its UUID only.
    public func ancestry(_ uuid: String) throws -> (images: [ImageRecord], missingAncestor: String?) {
        var result: [ImageRecord] = []
        var next: String? = uuid
        var seen = Set<String>()
        while let current = next, !seen.contains(current) {
            seen.insert(current)
            guard let record = try image(current) else { return (result, current) }
            result.append(record)
            next = record.parent
        }
        return (result, nil)
    }

    /// Removes an image record. Its layers go when nothing else uses them (see `gc`). Children
    /// keep working: every image holds its full layer chain.
    /// - Parameter force: also remove its tags; without it a tagged image is refused.
    public func removeImage(_ uuid: String, force: Bool) throws {
        try database.transaction { tx in
            let tags = try tx.query("SELECT name FROM tags WHERE image = ?", [.text(uuid)]).compactMap {
                $0["name"].string
            }
            if !tags.isEmpty && !force {
                throw SandboxError(
                    .conflict,
                    "image \(uuid) is tagged \(tags.joined(separator: ", ")); untag it first or pass --force")
            }
            try tx.query("DELETE FROM tags WHERE image = ?", [.text(uuid)])
            try tx.query("DELETE FROM images WHERE uuid = ?", [.text(uuid)])
            if tx.changes == 0 { throw SandboxError(.notFound, "unknown image \(uuid)") }
        }
    }
}
