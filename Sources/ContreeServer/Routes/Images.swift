import FoundationEssentials
import Hummingbird
import ImageStore
import Registry
import Sandbox

extension ServerState {
    /// `GET /v1/images`: the namespace's images and the built-in ones, newest first.
    func listImages(_ call: APICall) throws -> Response {
        let limit = try call.intParam("limit", default: 100, range: 1...1000)
        let offset = try call.intParam("offset", default: 0, range: 0...Int(Int32.max))
        let prefix = call.param("tag").flatMap { $0.isEmpty ? nil : $0 }
        let tagged = call.flag("tagged") || prefix != nil
        let since = try call.timeFilter("since")
        let until = try call.timeFilter("until")
        if let uuid = call.param("uuid"), !uuid.isEmpty, !APIStore.isUUID(uuid.lowercased()) {
            throw APIError(.badRequest, "uuid=\(uuid) is not a UUID")
        }
        let wantedUUID = call.param("uuid").flatMap { $0.isEmpty ? nil : $0.lowercased() }

        // One entry per (image, tag), or one untagged entry for an image without tags, newest
        // image first: paged by SQLite walking the images by creation (images_created) with an
        // index lookup per image, so that the first page costs the same in a store of 100,000
        // images as in one of 1,000. A built-in image shows its name unless the namespace
        // tagged it itself.
        let names = BaseImages.names.map { "'\($0)'" }.joined(separator: ", ")
        let tag = "COALESCE(a.tag, t.name)"
        var sql = """
            SELECT i.uuid AS uuid, i.created AS created, \(tag) AS tag,
                (SELECT operation FROM api_images WHERE namespace = ?1 AND image = i.uuid) AS operation
            FROM images i
                LEFT JOIN api_tags a ON a.namespace = ?1 AND a.image = i.uuid
                LEFT JOIN tags t ON a.tag IS NULL AND t.image = i.uuid AND i.origin LIKE 'builtin:%'
                    AND (t.name IN (\(names)) OR t.name LIKE 'debian:bookworm+%')
            WHERE (EXISTS (SELECT 1 FROM api_images WHERE namespace = ?1 AND image = i.uuid)
                OR (i.origin LIKE 'builtin:%' AND EXISTS (
                    SELECT 1 FROM tags x WHERE x.image = i.uuid AND x.name IN (\(names)))))
            """
        var bindings: [SQLValue] = [.text(call.namespace)]
        if tagged { sql += " AND \(tag) IS NOT NULL" }
        if let prefix {
            sql += " AND substr(\(tag), 1, length(?\(bindings.count + 1))) = ?\(bindings.count + 1)"
            bindings.append(.text(prefix))
        }
        if let wantedUUID {
            sql += " AND i.uuid = ?\(bindings.count + 1)"
            bindings.append(.text(wantedUUID))
        }
        if let since {
            sql += " AND i.created >= ?\(bindings.count + 1)"
            bindings.append(.real(since))
        }
        if let until {
            sql += " AND i.created <= ?\(bindings.count + 1)"
            bindings.append(.real(until))
        }
        sql += " ORDER BY i.created DESC LIMIT ?\(bindings.count + 1) OFFSET ?\(bindings.count + 2)"
        bindings += [.integer(Int64(limit)), .integer(Int64(offset))]
        let images: [JSON] = try api.database.query(sql, bindings).map { row in
            .object([
                ("uuid", .string(row["uuid"].string ?? "")), ("tag", .optional(row["tag"].string)),
                ("created_at", .string(Timestamp.iso(row["created"].double ?? 0))),
                ("operation_uuid", .optional(row["operation"].string)),
            ])
        }
        return .json(.object([("images", .array(images))]))
    }

    struct TagBody: Decodable {
        var tag: String
    }

    /// `PATCH /v1/images/{uuid}/tag`: points a tag of the namespace at an image (moving it).
    func setTag(_ call: APICall, image: String) async throws -> Response {
        let record = try api.visibleImage(image, namespace: call.namespace)
        let body = try await decode(TagBody.self, from: call)
        let tag = body.tag.trimmingCharacters(in: .whitespaces)
        try Store.validateTag(tag)
        guard !tag.hasPrefix("tag:") else { throw APIError(.badRequest, "a tag may not start with 'tag:'") }
        try api.database.transaction { tx in
            try api.adopt(record.uuid, namespace: call.namespace, operation: nil, tx: tx)
            _ = try tx.query(
                "INSERT OR REPLACE INTO api_tags(namespace, tag, image, updated) VALUES(?, ?, ?, ?)",
                [.text(call.namespace), .text(tag), .text(record.uuid), .real(Timestamp.now)])
        }
        return .json(try api.imageJSON(record, namespace: call.namespace, tag: tag))
    }

    /// `DELETE /v1/images/{uuid}/tag[?tag=T]`: removes one tag (or every tag) of the image.
    func removeTag(_ call: APICall, image: String) throws -> Response {
        let record = try api.visibleImage(image, namespace: call.namespace)
        var sql = "DELETE FROM api_tags WHERE namespace = ? AND image = ?"
        var bindings: [SQLValue] = [.text(call.namespace), .text(record.uuid)]
        if let tag = call.param("tag"), !tag.isEmpty {
            sql += " AND tag = ?"
            bindings.append(.text(tag.hasPrefix("tag:") ? String(tag.dropFirst(4)) : tag))
        }
        let removed = try api.database.transaction { tx -> Int in
            _ = try tx.query(sql, bindings)
            return tx.changes
        }
        if removed == 0, let tag = call.param("tag"), !tag.isEmpty {
            throw APIError.notFound("image \(record.uuid) has no tag '\(tag)'")
        }
        return .json(try api.imageJSON(record, namespace: call.namespace))
    }
}

extension ServerState {
    /// `POST /v1/images/import`: an `image_import` operation that pulls `registry.url`
    /// (`docker://HOST[:PORT]/REPO[:TAG|@sha256:…]`; plain http only to loopback) into the
    /// namespace, tagged `tag` when given.
    func importImage(_ call: APICall) async throws -> Response {
        let body = try await decode(ImportRequest.self, from: call)
        var url = body.registry.url.trimmingCharacters(in: .whitespaces)
        if !url.contains("://") { url = "docker://" + url }
        _ = try RegistryReference(parsing: url)  // a malformed reference is a 400 now, not a failed operation
        try checkImport(url, token: call.token)
        let timeout = body.timeout ?? call.token.maxTimeout
        guard timeout > 0, timeout <= call.token.maxTimeout else {
            throw APIError(.badRequest, "timeout must be from 1 to this token's \(call.token.maxTimeout) s")
        }
        if let tag = body.tag {
            try Store.validateTag(tag)
            guard !tag.hasPrefix("tag:") else { throw APIError(.badRequest, "a tag may not start with 'tag:'") }
        }
        let uuid = try operations.startImport(
            url: url, tag: body.tag, timeout: timeout,
            credentials: body.registry.credentials.map {
                RegistryCredentials(username: $0.username, password: $0.password)
            },
            token: call.token)
        var headers = HTTPFields()
        headers[.location] = "/v1/operations/\(uuid)"
        return .json(.object([("uuid", .string(uuid))]), status: .accepted, headers: headers)
    }
}
