import Foundation

/// Everything a run did, as `report.json` holds it.
public struct RunReport: Sendable, Codable {
    public enum Status: String, Sendable, Codable {
        case passed, failed, cancelled
    }

    /// An edge of the DAG: `to` starts from `from`'s snapshot (`kind: from`) or only waits for
    /// it (`needs`).
    public struct Edge: Sendable, Codable, Equatable {
        public var from: String
        public var to: String
        public var kind: String
    }

    public var runID: String
    public var pipeline: String
    public var file: String
    public var status: Status
    public var started: Date
    public var ended: Date
    public var outDir: String
    public var nodes: [NodeResult]
    public var edges: [Edge]
    public var jobs: Int
    /// What `--cache-to` published, when it was given.
    public var cacheExport: CacheExport?
    /// What the run itself says beside its steps (a dependency cache restored from a registry).
    public var notes: [String] = []
    /// What `--publish` tagged in a `serve` namespace.
    public var published: Publication?
    /// Where the run's OpenTelemetry trace went, when the environment names a collector.
    public var trace: TraceExport?

    /// Every step's snapshot tagged in a `serve` namespace (`run --publish NAMESPACE`), so that
    /// the ConTree clients branch from it: `tag:run/RUN/STEP`.
    public struct Publication: Sendable, Codable {
        public var namespace: String
        /// Node id -> tag.
        public var tags: [String: String]
        /// Why nothing was published, when it failed.
        public var error: String?
    }

    public var duration: Double { ended.timeIntervalSince(started) }

    /// 0 passed, 1 a step failed, 130 interrupted.
    public var exitStatus: Int32 {
        switch status {
        case .passed: return 0
        case .failed:
            // 75 only when nothing but the machinery failed: a step's own failure is 1 (a retry
            // of the whole run would not mend it).
            let failures = nodes.filter(\.failsPipeline)
            return !failures.isEmpty && failures.allSatisfy { $0.infrastructureFailure == true } ? 75 : 1
        case .cancelled: return 130
        }
    }

    public var counts: [NodeStatus: Int] {
        Dictionary(grouping: nodes, by: \.status).mapValues(\.count)
    }

    /// Passed steps reused from the cache.
    public var cachedCount: Int { nodes.filter { $0.cached && $0.status == .passed }.count }

    enum CodingKeys: String, CodingKey {
        case runID = "run_id"
        case pipeline, file, status, started, ended
        case duration
        case outDir = "out_dir"
        case nodes = "steps"
        case edges, jobs
        case cacheExport = "cache_export"
        case notes, published, trace
    }

    public init(
        runID: String, pipeline: String, file: String, status: Status, started: Date, ended: Date, outDir: String,
        nodes: [NodeResult], edges: [Edge], jobs: Int
    ) {
        self.runID = runID
        self.pipeline = pipeline
        self.file = file
        self.status = status
        self.started = started
        self.ended = ended
        self.outDir = outDir
        self.nodes = nodes
        self.edges = edges
        self.jobs = jobs
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        runID = try c.decode(String.self, forKey: .runID)
        pipeline = try c.decode(String.self, forKey: .pipeline)
        file = try c.decode(String.self, forKey: .file)
        status = try c.decode(Status.self, forKey: .status)
        started = try c.decode(Date.self, forKey: .started)
        ended = try c.decode(Date.self, forKey: .ended)
        outDir = try c.decode(String.self, forKey: .outDir)
        nodes = try c.decode([NodeResult].self, forKey: .nodes)
        edges = try c.decode([Edge].self, forKey: .edges)
        jobs = try c.decode(Int.self, forKey: .jobs)
        cacheExport = try c.decodeIfPresent(CacheExport.self, forKey: .cacheExport)
        notes = try c.decodeIfPresent([String].self, forKey: .notes) ?? []
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(runID, forKey: .runID)
        try c.encode(pipeline, forKey: .pipeline)
        try c.encode(file, forKey: .file)
        try c.encode(status, forKey: .status)
        try c.encode(started, forKey: .started)
        try c.encode(ended, forKey: .ended)
        try c.encode(duration, forKey: .duration)
        try c.encode(outDir, forKey: .outDir)
        try c.encode(nodes, forKey: .nodes)
        try c.encode(edges, forKey: .edges)
        try c.encode(jobs, forKey: .jobs)
        try c.encodeIfPresent(cacheExport, forKey: .cacheExport)
        if !notes.isEmpty { try c.encode(notes, forKey: .notes) }
    }

    static func edges(of plan: PipelinePlan) -> [Edge] {
        var result: [Edge] = []
        for node in plan.nodes {
            let parent: String? = { if case .node(let p) = node.parent { return p } else { return nil } }()
            let copied = Set(node.copies.flatMap(\.sources))
            for dependency in node.dependencies {
                let kind =
                    dependency == parent || node.kind == .select
                    ? "from" : copied.contains(dependency) ? "copy" : "needs"
                result.append(Edge(from: dependency, to: node.id, kind: kind))
            }
        }
        return result
    }
}
