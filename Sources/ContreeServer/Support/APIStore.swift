import FoundationEssentials
import Glibc
import ImageStore
import Sandbox
import Synchronization
import SystemSupport

/// The server's tables in the store's database, and its uploaded files. Every row belongs to
/// one namespace (one token); built-in base images are the only thing shared.
struct APIStore: Sendable {
    let store: Store
    let baseImages: BaseImages
    var database: Database { store.database }
    var filesPath: String { store.root + "/files" }

    init(store: Store, baseImages: BaseImages) throws {
        self.store = store
        self.baseImages = baseImages
        try store.migrate("api", APIStore.migrations)
        try FileSystem.makeDirectory(filesPath, mode: 0o700)
    }

    /// The API's tables, version by version (see `Store.migrate`); version 1 is idempotent, as
    /// stores made before the tables had versions hold them already.
    static let migrations: [SchemaMigration] = [
        { tx in
            try tx.execute(
                """
                CREATE TABLE IF NOT EXISTS api_images(
                    namespace TEXT NOT NULL, image TEXT NOT NULL, operation TEXT, created REAL NOT NULL,
                    PRIMARY KEY(namespace, image));
                CREATE TABLE IF NOT EXISTS api_tags(
                    namespace TEXT NOT NULL, tag TEXT NOT NULL, image TEXT NOT NULL, updated REAL NOT NULL,
                    PRIMARY KEY(namespace, tag));
                CREATE INDEX IF NOT EXISTS api_tags_image ON api_tags(namespace, image);
                CREATE TABLE IF NOT EXISTS api_files(
                    namespace TEXT NOT NULL, sha256 TEXT NOT NULL, uuid TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
                    created REAL NOT NULL, updated REAL NOT NULL, PRIMARY KEY(namespace, sha256));
                CREATE TABLE IF NOT EXISTS api_operations(
                    uuid TEXT PRIMARY KEY, namespace TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
                    created REAL NOT NULL, started REAL, ended REAL, image TEXT, result_image TEXT,
                    metadata TEXT NOT NULL, result TEXT, error TEXT, cpu REAL NOT NULL DEFAULT 0,
                    memory INTEGER NOT NULL DEFAULT 0, image_size INTEGER NOT NULL DEFAULT 0,
                    tag TEXT, session_key TEXT);
                CREATE INDEX IF NOT EXISTS api_operations_ns ON api_operations(namespace, created);
                CREATE TABLE IF NOT EXISTS api_subprocesses(
                    operation TEXT NOT NULL, spid INTEGER NOT NULL, request TEXT NOT NULL, result TEXT,
                    PRIMARY KEY(operation, spid));
                CREATE TABLE IF NOT EXISTS api_events(
                    operation TEXT NOT NULL, id INTEGER NOT NULL, spid INTEGER, type TEXT NOT NULL, body TEXT NOT NULL,
                    PRIMARY KEY(operation, id));
                """)
        }
    ]

    static func pinOwner(_ namespace: String) -> String { "api:" + namespace }

    // MARK: Images

    /// An image this namespace may use: its own, or a built-in base image.
    func visibleImage(_ uuid: String, namespace: String) throws -> ImageRecord {
        let lower = uuid.lowercased()
        guard APIStore.isUUID(lower), let record = try store.image(lower) else {
            throw APIError.notFound("image \(uuid) was not found; list images with GET /v1/images")
        }
        if record.origin.hasPrefix("builtin:") { return record }
        let owned = try database.query(
            "SELECT 1 FROM api_images WHERE namespace = ? AND image = ?", [.text(namespace), .text(lower)])
        guard !owned.isEmpty else {
            throw APIError.notFound("image \(uuid) was not found; list images with GET /v1/images")
        }
        return record
    }

    /// The image a tag names in this namespace, falling back to the built-in base images
    /// (`busybox`, `busybox:latest`, `debian:bookworm`, `debian:bookworm+pkg`); nil when none.
    func imageForTag(_ tag: String, namespace: String) throws -> ImageRecord? {
        if let row = try database.query(
            "SELECT image FROM api_tags WHERE namespace = ? AND tag = ?", [.text(namespace), .text(tag)]
        ).first, let uuid = row["image"].string {
            return try store.image(uuid)
        }
        // Built-in images answer once built (a spawn builds them); a lookup never starts a build.
        guard let builtin = APIStore.builtinName(tag), let record = try store.findImage(builtin),
            record.origin.hasPrefix("builtin:")
        else { return nil }
        return record
    }

    /// The built-in image a tag names, if any.
    static func builtinName(_ tag: String) -> String? {
        let name = tag.hasSuffix(":latest") ? String(tag.dropLast(":latest".count)) : tag
        if BaseImages.names.contains(name) { return name }
        if let canonical = try? BaseImages.canonical(name) { return canonical }
        return nil
    }

    /// Makes `image` part of `namespace` (a run's result) and keeps it from `gc`.
    func adopt(_ image: String, namespace: String, operation: String?, tx: Database.Transaction) throws {
        try APIStore.adopt(image, namespace: namespace, operation: operation, store: store, tx: tx)
    }

    static func adopt(
        _ image: String, namespace: String, operation: String?, store: Store, tx: Database.Transaction
    ) throws {
        _ = try tx.query(
            "INSERT OR IGNORE INTO api_images(namespace, image, operation, created) VALUES(?, ?, ?, ?)",
            [.text(namespace), .text(image), operation.sql, .real(Timestamp.now)])
        try store.pin(tx, image, owner: APIStore.pinOwner(namespace))
    }

    /// The tags of an image in a namespace (built-in images carry their name).
    func tags(of record: ImageRecord, namespace: String) throws -> [String] {
        var tags = try database.query(
            "SELECT tag FROM api_tags WHERE namespace = ? AND image = ? ORDER BY updated DESC",
            [.text(namespace), .text(record.uuid)]
        ).compactMap { $0["tag"].string }
        if record.origin.hasPrefix("builtin:") { tags.append(contentsOf: record.tags.filter(BaseImages.isBuiltin)) }
        return tags
    }

    /// The operation that made an image, if an API run did.
    func operation(of image: String, namespace: String) throws -> String? {
        try database.query(
            "SELECT operation FROM api_images WHERE namespace = ? AND image = ?", [.text(namespace), .text(image)]
        ).first?["operation"].string
    }

    /// Image JSON: `{uuid, tag, created_at, operation_uuid}`.
    func imageJSON(_ record: ImageRecord, namespace: String, tag: String? = nil) throws -> JSON {
        let tag = try tag ?? tags(of: record, namespace: namespace).first
        return .object([
            ("uuid", .string(record.uuid)), ("tag", .optional(tag)),
            ("created_at", .string(Timestamp.iso(record.created.timeIntervalSince1970))),
            ("operation_uuid", .optional(try operation(of: record.uuid, namespace: namespace))),
        ])
    }

    // MARK: Files

    func blobPath(_ sha256: String) -> String { filesPath + "/" + sha256 }

    /// Records an uploaded blob (already in place) for a namespace; returns its row.
    func recordFile(sha256: String, size: Int64, namespace: String) throws -> SQLRow {
        try database.transaction { tx in
            let now = Timestamp.now
            let existing = try tx.query(
                "SELECT * FROM api_files WHERE namespace = ? AND sha256 = ?", [.text(namespace), .text(sha256)])
            if existing.isEmpty {
                _ = try tx.query(
                    "INSERT INTO api_files(namespace, sha256, uuid, size, created, updated) VALUES(?, ?, ?, ?, ?, ?)",
                    [
                        .text(namespace), .text(sha256), .text(UUID().uuidString.lowercased()), .integer(size),
                        .real(now), .real(now),
                    ])
            } else {
                _ = try tx.query(
                    "UPDATE api_files SET updated = ? WHERE namespace = ? AND sha256 = ?",
                    [.real(now), .text(namespace), .text(sha256)])
            }
            return try tx.query(
                "SELECT * FROM api_files WHERE namespace = ? AND sha256 = ?", [.text(namespace), .text(sha256)])[0]
        }
    }

    /// Serializes placing and removing blobs in `files/` (a blob is shared by namespaces).
    let blobs = BlobLock()

    /// The bytes of the namespace's uploads.
    func uploadedBytes(namespace: String) throws -> Int64 {
        try database.query("SELECT COALESCE(SUM(size), 0) AS n FROM api_files WHERE namespace = ?", [.text(namespace)])
            .first?["n"].int ?? 0
    }

    func file(sha256: String, namespace: String) throws -> SQLRow? {
        try database.query(
            "SELECT * FROM api_files WHERE namespace = ? AND sha256 = ?",
            [.text(namespace), .text(sha256.lowercased())]
        ).first
    }

    func file(uuid: String, namespace: String) throws -> SQLRow? {
        try database.query(
            "SELECT * FROM api_files WHERE namespace = ? AND uuid = ?", [.text(namespace), .text(uuid.lowercased())]
        ).first
    }

    static func fileJSON(_ row: SQLRow, full: Bool) -> JSON {
        var members: [(String, JSON)] = [
            ("uuid", .string(row["uuid"].string ?? "")), ("sha256", .string(row["sha256"].string ?? "")),
            ("size", .int(row["size"].int ?? 0)),
        ]
        if full {
            members.append(("created_at", .string(Timestamp.iso(row["created"].double ?? 0))))
            members.append(("updated_at", .string(Timestamp.iso(row["updated"].double ?? 0))))
        }
        return .object(members)
    }

    static func isUUID(_ s: String) -> Bool {
        let parts = s.split(separator: "-", omittingEmptySubsequences: false)
        return parts.map(\.count) == [8, 4, 4, 4, 12] && parts.allSatisfy { $0.allSatisfy(\.isHexDigit) }
    }
}

/// A lock shared by the copies of an `APIStore` (a struct).
final class BlobLock: Sendable {
    private let mutex = Mutex(())

    func withLock<T>(_ body: (inout ()) throws -> T) rethrows -> T {
        try mutex.withLock { try body(&$0) }
    }
}
