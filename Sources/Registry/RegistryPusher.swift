import Foundation
import Glibc
import HTTPClient
import ImageFormats
import ImageStore
import Synchronization
import SystemSupport

/// Pushes an image to a registry: each layer (the store's canonical tar, so its digest is its
/// name) and the config as blobs, skipping those the registry has, then the manifest under the
/// tag. A layer the registry has is never archived.
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
        let client = try RegistryClient(
            reference: reference, credentials: credentials, access: .any(allowHTTP: allowHTTP), pushing: true)
        return try push(image, tag: reference.reference, annotations: [:], client: client, known: BlobSizes())
    }

    /// Blobs known to be in the repository, with their sizes: pushes through one client skip
    /// them without asking again.
    final class BlobSizes: Sendable {
        private let sizes = Mutex<[String: Int64]>([:])
        subscript(digest: String) -> Int64? {
            get { sizes.withLock { $0[digest] } }
            set { sizes.withLock { $0[digest] = newValue } }
        }
    }

    /// Pushes `image` (or, when nil, an image of no layers: a record for its annotations) under
    /// `tag` in the client's repository; by its digest alone (no tag) when `tag` is nil.
    func push(
        _ image: ImageRecord?, tag: String?, annotations: [String: String], client: RegistryClient, known: BlobSizes
    ) throws -> String {
        // Authenticate with a GET first: the HEADs below must not meet a challenge (libcurl
        // would wait for the body a HEAD answer announces but never sends).
        _ = try client.call("GET", "\(client.scheme)://\(client.reference.host)/v2/")
        let lease = try store.acquireLease(layers: image?.layers ?? [], image: image?.uuid)
        defer { lease.release() }
        let exporter = OCIExporter(store: store)
        var layers: [OCI.Descriptor] = []
        for digest in image?.layers ?? [] {
            let size: Int64
            if let cached = known[digest] {
                size = cached
            } else if let present = try remoteSize(digest, client: client) {
                size = present
            } else {
                // Only a layer the registry lacks is archived, into the lease's directory.
                let path = lease.workPath + "/" + digest.dropFirst(7)
                size = try exporter.writeLayer(digest, to: path)
                try upload(digest, bytes: try FileSystem.readFile(path), client: client)
                unlink(path)
            }
            known[digest] = size
            layers.append(OCI.Descriptor(mediaType: OCI.layerTar, digest: digest, size: size))
        }
        let configBytes =
            try image.map { try OCI.encode(exporter.configuration($0)) }
            ?? Array(#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.utf8)
        let config = OCI.Descriptor(
            mediaType: OCI.configType, digest: Digest.sha256(configBytes).description, size: Int64(configBytes.count))
        if known[config.digest] == nil, try remoteSize(config.digest, client: client) == nil {
            try upload(config.digest, bytes: configBytes, client: client)
        }
        known[config.digest] = config.size
        let manifest = try OCI.encode(
            OCI.Document(
                schemaVersion: 2, mediaType: OCI.manifestType, manifests: nil, config: config, layers: layers,
                annotations: annotations.isEmpty ? nil : annotations))
        let digest = Digest.sha256(manifest).description
        _ = try client.call(
            "PUT", "\(client.base)/manifests/\(tag ?? digest)", headers: ["Content-Type": OCI.manifestType],
            body: Data(manifest))
        return digest
    }

    /// The size of a blob the repository holds; nil when it does not.
    private func remoteSize(_ digest: String, client: RegistryClient) throws -> Int64? {
        let (_, head) = try client.call("HEAD", "\(client.base)/blobs/\(digest)", allow: [404])
        guard head.status == 200 else { return nil }
        return head.header("Content-Length").flatMap { Int64($0) } ?? 0
    }

    /// One blob: POST an upload session, PUT the bytes with the digest.
    private func upload(_ digest: String, bytes: [UInt8], client: RegistryClient) throws {
        let (_, started) = try client.call("POST", "\(client.base)/blobs/uploads/", allow: [])
        guard var location = started.header("Location") else {
            throw SandboxError(.remote, "\(client.reference): the registry opened an upload without a Location")
        }
        if location.hasPrefix("/") { location = "\(client.scheme)://\(client.reference.host)" + location }
        location += (location.contains("?") ? "&" : "?") + "digest=" + digest
        _ = try client.call(
            "PUT", location, headers: ["Content-Type": "application/octet-stream"], body: Data(bytes))
    }
}
