import Synchronization

/// References that name images outside the store (`oci:DIR`, `docker://HOST/REPO:TAG`, …),
/// imported the first time they are used: `BaseImages.resolve` (so `exec --image`, a
/// pipeline's `image:` and the API's spawn) asks the source whose prefix matches. Layouts and
/// archives are built in; the registry source is registered by the program that links it.
public enum ImageSources {
    public typealias Resolver = @Sendable (Store, String) throws -> ImageRecord

    private static let resolvers = Mutex<[(prefix: String, resolve: Resolver)]>([
        ("oci:", { store, reference in try OCIImporter(store: store).importImage(reference) }),
        ("oci-archive:", { store, reference in try OCIImporter(store: store).importImage(reference) }),
        ("docker-archive:", { store, reference in try OCIImporter(store: store).importImage(reference) }),
    ])

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
