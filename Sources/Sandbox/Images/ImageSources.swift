import ImageStore
import SystemSupport

/// References that name images outside the store (`oci:DIR`, `docker://HOST/REPO:TAG`, …),
/// imported the first time they are used: `BaseImages.resolve` (so `exec --image`, a
/// pipeline's `image:` and the API's spawn) asks the source whose prefix matches. A value
/// handed to the engine and the base images, never a process-wide setting: layouts and archives
/// are built in; a program that links the registry client adds it (`serve` does not: its
/// imports go through the operator's allowlist).
public struct ImageSources: Sendable {
    /// Imports the image `reference` names into the store; a cancelled `Cancellation` stops
    /// the import (which removes what it made).
    public typealias Resolver = @Sendable (Store, String, Cancellation?) throws -> ImageRecord

    private var resolvers: [(prefix: String, resolve: Resolver)]

    /// OCI layouts and archives on this host.
    public static let builtIn = ImageSources(resolvers: [
        ("oci:", importLayout), ("oci-archive:", importLayout), ("docker-archive:", importLayout),
    ])

    private static let importLayout: Resolver = { store, reference, cancellation in
        var importer = try OCIImporter(store: store)
        importer.cancellation = cancellation
        return try importer.importImage(reference)
    }

    /// These sources and one for references starting with `prefix` (in place of any other).
    public func adding(_ prefix: String, _ resolve: @escaping Resolver) -> ImageSources {
        var sources = self
        sources.resolvers.removeAll { $0.prefix == prefix }
        sources.resolvers.append((prefix, resolve))
        return sources
    }

    /// The source for `reference`, if one handles it.
    public func resolver(for reference: String) -> Resolver? {
        resolvers.first { reference.hasPrefix($0.prefix) }?.resolve
    }
}
