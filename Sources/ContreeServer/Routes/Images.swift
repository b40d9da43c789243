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

        // (image, tag) pairs: one per tag, or one untagged entry.
        var entries: [(record: ImageRecord, tag: String?)] = []
        let owned = try api.database.query(
            "SELECT image FROM api_images WHERE namespace = ?", [.text(call.namespace)]
        ).compactMap { $0["image"].string }
        var records = try owned.compactMap { try api.store.image($0) }
        // The built-in base images, without the package variants others' spawns built.
        records += try api.store.listImages().filter {
            $0.origin.hasPrefix("builtin:") && $0.tags.contains(where: BaseImages.names.contains)
        }
        for record in records {
            let tags = try api.tags(of: record, namespace: call.namespace)
            if tags.isEmpty {
                if !tagged { entries.append((record, nil)) }
            } else {
                for tag in tags { entries.append((record, tag)) }
            }
        }
        let filtered = entries.filter { entry in
            let created = entry.record.created.timeIntervalSince1970
            if let prefix, !(entry.tag?.hasPrefix(prefix) ?? false) { return false }
            if let wantedUUID, entry.record.uuid != wantedUUID { return false }
            if let since, created < since { return false }
            if let until, created > until { return false }
            return true
        }.sorted { $0.record.created > $1.record.created }
        let page = filtered.dropFirst(offset).prefix(limit)
        let images = try page.map { try api.imageJSON($0.record, namespace: call.namespace, tag: $0.tag) }
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
