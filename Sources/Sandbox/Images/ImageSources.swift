import Synchronization

/// References that name images outside the store (`oci:DIR`, `docker://HOST/REPO:TAG`, …),
/// imported the first time they are used: `BaseImages.resolve` (so `exec --image`, a
/// pipeline's `image:` and the API's spawn) asks the source whose prefix matches. Layouts and
/// archives are built in; the registry source is registered by the program that links it.
public enum ImageSources {
    /// Imports the image `reference` names into the store; a cancelled `Cancellation` stops
    /// the import (which removes what it made).
    public typealias Resolver = @Sendable (Store, String, Cancellation?) throws -> ImageRecord

    private static let resolvers = Mutex<[(prefix: String, resolve: Resolver)]>([
        ("oci:", importLayout), ("oci-archive:", importLayout), ("docker-archive:", importLayout),
    ])

    private static let importLayout: Resolver = { store, reference, cancellation in
        var importer = try OCIImporter(store: store)
        importer.cancellation = cancellation
        return try importer.importImage(reference)
    }

    /// Adds (or replaces) the source for references starting with `prefix`.
    public static func register(_ prefix: String, _ resolve: @escaping Resolver) {
        resolvers.withLock { list in
            list.removeAll { $0.prefix == prefix }
            list.append((prefix, resolve))
        }
    }

    /// The source for `reference`, if one handles it.
    public static func resolver(for reference: String) -> Resolver? {
        resolvers.withLock { list in list.first { reference.hasPrefix($0.prefix) }?.resolve }
    }
}
