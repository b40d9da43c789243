import FoundationEssentials
import HTTPTypes
import Hummingbird
import ImageStore
import Sandbox

/// The memory-snapshot extension (`/x-contree/...`, docs/serve.md): save a running VM
/// instance with its processes as an image, and spawn instances that resume such an image.
extension ServerState {
    struct SnapshotBody: Decodable {
        var tag: String?
    }

    /// `POST /x-contree/instances/{id}/snapshot` (body optional: `{"tag": NAME}`): the running
    /// instance's files, memory and processes as a new image of the namespace; it goes on.
    func snapshotInstance(_ call: APICall, _ uuid: String) async throws -> Response {
        let live = try running(call, uuid)
        var body = SnapshotBody()
        if let length = call.request.headers[.contentLength], length != "0" {
            body = try await decode(SnapshotBody.self, from: call)
        }
        let tag = body.tag?.trimmingCharacters(in: .whitespaces)
        if let tag {
            try Store.validateTag(tag)
            guard !tag.hasPrefix("tag:") else { throw APIError(.badRequest, "a tag may not start with 'tag:'") }
        }
        guard operations.isolation == .vm else {
            throw APIError(
                .conflict,
                "memory snapshots need VM instances (serve --isolation vm): this host's CRIU cannot checkpoint a container"
            )
        }
        let image = try await live.control.snapshotMemory()
        try api.database.transaction { tx in
            try api.adopt(image.uuid, namespace: call.namespace, operation: live.uuid, tx: tx)
            if let tag {
                _ = try tx.query(
                    "INSERT OR REPLACE INTO api_tags(namespace, tag, image, updated) VALUES(?, ?, ?, ?)",
                    [.text(call.namespace), .text(tag), .text(image.uuid), .real(Timestamp.now)])
            }
        }
        var headers = HTTPFields()
        headers[.location] = "/v1/inspect/\(image.uuid)/"
        guard case .object(var members) = try api.imageJSON(image, namespace: call.namespace, tag: tag) else {
            throw APIError(.internalServerError, "the image's record could not be written")
        }
        members.append(("memory", JSON.bool(true)))
        return .json(.object(members), status: .created, headers: headers)
    }

    /// `POST /x-contree/images/{uuid}/resume`: a spawn (the body of `POST /v1/instances`, its
    /// `image` ignored) whose command starts with the snapshot's processes running.
    func resumeImage(_ call: APICall, _ uuid: String) async throws -> Response {
        let record = try api.visibleImage(uuid, namespace: call.namespace)
        guard try api.store.state(of: record.uuid) != nil else {
            throw APIError(
                .badRequest,
                "image \(record.uuid) holds files only, no memory snapshot; spawn it with POST /v1/instances, or make one with POST /x-contree/instances/{id}/snapshot"
            )
        }
        guard operations.isolation == .vm else {
            throw APIError(.conflict, "resuming a memory snapshot needs VM instances (serve --isolation vm)")
        }
        var body = try await decode(SpawnRequest.self, from: call)
        body.image = record.uuid
        var plan = try makePlan(body, call: call)
        plan.resume = true
        return try start(plan)
    }
}
