import Foundation
import Glibc
import HTTPClient
import ImageFormats
import ImageStore
import Sandbox
import SystemSupport

/// An image imported from a registry, with its manifest's digest and annotations.
public struct RegistryImport: Sendable {
    public var image: ImageRecord
    public var manifestDigest: String
    public var annotations: [String: String]
    /// The blobs the manifest lists (layers and config), with their sizes: the registry holds them.
    public var blobs: [String: Int64] = [:]
}

/// Imports an image from a registry (the OCI distribution API): fetches the manifest (through
/// an image index to the platform's), the config, and the layers the store does not hold yet,
/// each checked against its digest, into a temporary image layout that `OCIImporter` imports.
public struct RegistryImporter: Sendable {
    public let store: Store
    public let credentials: RegistryCredentials?
    /// The registries it may reach (`serve`: the operator's allowlist).
    public let access: RegistryAccess
    /// Where the layers fetched so far are reported (bytes and count).
    public let progress: ProgressReporter?
    /// Stops the downloads in flight and the unpacking between layers; a cancelled import
    /// removes what it made.
    public let cancellation: Cancellation?

    public init(
        store: Store, credentials: RegistryCredentials? = nil, access: RegistryAccess = .any(),
        progress: ProgressReporter? = nil, cancellation: Cancellation? = nil
    ) {
        self.store = store
        self.credentials = credentials
        self.access = access
        self.progress = progress
        self.cancellation = cancellation
    }

    public static func handles(_ reference: String) -> Bool { reference.hasPrefix("docker://") }

    /// `sources` with `docker://` references imported from registries (see `ImageSources`),
    /// with credentials from CONTREE_REGISTRY_USER / CONTREE_REGISTRY_PASSWORD.
    public static func imageSource(adding sources: ImageSources = .builtIn) -> ImageSources {
        sources.adding("docker://") { store, reference, cancellation in
            let env = ProcessInfo.processInfo.environment
            let credentials = env["CONTREE_REGISTRY_USER"].map {
                RegistryCredentials(username: $0, password: env["CONTREE_REGISTRY_PASSWORD"] ?? "")
            }
            return try RegistryImporter(store: store, credentials: credentials, cancellation: cancellation)
                .importImage(reference)
        }
    }

    static let acceptedManifests = [OCI.manifestType, OCI.indexType, OCI.dockerManifest, OCI.dockerManifestList]

    public func importImage(
        _ text: String, platform: OCI.Platform = OCI.Platform(architecture: "amd64", os: "linux")
    ) throws -> ImageRecord {
        let reference = try RegistryReference(parsing: text)
        let client = try RegistryClient(
            reference: reference, credentials: credentials, access: access, cancellation: cancellation)
        guard let imported = try importImage(reference.reference, client: client, name: text, platform: platform) else {
            let url = "\(client.base)/manifests/\(reference.reference)"
            throw SandboxError(
                .notFound, "\(text): not found in the registry (no such repository, tag or digest at \(url))",
                cause: RegistryError(.status(404), path: URL(string: url)?.path ?? url))
        }
        return imported.image
    }

    /// Imports the image `tagOrDigest` names in the client's repository; nil when the
    /// registry has no such manifest.
    func importImage(
        _ tagOrDigest: String, client: RegistryClient, name text: String,
        platform: OCI.Platform = OCI.Platform(architecture: "amd64", os: "linux")
    ) throws -> RegistryImport? {
        var importer = try OCIImporter(store: store)
        importer.cancellation = cancellation
        importer.blobsVerified = true  // each download was hashed as it streamed in
        let lease = try store.acquireLease(layers: [])
        defer { lease.release() }
        let root = lease.workPath + "/pull"
        try FileSystem.makeDirectories(root + "/blobs/sha256")

        // The manifest (by tag or digest); through an index to the platform's.
        guard var (descriptor, document) = try fetchManifest(client, tagOrDigest, root: root, missingIsNil: true) else {
            return nil
        }
        var depth = 0
        while document.manifests != nil {
            depth += 1
            guard depth < 4 else { throw SandboxError(.invalidArgument, "\(text): image indexes nest too deep") }
            let chosen = try OCI.choose(platform, from: document, name: text)
            (descriptor, document) = try fetchManifest(client, chosen.digest, root: root)!
        }
        guard let config = document.config, let layers = document.layers else {
            let type = document.mediaType ?? descriptor.mediaType ?? "unknown"
            throw SandboxError(
                .unsupported, "\(text): manifest media type '\(type)' is not supported (OCI or Docker schema 2 only)")
        }
        Trace.mark("import: manifest")
        let blobs = Dictionary(([config] + layers).map { ($0.digest, $0.size) }, uniquingKeysWith: { $1 })
        // A manifest this store imported before: its image is here, nothing more to fetch.
        if let known = try importer.imported(manifest: descriptor.digest) {
            return RegistryImport(
                image: known, manifestDigest: descriptor.digest, annotations: document.annotations ?? [:], blobs: blobs)
        }
        let configPath = try blobPath(config.digest, root: root, what: "image config")
        try client.download("\(client.base)/blobs/\(config.digest)", digest: config.digest, to: configPath)
        let configuration = try JSONDecoder().decode(
            OCI.ImageConfiguration.self, from: Data(try FileSystem.readFile(configPath)))
        guard configuration.rootfs.diffIDs.count == layers.count else {
            throw SandboxError(
                .corrupt,
                "\(text): the config lists \(configuration.rootfs.diffIDs.count) layers, the manifest \(layers.count)")
        }
        let started = Date()
        var fetched: Int64 = 0
        var fetchedLayers = 0
        let total = layers.reduce(Int64(0)) { $0 + $1.size }
        // The layers the store lacks, a few at a time (as registry clients do).
        var wanted: [(index: Int, digest: String, size: Int64, path: String)] = []
        for (index, layer) in layers.enumerated() {
            if try importer.knows(diffID: configuration.rootfs.diffIDs[index]) { continue }  // not fetched again
            wanted.append(
                (index, layer.digest, layer.size, try blobPath(layer.digest, root: root, what: "layer \(index + 1)")))
        }
        /// Progress and the first failure, shared by the download lanes.
        final class Tally: @unchecked Sendable {
            let lock = NSLock()
            var bytes: Int64 = 0
            var layers = 0
            var reported = Date.distantPast
            var failure: (any Error)?
        }
        let tally = Tally()
        let pending = wanted
        let width = min(3, pending.count)
        let progress = self.progress
        /// Bytes and layers so far: at a layer's end, and at most once a second in between.
        @Sendable func report(bytes: Int64, layerDone: Bool) {
            tally.lock.withLock {
                tally.bytes += bytes
                if layerDone { tally.layers += 1 }
                guard let progress, layerDone || Date().timeIntervalSince(tally.reported) >= 1 else { return }
                tally.reported = Date()
                progress.report(
                    "import",
                    "\(tally.layers)/\(pending.count) layers, \(ByteCount.format(tally.bytes)) of \(ByteCount.format(total))",
                    elapsed: Date().timeIntervalSince(started))
            }
        }
        DispatchQueue.concurrentPerform(iterations: width) { lane in
            for item in stride(from: lane, to: pending.count, by: width).map({ pending[$0] }) {
                if tally.lock.withLock({ tally.failure != nil }) { return }
                do {
                    try client.download("\(client.base)/blobs/\(item.digest)", digest: item.digest, to: item.path) {
                        report(bytes: $0, layerDone: false)
                    }
                    report(bytes: 0, layerDone: true)
                } catch {
                    tally.lock.withLock { if tally.failure == nil { tally.failure = error } }
                }
            }
        }
        if let failure = tally.failure { throw failure }
        Trace.mark("import: \(pending.count) blobs fetched")
        fetched = tally.bytes
        fetchedLayers = tally.layers
        if fetchedLayers > 0 {
            progress?.finish(
                "import",
                "fetched \(fetchedLayers) of \(layers.count) layers, \(ByteCount.format(fetched)) in \(String(format: "%.1f", Date().timeIntervalSince(started))) s; unpacking"
            )
        }
        var entry = descriptor
        entry.annotations = [OCI.refName: "pulled"]
        let index = OCI.Document(
            schemaVersion: 2, mediaType: OCI.indexType, manifests: [entry], config: nil, layers: nil, annotations: nil)
        try FileSystem.writeFile(root + "/index.json", Array(try JSONEncoder().encode(index)), mode: 0o644)
        try FileSystem.writeFile(root + "/oci-layout", Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8), mode: 0o644)
        let image = try importer.importImage("oci:\(root):pulled", platform: platform, name: text)
        return RegistryImport(
            image: image, manifestDigest: descriptor.digest, annotations: document.annotations ?? [:], blobs: blobs)
    }

    private func blobPath(_ digest: String, root: String, what: String) throws -> String {
        root + "/blobs/sha256/" + (try OCI.checkDigest(digest, what: what))
    }

    /// GETs a manifest, checks it against the digest it was asked by (or the one the registry
    /// states), and stores it in the layout.
    private func fetchManifest(
        _ client: RegistryClient, _ reference: String, root: String, missingIsNil: Bool = false
    ) throws -> (OCI.Descriptor, OCI.Document)? {
        let (data, response) = try client.call(
            "GET", "\(client.base)/manifests/\(reference)",
            headers: ["Accept": RegistryImporter.acceptedManifests.joined(separator: ", ")],
            allow: missingIsNil ? [404] : [])
        if response.status == 404 { return nil }
        let bytes = Array(data)
        let actual = Digest.sha256(bytes).description
        let expected =
            reference.hasPrefix("sha256:") ? reference : response.header("Docker-Content-Digest")
        if let expected, expected != actual {
            throw SandboxError(
                .corrupt, "\(client.reference): the manifest hashes to \(actual), not \(expected); nothing was imported"
            )
        }
        let document: OCI.Document
        do {
            document = try JSONDecoder().decode(OCI.Document.self, from: data)
        } catch {
            throw SandboxError(.invalidArgument, "\(client.reference): the manifest is not valid JSON: \(error)")
        }
        try FileSystem.writeFile(try blobPath(actual, root: root, what: "manifest"), bytes, mode: 0o644)
        let type = response.header("Content-Type").map { String($0.split(separator: ";")[0]) }
        return (
            OCI.Descriptor(mediaType: document.mediaType ?? type, digest: actual, size: Int64(bytes.count)), document
        )
    }
}
