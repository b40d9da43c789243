import Foundation
import Glibc
import Sandbox

/// Pushes an image to a registry: each layer (the store's canonical tar, so its digest is its
/// name) and the config as blobs, skipping those the registry has, then the manifest under the
/// tag.
public struct RegistryPusher: Sendable {
    public let store: Store
    public let credentials: RegistryCredentials?
    public let allowHTTP: Bool

    public init(store: Store, credentials: RegistryCredentials? = nil, allowHTTP: Bool = false) {
        self.store = store
        self.credentials = credentials
        self.allowHTTP = allowHTTP
    }

    /// Pushes `image` to `destination`; returns the manifest's digest.
    @discardableResult
    public func push(_ image: ImageRecord, to destination: String) throws -> String {
        let reference = try RegistryReference(parsing: destination)
        guard !reference.reference.hasPrefix("sha256:") else {
            throw SandboxError(.invalidArgument, "push to a tag (docker://HOST/REPO:TAG), not to a digest")
        }
        let client = RegistryClient(reference: reference, credentials: credentials, allowHTTP: allowHTTP)
        client.pushing = true
        // Authenticate with a GET first: the HEADs below must not meet a challenge (libcurl
        // would wait for the body a HEAD answer announces but never sends).
        _ = try client.call("GET", "\(client.scheme)://\(reference.host)/v2/")
        let lease = try store.acquireLease(layers: image.layers, image: image.uuid)
        defer { lease.release() }
        // The same documents `image export` writes: a layout in the lease, then its blobs.
        let layout = lease.workPath + "/push"
        let manifestDigest = try OCIExporter(store: store).export(image, to: "oci:\(layout):push")
        let manifest = try FileSystem.readFile(layout + "/blobs/sha256/" + manifestDigest.dropFirst(7))
        let document = try JSONDecoder().decode(OCI.Document.self, from: Data(manifest))
        for blob in (document.layers ?? []) + [document.config].compactMap({ $0 }) {
            try upload(blob.digest, from: layout + "/blobs/sha256/" + blob.digest.dropFirst(7), client: client)
        }
        _ = try client.call(
            "PUT", "\(client.base)/manifests/\(reference.reference)", headers: ["Content-Type": OCI.manifestType],
            body: Data(manifest))
        return manifestDigest
    }

    /// One blob, unless the registry has it: POST an upload session, PUT the bytes with the digest.
    private func upload(_ digest: String, from path: String, client: RegistryClient) throws {
        let (_, head) = try client.call("HEAD", "\(client.base)/blobs/\(digest)", allow: [404])
        if head.statusCode == 200 { return }
        let (_, started) = try client.call("POST", "\(client.base)/blobs/uploads/", allow: [])
        guard var location = started.value(forHTTPHeaderField: "Location") else {
            throw SandboxError(.childProcess, "\(client.reference): the registry opened an upload without a Location")
        }
        if location.hasPrefix("/") { location = "\(client.scheme)://\(client.reference.host)" + location }
        location += (location.contains("?") ? "&" : "?") + "digest=" + digest
        let bytes = try FileSystem.readFile(path)
        _ = try client.call(
            "PUT", location, headers: ["Content-Type": "application/octet-stream"], body: Data(bytes))
    }
}
