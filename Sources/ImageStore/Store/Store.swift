import Glibc
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// The image store under `$CONTREE_HOME`: an SQLite database (WAL) plus immutable layer
/// directories.
///
/// Layout:
/// - `db.sqlite`: images, layers, tags, runs and leases;
/// - `layers/<hex>/`: one directory per layer, named by the sha256 of its canonical tar;
/// - `tmp/<lease>/`: work in progress (uppers, imports), owned by a live lease;
/// - `leases/<lease>.lock`: one file per lease, flock-ed by its owner while it lives;
/// - `store.lock`: shared by commits, exclusive for `gc`.
///
/// A layer is written under `tmp/`, synced, renamed into `layers/`, and only then gets its
/// database row (one transaction with its image), so a crash at any instant leaves either the
/// old state or the new one plus garbage that the next command or `gc` removes.
public final class Store: Sendable {
    public let root: String
    public let database: Database

    public var layersPath: String { root + "/layers" }
    public var tmpPath: String { root + "/tmp" }
    public var leasesPath: String { root + "/leases" }
    var lockPath: String { root + "/" + Store.lockName }
    static let lockName = "store.lock"

    /// Images whose chain grows past this many layers are flattened into one.
    public let flattenThreshold: Int

    static let schemaVersion = 4

    /// `$CONTREE_HOME`, or `~/.local/share/contree`.
    public static var defaultRoot: String {
        if let home = getenv("CONTREE_HOME"), home.pointee != 0 { return String(cString: home) }
        let user = getenv("HOME").map { String(cString: $0) } ?? "/root"
        return user + "/.local/share/contree"
    }

    /// Opens (creating if needed) the store at `root` and removes what dead processes left
    /// behind (temp dirs, leases).
    public init(root: String = Store.defaultRoot, flattenThreshold: Int = 64) throws {
        let absolute = root.hasPrefix("/") ? root : FileSystem.currentDirectory() + "/" + root
        self.root = absolute
        self.flattenThreshold = flattenThreshold
        try FileSystem.makeDirectories(absolute, mode: 0o755)
        // The store holds every run's command, environment and files: its owner's alone (a
        // store made by an older version is tightened too).
        if chmod(absolute, 0o700) != 0 { throw SandboxError.system("chmod(\(absolute), 0700)") }
        for dir in ["layers", "tmp", "leases"] { try FileSystem.makeDirectory(absolute + "/" + dir, mode: 0o700) }
        // SQLite gives its -wal and -shm files the database file's mode.
        let databasePath = absolute + "/db.sqlite"
        let databaseFD = open(databasePath, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard databaseFD >= 0 else { throw SandboxError.system("open(\(databasePath))") }
        fchmod(databaseFD, 0o600)
        close(databaseFD)
        for suffix in ["-wal", "-shm"] { chmod(databasePath + suffix, 0o600) }
        self.database = try Database(path: databasePath)
        try migrate()
        try recoverAbandonedWork()
    }

    private func migrate() throws {
        // The common case: an existing store of this version needs no DDL.
        let existing = try? database.query("SELECT value FROM meta WHERE key = 'schema'").first?["value"].string
        if existing == String(Store.schemaVersion) { return }
        if let existing, let number = Int(existing), number > Store.schemaVersion {
            throw SandboxError(
                .unsupported,
                "the store at \(root) has schema version \(number), this build reads \(Store.schemaVersion); use a newer contree-pipeline or another CONTREE_HOME"
            )
        }
        // Every statement is idempotent, so older stores are brought up to date by running all.
        try database.execute(
            """
            CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS layers(
                digest TEXT PRIMARY KEY, size INTEGER NOT NULL, files INTEGER NOT NULL,
                entries INTEGER NOT NULL, created REAL NOT NULL, archive_format INTEGER);
            CREATE TABLE IF NOT EXISTS images(
                uuid TEXT PRIMARY KEY, parent TEXT, config TEXT NOT NULL, size INTEGER NOT NULL,
                created REAL NOT NULL, origin TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS images_parent ON images(parent);
            CREATE INDEX IF NOT EXISTS images_created ON images(created);
            CREATE TABLE IF NOT EXISTS image_layers(
                image TEXT NOT NULL REFERENCES images(uuid) ON DELETE CASCADE,
                position INTEGER NOT NULL,
                layer TEXT NOT NULL REFERENCES layers(digest),
                PRIMARY KEY(image, position));
            CREATE INDEX IF NOT EXISTS image_layers_layer ON image_layers(layer);
            CREATE TABLE IF NOT EXISTS tags(
                name TEXT PRIMARY KEY, image TEXT NOT NULL REFERENCES images(uuid), updated REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS tags_image ON tags(image);
            CREATE TABLE IF NOT EXISTS runs(
                id TEXT PRIMARY KEY, image TEXT NOT NULL, result_image TEXT, started REAL NOT NULL,
                record TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS runs_started ON runs(started);
            CREATE TABLE IF NOT EXISTS leases(
                id TEXT PRIMARY KEY, pid INTEGER NOT NULL, layers TEXT NOT NULL, created REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS pins(
                owner TEXT NOT NULL, image TEXT NOT NULL REFERENCES images(uuid) ON DELETE CASCADE,
                created REAL NOT NULL, PRIMARY KEY(owner, image));
            CREATE INDEX IF NOT EXISTS pins_image ON pins(image);
            CREATE TABLE IF NOT EXISTS image_states(
                image TEXT PRIMARY KEY REFERENCES images(uuid) ON DELETE CASCADE, digest TEXT NOT NULL,
                base TEXT NOT NULL, kind TEXT NOT NULL, metadata TEXT NOT NULL, bytes INTEGER NOT NULL, created REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS image_states_digest ON image_states(digest);
            """)
        try database.transaction { tx in
            // Version 3: which archiver named a layer (NULL: one from before names were archived
            // as bytes, whose directory may hold what its digest does not cover).
            let columns = try tx.query("PRAGMA table_info(layers)").compactMap { $0["name"].string }
            if !columns.contains("archive_format") {
                try tx.query("ALTER TABLE layers ADD COLUMN archive_format INTEGER")
            }
            try tx.query(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('schema', ?)", [.text(String(Store.schemaVersion))])
        }
    }

    /// Runs `body` holding `store.lock` (shared for commits, exclusive for gc).
    func withStoreLock<T>(exclusive: Bool, _ body: () throws -> T) throws -> T {
        try FileSystem.withLock(lockPath, exclusive: exclusive, body)
    }

    /// The physical directory of a layer.
    public func layerPath(_ digest: String) -> String {
        layersPath + "/" + Store.hex(digest)
    }

    package static func hex(_ digest: String) -> String {
        digest.hasPrefix("sha256:") ? String(digest.dropFirst(7)) : digest
    }

    static var now: Double { Date().timeIntervalSince1970 }
}
