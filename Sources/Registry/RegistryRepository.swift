import Foundation
import Glibc
import HTTPClient
import ImageFormats
import ImageStore
import SystemSupport

/// One repository of a registry (`docker://HOST[:PORT]/REPO`) used tag by tag through one
/// client: one authorization, and blobs pushed once are not asked about again. The shared
/// step cache keeps its entries here.
public final class RegistryRepository: Sendable {
    public let store: Store
    public let location: String
    let client: RegistryClient
    let allowHTTP: Bool
    private let known = RegistryPusher.BlobSizes()

    public init(
        _ location: String, store: Store, credentials: RegistryCredentials? = nil, allowHTTP: Bool = false,
        pushing: Bool = false
    ) throws {
        let reference = try RegistryReference(repository: location)
        self.store = store
        self.location = reference.description
        self.allowHTTP = allowHTTP
        client = try RegistryClient(
            reference: reference, credentials: credentials, access: .any(allowHTTP: allowHTTP), pushing: pushing)
    }

    /// Imports the image under `tag`, with its manifest's annotations; nil when there is no
    /// such tag (or no such repository yet).
    public func importImage(tag: String) throws -> RegistryImport? {
        try importImage(reference: tag)
    }

    /// Imports the image a tag or a digest (`sha256:…`) names in this repository; nil when
    /// there is none. Its blobs are remembered as present: a push through this repository
    /// does not ask about them again.
    public func importImage(reference: String, cancellation: Cancellation? = nil) throws -> RegistryImport? {
        let name = location + (reference.hasPrefix("sha256:") ? "@" : ":") + reference
        let imported = try RegistryImporter(
            store: store, credentials: client.credentials, access: client.access, cancellation: cancellation
        ).importImage(reference, client: client, name: name)
        for (digest, size) in imported?.blobs ?? [:] { known[digest] = size }
        return imported
    }

    /// The annotations of the manifest under `tag`, without importing anything; nil when
    /// there is no such tag.
    public func annotations(tag: String) throws -> [String: String]? {
        let (data, response) = try client.call(
            "GET", "\(client.base)/manifests/\(tag)", headers: ["Accept": OCI.manifestType], allow: [404])
        guard response.status != 404 else { return nil }
        return (try? JSONDecoder().decode(OCI.Document.self, from: data))?.annotations ?? [:]
    }

    /// The registry refused a manifest for a blob it does not hold (yet).
    static func blobNotYetThere(_ error: any Error) -> Bool {
        guard let cause = (error as? SandboxError)?.cause as? RegistryError else { return false }
        return cause.codes.contains { $0 == "MANIFEST_BLOB_UNKNOWN" || $0 == "BLOB_UNKNOWN" }
    }

    /// Pushes `image` (or a record of no layers, for its annotations alone) under `tag`, or
    /// by digest alone when `tag` is nil; returns the manifest's digest.
    ///
    /// Two pushes of one blob at once (two machines whose steps made the same layer) can make
    /// the registry refuse a manifest for a moment (MANIFEST_BLOB_UNKNOWN while the other
    /// upload commits the blob): the push is tried again, asking about the blobs anew.
    @discardableResult
    public func push(_ image: ImageRecord?, tag: String?, annotations: [String: String]) throws -> String {
        var attempt = 0
        while true {
            do {
                return try RegistryPusher(store: store, credentials: client.credentials, allowHTTP: allowHTTP)
                    .push(image, tag: tag, annotations: annotations, client: client, known: known)
            } catch  where attempt < 3 && RegistryRepository.blobNotYetThere(error) {
                attempt += 1
                for digest in image?.layers ?? [] { known[digest] = nil }
                usleep(UInt32(200_000 * attempt))
            }
        }
    }
}
