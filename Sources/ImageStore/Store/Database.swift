import CSQLite
import Glibc
import Synchronization
import SystemSupport

/// A value bound to or read from an SQLite statement.
public enum SQLValue: Sendable, Equatable {
    case null
    case integer(Int64)
    case real(Double)
    case text(String)
    case blob([UInt8])

    public var string: String? {
        if case .text(let s) = self { return s }
        return nil
    }

    public var int: Int64? {
        switch self {
        case .integer(let v): return v
        case .real(let v): return Int64(v)
        default: return nil
        }
    }

    /// Bytes: a blob's, or a text's UTF-8.
    public var bytes: [UInt8]? {
        switch self {
        case .blob(let b): return b
        case .text(let s): return Array(s.utf8)
        default: return nil
        }
    }

    public var double: Double? {
        switch self {
        case .real(let v): return v
        case .integer(let v): return Double(v)
        default: return nil
        }
    }
}

extension SQLValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByNilLiteral {
    public init(stringLiteral value: String) { self = .text(value) }
    public init(integerLiteral value: Int64) { self = .integer(value) }
    public init(nilLiteral: ()) { self = .null }
}

extension Optional where Wrapped == String {
    public var sql: SQLValue { map { .text($0) } ?? .null }
}

/// One row of a query result, by column name.
public struct SQLRow: Sendable {
    var columns: [String: SQLValue]
    public subscript(_ name: String) -> SQLValue { columns[name] ?? .null }
}

/// A thin wrapper over one SQLite connection. The handle is guarded by a mutex; write
/// transactions use `BEGIN IMMEDIATE` so that several processes sharing the file serialize
/// cleanly (WAL mode, busy timeout).
public final class Database: Sendable {
    // The C handle is only touched while holding the mutex.
    private let handle: Mutex<OpaquePointer?>
    public let path: String

    public init(path: String) throws {
        var db: OpaquePointer?
        let flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX
        let rc = sqlite3_open_v2(path, &db, flags, nil)
        if rc != SQLITE_OK {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            sqlite3_close(db)
            throw SandboxError(
                .database, "cannot open the store database \(path): \(message); check that the directory is writable")
        }
        sqlite3_busy_timeout(db, 60_000)
        self.handle = Mutex(db)
        self.path = path
        // Switching a new database to WAL takes an exclusive lock, and SQLite answers BUSY at
        // once (no busy handler) while another connection opens the same new store: retry.
        var attempts = 0
        while true {
            do {
                try execute("PRAGMA journal_mode=WAL")
                break
            } catch let error as SandboxError where error.message.contains("locked") && attempts < 500 {
                attempts += 1
                usleep(20_000)
            }
        }
        try execute("PRAGMA synchronous=NORMAL")
        try execute("PRAGMA foreign_keys=ON")
    }

    deinit {
        handle.withLock { db in
            sqlite3_close_v2(db)
            db = nil
        }
    }

    /// Runs one or more statements that return no rows.
    public func execute(_ sql: String) throws {
        try handle.withLock { db in
            var err: UnsafeMutablePointer<CChar>?
            if sqlite3_exec(db, sql, nil, nil, &err) != SQLITE_OK {
                let message = err.map { String(cString: $0) } ?? "unknown error"
                sqlite3_free(err)
                throw SandboxError(.database, "SQLite: \(message) (in: \(sql.prefix(80)))")
            }
        }
    }

    /// Runs a query with bound parameters and returns every row.
    @discardableResult
    public func query(_ sql: String, _ bindings: [SQLValue] = []) throws -> [SQLRow] {
        try handle.withLock { db in try Database.run(db, sql, bindings) }
    }

    /// Runs `body` inside `BEGIN IMMEDIATE … COMMIT`; rolls back when it throws.
    public func transaction<T>(_ body: (Transaction) throws -> T) throws -> T {
        try handle.withLock { db in
            _ = try Database.run(db, "BEGIN IMMEDIATE", [])
            do {
                let value = try body(Transaction(db: db))
                _ = try Database.run(db, "COMMIT", [])
                return value
            } catch {
                _ = try? Database.run(db, "ROLLBACK", [])
                throw error
            }
        }
    }

    /// Statements inside a transaction (the mutex is already held).
    public struct Transaction {
        fileprivate let db: OpaquePointer?

        @discardableResult
        public func query(_ sql: String, _ bindings: [SQLValue] = []) throws -> [SQLRow] {
            try Database.run(db, sql, bindings)
        }

        public var changes: Int { Int(sqlite3_changes(db)) }

        /// Runs one or more statements that return no rows.
        public func execute(_ sql: String) throws {
            var err: UnsafeMutablePointer<CChar>?
            if sqlite3_exec(db, sql, nil, nil, &err) != SQLITE_OK {
                let message = err.map { String(cString: $0) } ?? "unknown error"
                sqlite3_free(err)
                throw SandboxError(.database, "SQLite: \(message) (in: \(sql.prefix(80)))")
            }
        }

        /// Adds a column unless `table` has it (`definition`: `NAME TYPE`).
        public func addColumn(_ table: String, _ definition: String) throws {
            let name = String(definition.prefix { $0 != " " })
            if try query("SELECT 1 FROM pragma_table_info(?) WHERE name = ?", [.text(table), .text(name)]).isEmpty {
                try query("ALTER TABLE \(table) ADD COLUMN \(definition)")
            }
        }
    }

    private static func run(_ db: OpaquePointer?, _ sql: String, _ bindings: [SQLValue]) throws -> [SQLRow] {
        var stmt: OpaquePointer?
        guard sqlite3_prepare_v2(db, sql, -1, &stmt, nil) == SQLITE_OK else {
            throw SandboxError(.database, "SQLite: \(String(cString: sqlite3_errmsg(db))) (in: \(sql.prefix(80)))")
        }
        defer { sqlite3_finalize(stmt) }
        for (i, value) in bindings.enumerated() {
            let index = Int32(i + 1)
            switch value {
            case .null: sqlite3_bind_null(stmt, index)
            case .integer(let v): sqlite3_bind_int64(stmt, index, v)
            case .real(let v): sqlite3_bind_double(stmt, index, v)
            case .text(let s):
                // With its length: a NUL inside the text is part of it (a key that held the
                // rest of a command after one was cut there once).
                _ = s.withCString { sqlite3_bind_text(stmt, index, $0, Int32(s.utf8.count), csq_transient()) }
            case .blob(let b):
                _ = b.withUnsafeBytes {
                    sqlite3_bind_blob(stmt, index, $0.baseAddress, Int32($0.count), csq_transient())
                }
            }
        }
        var rows: [SQLRow] = []
        while true {
            let rc = sqlite3_step(stmt)
            if rc == SQLITE_DONE { break }
            guard rc == SQLITE_ROW else {
                throw SandboxError(.database, "SQLite: \(String(cString: sqlite3_errmsg(db))) (in: \(sql.prefix(80)))")
            }
            var columns: [String: SQLValue] = [:]
            for c in 0..<sqlite3_column_count(stmt) {
                let name = String(cString: sqlite3_column_name(stmt, c))
                switch sqlite3_column_type(stmt, c) {
                case SQLITE_INTEGER: columns[name] = .integer(sqlite3_column_int64(stmt, c))
                case SQLITE_FLOAT: columns[name] = .real(sqlite3_column_double(stmt, c))
                case SQLITE_TEXT:
                    let bytes = UnsafeRawBufferPointer(
                        start: sqlite3_column_text(stmt, c), count: Int(sqlite3_column_bytes(stmt, c)))
                    columns[name] = .text(String(decoding: bytes, as: UTF8.self))
                case SQLITE_BLOB:
                    let n = Int(sqlite3_column_bytes(stmt, c))
                    let p = sqlite3_column_blob(stmt, c)
                    columns[name] = .blob(n > 0 && p != nil ? Array(UnsafeRawBufferPointer(start: p, count: n)) : [])
                default: columns[name] = .null
                }
            }
            rows.append(SQLRow(columns: columns))
        }
        return rows
    }
}
