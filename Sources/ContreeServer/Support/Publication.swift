import FoundationEssentials
import ImageStore
import SystemSupport

/// Hands images made outside the server (a pipeline run's snapshots, `run --publish`) to one
/// of its namespaces, tagged, so that the ConTree clients of that namespace's token branch
/// from them (`tag:NAME`).
public enum NamespacePublication {
    /// Whether `name` can be a namespace (a token's name in the tokens file).
    public static func isNamespace(_ name: String) -> Bool {
        !name.isEmpty && name.allSatisfy { $0.isLetter || $0.isNumber || "-_.".contains($0) }
    }

    /// Adopts each image into `namespace` (kept from `gc` while it is there) and points each
    /// tag at its image, moving a tag that exists; all or nothing.
    /// - Throws: `SandboxError.invalidArgument` for a bad namespace or tag, `notFound` for an
    ///   image the store does not hold.
    public static func publish(_ tags: [(tag: String, image: String)], namespace: String, store: Store) throws {
        guard isNamespace(namespace) else {
            throw SandboxError(
                .invalidArgument,
                "'\(namespace)' cannot name a namespace: use the name of a token in serve's tokens file (letters, digits, '-', '_', '.')"
            )
        }
        for (tag, image) in tags {
            try Store.validateTag(tag)
            guard try store.image(image) != nil else {
                throw SandboxError(.notFound, "image \(image) (for tag \(tag)) is not in the store")
            }
        }
        try store.migrate("api", APIStore.migrations)
        try store.database.transaction { tx in
            for (tag, image) in tags {
                try APIStore.adopt(image, namespace: namespace, operation: nil, store: store, tx: tx)
                _ = try tx.query(
                    "INSERT OR REPLACE INTO api_tags(namespace, tag, image, updated) VALUES(?, ?, ?, ?)",
                    [.text(namespace), .text(tag), .text(image), .real(Timestamp.now)])
            }
        }
    }
}
