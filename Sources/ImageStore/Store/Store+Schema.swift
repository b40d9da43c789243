import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A migration: takes a module's tables from one version to the next, inside a transaction.
public typealias SchemaMigration = @Sendable (Database.Transaction) throws -> Void

extension Store {
    /// Brings a module's own tables in this store's database up to date. `migrations[i]` takes
    /// the module's schema from version i to i+1; each runs once, in the transaction that
    /// records the version it reached (`meta` key `schema.MODULE`). Modules own their tables
    /// this way; none writes another's.
    /// - Throws: `unsupported` when a newer build wrote the module's tables.
    public func migrate(_ module: String, _ migrations: [SchemaMigration]) throws {
        let key = "schema." + module
        func version(_ rows: [SQLRow]) -> Int { rows.first?["value"].string.flatMap { Int($0) } ?? 0 }
        func refuse(_ found: Int) -> SandboxError {
            SandboxError(
                .unsupported,
                "the store at \(root) holds \(module) tables of version \(found), this build knows \(migrations.count); use a newer contree-pipeline or another CONTREE_HOME"
            )
        }
        // The common case needs no write lock: the tables are up to date.
        let current = version(try database.query("SELECT value FROM meta WHERE key = ?", [.text(key)]))
        if current == migrations.count { return }
        guard current < migrations.count else { throw refuse(current) }
        try database.transaction { tx in
            var reached = version(try tx.query("SELECT value FROM meta WHERE key = ?", [.text(key)]))
            guard reached <= migrations.count else { throw refuse(reached) }
            while reached < migrations.count {
                try migrations[reached](tx)
                reached += 1
            }
            try tx.query("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", [.text(key), .text(String(reached))])
        }
    }
}
