import Foundation
import ImageStore
import Sandbox
import SystemSupport

/// A cache entry: what a successful step produced.
public struct CachedStep: Sendable {
    public var key: String
    public var resultImage: String
    public var outputs: [String: String]
    public var record: RunRecord?
    /// The step's log when it ran (its last `StepCache.logLimit` bytes), replayed on a hit.
    public var log: [UInt8]? = nil
}

/// A past pipeline run.
public struct PipelineRunSummary: Sendable, Codable {
    public var id: String
    public var pipeline: String
    public var file: String
    public var started: Date
    public var ended: Date?
    public var status: String
    public var outDir: String

    enum CodingKeys: String, CodingKey {
        case id, pipeline, file, started, ended, status
        case outDir = "out_dir"
    }
}

/// One node of a past run.
public struct PipelineStepRow: Sendable, Codable {
    public var node: String
    public var step: String
    public var status: String
    public var cached: Bool
    public var key: String?
    public var components: StepKeyComponents?
    public var parentImage: String?
    public var resultImage: String?
    public var outputs: [String: String] = [:]
    /// What running it cost (absent for hits): for `plan`'s estimate of a miss.
    public var wallSeconds: Double?
    public var peakMemoryBytes: Int64?
}

/// The pipeline tables in the store's database: the step cache (key -> snapshot and outputs),
/// score results, and the history of runs and their steps (for `runs`, `explain`, `shell`).
public struct StepCache: Sendable {
    public let store: Store
    static let owner = "pipeline-step-cache"

    public init(store: Store) throws {
        self.store = store
        try store.migrate("pipeline", StepCache.migrations)
    }

    /// The pipeline tables, version by version (see `Store.migrate`). Stores made before the
    /// tables had versions ran the statements of version 1 piecemeal: each is idempotent.
    static let migrations: [SchemaMigration] = [
        { tx in
            try tx.execute(
                """
                CREATE TABLE IF NOT EXISTS step_cache(
                    key TEXT PRIMARY KEY, result_image TEXT NOT NULL, outputs TEXT NOT NULL, record TEXT,
                    components TEXT NOT NULL, created REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS score_cache(key TEXT PRIMARY KEY, score TEXT NOT NULL, created REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS pipeline_runs(
                    id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, file TEXT NOT NULL, started REAL NOT NULL,
                    ended REAL, status TEXT NOT NULL, out_dir TEXT NOT NULL);
                CREATE INDEX IF NOT EXISTS pipeline_runs_started ON pipeline_runs(started);
                CREATE TABLE IF NOT EXISTS pipeline_steps(
                    run_id TEXT NOT NULL, node TEXT NOT NULL, step TEXT NOT NULL, pipeline TEXT NOT NULL,
                    key TEXT, components TEXT, status TEXT NOT NULL, cached INTEGER NOT NULL,
                    parent_image TEXT, result_image TEXT, ended REAL NOT NULL, PRIMARY KEY(run_id, node));
                CREATE INDEX IF NOT EXISTS pipeline_steps_history ON pipeline_steps(pipeline, node, ended);
                """)
            try tx.addColumn("pipeline_steps", "outputs TEXT")
        },
        // 2: the history kept by file as well as name; cache entries keep their step's log;
        // where artifacts were last copied (a rerun links them).
        { tx in
            try tx.addColumn("pipeline_steps", "file TEXT")
            try tx.addColumn("step_cache", "log BLOB")
            try tx.execute(
                """
                CREATE INDEX IF NOT EXISTS pipeline_steps_file ON pipeline_steps(file, pipeline, node, ended);
                CREATE INDEX IF NOT EXISTS pipeline_steps_key ON pipeline_steps(key);
                CREATE TABLE IF NOT EXISTS artifact_copies(
                    image TEXT NOT NULL, path TEXT NOT NULL, file TEXT NOT NULL, sha256 TEXT NOT NULL,
                    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, device INTEGER NOT NULL,
                    inode INTEGER NOT NULL, PRIMARY KEY(image, path));
                """)
        },
        // 3: what each executed step cost, for `plan`.
        { tx in
            try tx.addColumn("pipeline_steps", "wall_seconds REAL")
            try tx.addColumn("pipeline_steps", "peak_memory INTEGER")
        },
    ]

    /// The most of a step's log kept with its cache entry: its end, where a failure or the
    /// result shows.
    public static let logLimit = 1 << 20

    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        e.dateEncodingStrategy = .iso8601
        return e
    }()
    static let decoder: JSONDecoder = {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return d
    }()

    func json<T: Encodable>(_ value: T) -> String {
        String(decoding: (try? StepCache.encoder.encode(value)) ?? Data(), as: UTF8.self)
    }

    func decode<T: Decodable>(_ type: T.Type, _ text: String?) -> T? {
        guard let text else { return nil }
        return try? StepCache.decoder.decode(type, from: Data(text.utf8))
    }

    /// The entry for `key` if its snapshot still exists.
    public func lookup(_ key: String) throws -> CachedStep? {
        guard
            let row = try store.database.query(
                "SELECT result_image, outputs, record, log FROM step_cache WHERE key = ?", [.text(key)]
            ).first, let image = row["result_image"].string, try store.hasImage(image)
        else { return nil }
        return CachedStep(
            key: key, resultImage: image, outputs: decode([String: String].self, row["outputs"].string) ?? [:],
            record: decode(RunRecord.self, row["record"].string), log: row["log"].bytes)
    }

    /// The latest row of `node` of the pipeline `pipeline` in `file` that passed: its snapshot
    /// and outputs.
    public func lastPassedRow(pipeline: String, file: String, node: String) throws -> PipelineStepRow? {
        try store.database.query(
            "SELECT * FROM pipeline_steps WHERE file = ? AND pipeline = ? AND node = ? AND status = 'passed' ORDER BY ended DESC LIMIT 1",
            [.text(file), .text(pipeline), .text(node)]
        ).first.map {
            PipelineStepRow(
                node: $0["node"].string ?? "", step: $0["step"].string ?? "", status: $0["status"].string ?? "",
                cached: $0["cached"].int == 1, key: $0["key"].string,
                components: decode(StepKeyComponents.self, $0["components"].string),
                parentImage: $0["parent_image"].string, resultImage: $0["result_image"].string,
                outputs: decode([String: String].self, $0["outputs"].string) ?? [:])
        }
    }

    /// Remembers a successful step (and pins its snapshot against pruning).
    public func remember(
        key: String, components: StepKeyComponents, resultImage: String, outputs: [String: String], record: RunRecord?,
        log: [UInt8]? = nil
    ) throws {
        try store.database.query(
            "INSERT OR REPLACE INTO step_cache(key, result_image, outputs, record, components, created, log) VALUES(?, ?, ?, ?, ?, ?, ?)",
            [
                .text(key), .text(resultImage), .text(json(outputs)), record.map { .text(json($0)) } ?? .null,
                .text(json(components)), .real(Date().timeIntervalSince1970),
                log.map { .blob(Array($0.suffix(StepCache.logLimit))) } ?? .null,
            ])
        try store.pin(resultImage, owner: StepCache.owner)
    }

    /// The file an artifact of `image` was last copied to, as it was then.
    func artifactCopy(image: String, path: String) throws -> ArtifactCopy? {
        try store.database.query(
            "SELECT * FROM artifact_copies WHERE image = ? AND path = ?", [.text(image), .text(path)]
        ).first.map {
            ArtifactCopy(
                file: $0["file"].string ?? "", sha256: $0["sha256"].string ?? "", size: $0["size"].int ?? -1,
                mtimeNanoseconds: $0["mtime_ns"].int ?? -1, device: $0["device"].int ?? -1, inode: $0["inode"].int ?? -1
            )
        }
    }

    func rememberArtifactCopy(image: String, path: String, _ copy: ArtifactCopy) throws {
        try store.database.query(
            "INSERT OR REPLACE INTO artifact_copies(image, path, file, sha256, size, mtime_ns, device, inode) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
            [
                .text(image), .text(path), .text(copy.file), .text(copy.sha256), .integer(copy.size),
                .integer(copy.mtimeNanoseconds), .integer(copy.device), .integer(copy.inode),
            ])
    }

    /// Drops cache entries (and scores) made before `cutoff` and unpins their snapshots; the
    /// snapshots nothing else keeps are removed (their layers go with the next `gc`).
    /// - Returns: the entries dropped and the snapshots removed.
    public func prune(createdBefore cutoff: Date) throws -> (entries: Int, scores: Int, images: Int) {
        let time = SQLValue.real(cutoff.timeIntervalSince1970)
        let (entries, scores, dropped) = try store.database.transaction { tx -> (Int, Int, Set<String>) in
            let old = Set(
                try tx.query("SELECT result_image FROM step_cache WHERE created < ?", [time]).compactMap {
                    $0["result_image"].string
                })
            try tx.query("DELETE FROM step_cache WHERE created < ?", [time])
            let entries = tx.changes
            try tx.query("DELETE FROM score_cache WHERE created < ?", [time])
            let scores = tx.changes
            var dropped = Set<String>()
            for image in old
            where try tx.query("SELECT 1 FROM step_cache WHERE result_image = ?", [.text(image)]).isEmpty {
                try store.unpin(tx, image, owner: StepCache.owner)
                try tx.query("DELETE FROM artifact_copies WHERE image = ?", [.text(image)])
                dropped.insert(image)
            }
            return (entries, scores, dropped)
        }
        return (entries, scores, try store.removeUnreferenced(dropped))
    }

    /// Forgets past runs: all but the newest `keep` of each pipeline (file and name), and those
    /// that started before `startedBefore`. A run that has not ended and began in the last day
    /// may still be going: it stays.
    /// - Returns: the runs forgotten; removing their folders is the caller's choice.
    public func forgetRuns(keep: Int?, startedBefore: Date?) throws -> [PipelineRunSummary] {
        let runs = try store.database.query("SELECT * FROM pipeline_runs ORDER BY started DESC").map(summary)
        var seen: [String: Int] = [:]
        let recent = Date().addingTimeInterval(-86_400)
        let doomed = runs.filter { run in
            let rank = seen[run.file + "\n" + run.pipeline, default: 0]
            seen[run.file + "\n" + run.pipeline] = rank + 1
            if run.ended == nil && run.started > recent { return false }
            return (keep.map { rank >= $0 } ?? false) || (startedBefore.map { run.started < $0 } ?? false)
        }
        try store.database.transaction { tx in
            for run in doomed {
                try tx.query("DELETE FROM pipeline_steps WHERE run_id = ?", [.text(run.id)])
                try tx.query("DELETE FROM pipeline_runs WHERE id = ?", [.text(run.id)])
            }
        }
        return doomed
    }

    public func score(_ key: String) throws -> String? {
        try store.database.query("SELECT score FROM score_cache WHERE key = ?", [.text(key)]).first?["score"].string
    }

    public func rememberScore(_ key: String, _ score: String) throws {
        try store.database.query(
            "INSERT OR REPLACE INTO score_cache(key, score, created) VALUES(?, ?, ?)",
            [.text(key), .text(score), .real(Date().timeIntervalSince1970)])
    }

    // MARK: History

    /// Records a run that began at `started` (building its base image included).
    public func beginRun(id: String, pipeline: String, file: String, started: Date, outDir: String) throws {
        try store.database.query(
            "INSERT INTO pipeline_runs(id, pipeline, file, started, status, out_dir) VALUES(?, ?, ?, ?, 'running', ?)",
            [.text(id), .text(pipeline), .text(file), .real(started.timeIntervalSince1970), .text(outDir)])
    }

    public func finishRun(id: String, status: String) throws {
        try store.database.query(
            "UPDATE pipeline_runs SET ended = ?, status = ? WHERE id = ?",
            [.real(Date().timeIntervalSince1970), .text(status), .text(id)])
    }

    public func recordStep(runID: String, pipeline: String, file: String, row: PipelineStepRow) throws {
        try store.database.query(
            """
            INSERT OR REPLACE INTO pipeline_steps(run_id, node, step, pipeline, file, key, components, status, cached,
                parent_image, result_image, ended, outputs, wall_seconds, peak_memory)
                VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            [
                .text(runID), .text(row.node), .text(row.step), .text(pipeline), .text(file), row.key.sql,
                row.components.map { .text(json($0)) } ?? .null, .text(row.status), .integer(row.cached ? 1 : 0),
                row.parentImage.sql, row.resultImage.sql, .real(Date().timeIntervalSince1970), .text(json(row.outputs)),
                row.wallSeconds.map { .real($0) } ?? .null, row.peakMemoryBytes.map { .integer($0) } ?? .null,
            ])
    }

    /// What `node` cost the last time it ran (not a hit): wall seconds and peak memory.
    public func lastCost(
        pipeline: String, file: String, node: String
    ) throws -> (
        wallSeconds: Double, peakMemoryBytes: Int64?
    )? {
        guard
            let row = try store.database.query(
                """
                SELECT wall_seconds, peak_memory FROM pipeline_steps WHERE file = ? AND pipeline = ? AND node = ?
                  AND cached = 0 AND wall_seconds IS NOT NULL ORDER BY ended DESC LIMIT 1
                """, [.text(file), .text(pipeline), .text(node)]
            ).first, let wall = row["wall_seconds"].double
        else { return nil }
        return (wall, row["peak_memory"].int)
    }

    /// The latest recorded attempt of `node` (any status) with its components: after a failed
    /// run and a fix, what changed since the failure.
    public func lastRecorded(
        pipeline: String, file: String, node: String
    ) throws -> (
        components: StepKeyComponents, runID: String, status: String
    )? {
        guard
            let row = try store.database.query(
                """
                SELECT components, run_id, status FROM pipeline_steps WHERE file = ? AND pipeline = ? AND node = ?
                  AND components IS NOT NULL ORDER BY ended DESC LIMIT 1
                """, [.text(file), .text(pipeline), .text(node)]
            ).first, let components = decode(StepKeyComponents.self, row["components"].string),
            let run = row["run_id"].string
        else { return nil }
        return (components, run, row["status"].string ?? "")
    }

    /// The run in which a step with `key` last failed, if it did: a fork variant that fails by
    /// design is a known outcome, not a cache miss.
    public func lastFailure(key: String) throws -> String? {
        try store.database.query(
            "SELECT run_id FROM pipeline_steps WHERE key = ? AND status = 'failed' ORDER BY ended DESC LIMIT 1",
            [.text(key)]
        ).first?["run_id"].string
    }

    /// The components of the latest run of `node` that passed (from the cache or not).
    public func lastPassed(
        pipeline: String, file: String, node: String
    ) throws -> (
        components: StepKeyComponents, runID: String
    )? {
        guard
            let row = try store.database.query(
                """
                SELECT components, run_id FROM pipeline_steps WHERE file = ? AND pipeline = ? AND node = ?
                  AND status = 'passed' AND components IS NOT NULL ORDER BY ended DESC LIMIT 1
                """, [.text(file), .text(pipeline), .text(node)]
            ).first, let components = decode(StepKeyComponents.self, row["components"].string),
            let run = row["run_id"].string
        else { return nil }
        return (components, run)
    }

    public func runs(limit: Int = 50) throws -> [PipelineRunSummary] {
        try store.database.query(
            "SELECT * FROM pipeline_runs ORDER BY started DESC LIMIT ?", [.integer(Int64(limit))]
        ).map(summary)
    }

    /// The run with this id, or the one run whose id starts with it.
    /// - Throws: `SandboxError.invalidArgument` when several runs start with it.
    public func run(_ idOrPrefix: String) throws -> PipelineRunSummary? {
        if let exact = try store.database.query("SELECT * FROM pipeline_runs WHERE id = ?", [.text(idOrPrefix)]).first {
            return summary(exact)
        }
        // substr, not LIKE: a prefix holding % or _ means itself.
        let rows = try store.database.query(
            "SELECT * FROM pipeline_runs WHERE substr(id, 1, ?) = ? ORDER BY started DESC LIMIT 6",
            [.integer(Int64(idOrPrefix.utf8.count)), .text(idOrPrefix)])
        guard rows.count <= 1 else {
            let ids = rows.prefix(5).compactMap { $0["id"].string }
            throw SandboxError(
                .invalidArgument,
                "run id '\(idOrPrefix)' is ambiguous: \(rows.count > 5 ? "more than 5" : String(rows.count)) runs start with it (\(ids.joined(separator: ", "))\(rows.count > 5 ? ", …" : "")); give more of it"
            )
        }
        return rows.first.map(summary)
    }

    /// The latest run of the pipeline `pipeline` in `file` (an absolute path).
    public func lastRun(pipeline: String, file: String) throws -> PipelineRunSummary? {
        try store.database.query(
            "SELECT * FROM pipeline_runs WHERE file = ? AND pipeline = ? ORDER BY started DESC LIMIT 1",
            [.text(file), .text(pipeline)]
        ).first.map(summary)
    }

    public func steps(of runID: String) throws -> [PipelineStepRow] {
        try store.database.query("SELECT * FROM pipeline_steps WHERE run_id = ? ORDER BY ended", [.text(runID)]).map {
            PipelineStepRow(
                node: $0["node"].string ?? "", step: $0["step"].string ?? "", status: $0["status"].string ?? "",
                cached: $0["cached"].int == 1, key: $0["key"].string,
                components: decode(StepKeyComponents.self, $0["components"].string),
                parentImage: $0["parent_image"].string, resultImage: $0["result_image"].string,
                outputs: decode([String: String].self, $0["outputs"].string) ?? [:])
        }
    }

    private func summary(_ row: SQLRow) -> PipelineRunSummary {
        PipelineRunSummary(
            id: row["id"].string ?? "", pipeline: row["pipeline"].string ?? "", file: row["file"].string ?? "",
            started: Date(timeIntervalSince1970: row["started"].double ?? 0),
            ended: row["ended"].double.map { Date(timeIntervalSince1970: $0) }, status: row["status"].string ?? "",
            outDir: row["out_dir"].string ?? "")
    }
}

/// An artifact file a run wrote, as it was when written: unchanged (same size, time, device
/// and inode), it can stand for the same artifact of a later run.
struct ArtifactCopy: Sendable {
    var file: String
    var sha256: String
    var size: Int64
    var mtimeNanoseconds: Int64
    var device: Int64
    var inode: Int64
}

extension ArtifactCopy {
    init(file: String, sha256: String, status: stat) {
        self.init(
            file: file, sha256: sha256, size: Int64(status.st_size),
            mtimeNanoseconds: Int64(status.st_mtim.tv_sec) * 1_000_000_000 + Int64(status.st_mtim.tv_nsec),
            device: Int64(bitPattern: UInt64(status.st_dev)), inode: Int64(bitPattern: UInt64(status.st_ino)))
    }

    /// Whether `status` (an lstat of `file` now) is the file as it was written.
    func isUnchanged(_ status: stat) -> Bool {
        let now = ArtifactCopy(file: file, sha256: sha256, status: status)
        return (status.st_mode & S_IFMT) == S_IFREG && now.size == size && now.mtimeNanoseconds == mtimeNanoseconds
            && now.device == device && now.inode == inode
    }
}
