import FoundationEssentials
import HTTPTypes
import Hummingbird
import ImageStore

/// `serve --metrics`: `GET /metrics` in the Prometheus text format (0.0.4), computed at each
/// scrape from the store's tables, so it survives restarts and counts every operation: what
/// the operations did by status, instance durations, CPU and peak memory as histograms, images
/// and store bytes, and the queue per namespace.
public struct MetricsOptions: Sendable {
    /// A scraper must send `Authorization: Bearer TOKEN`; nil: none (only on loopback).
    public var token: String?
    /// Reported as `contree_build_info{version=...}`.
    public var version: String

    public init(token: String?, version: String) {
        self.token = token
        self.version = version
    }
}

struct MetricsEndpoint: Sendable {
    let options: MetricsOptions
    let api: APIStore
    let namespaces: [String]

    static let durationBuckets: [Double] = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200]
    static let cpuBuckets: [Double] = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800]
    static let memoryBuckets: [Double] = [1, 4, 16, 64, 256, 1024, 4096, 16384].map { $0 * 1_048_576 }

    func respond(_ request: Request) throws -> Response {
        if let token = options.token {
            let given = request.headers[.authorization] ?? ""
            guard Self.constantTimeEquals(given, "Bearer " + token) else {
                var headers = HTTPFields()
                headers[.wwwAuthenticate] = "Bearer realm=\"contree metrics\""
                headers[.contentType] = "text/plain; charset=utf-8"
                return Response(
                    status: .unauthorized, headers: headers,
                    body: .init(
                        byteBuffer: ByteBuffer(
                            string: "/metrics needs Authorization: Bearer <the token serve --metrics-token set>\n")))
            }
        }
        var headers = HTTPFields()
        headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: try render())))
    }

    static func constantTimeEquals(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8)
        let y = Array(b.utf8)
        guard x.count == y.count else { return false }
        return zip(x, y).reduce(0) { $0 | ($1.0 ^ $1.1) } == 0
    }

    func render() throws -> String {
        var out = MetricsText()
        let db = api.database
        out.family("contree_build_info", "gauge", "The serving binary's version.")
        out.sample("contree_build_info", ["version": options.version], 1)

        // A gauge: an operation moves from PENDING to EXECUTING to its end.
        out.family(
            "contree_operations", "gauge", "Operations the store records, by namespace, kind and status now.")
        for row in try db.query(
            "SELECT namespace, kind, status, COUNT(*) AS n FROM api_operations GROUP BY namespace, kind, status")
        {
            out.sample(
                "contree_operations",
                [
                    "namespace": row["namespace"].string ?? "", "kind": row["kind"].string ?? "",
                    "status": row["status"].string ?? "",
                ], Double(row["n"].int ?? 0))
        }
        let waiting = try counts(
            "SELECT namespace, COUNT(*) AS n FROM api_operations WHERE status = 'PENDING' GROUP BY namespace")
        let running = try counts(
            "SELECT namespace, COUNT(*) AS n FROM api_operations WHERE status = 'EXECUTING' AND kind = 'instance' GROUP BY namespace"
        )
        out.family("contree_queue_depth", "gauge", "Operations waiting to start, per namespace.")
        for namespace in namespaces {
            out.sample("contree_queue_depth", ["namespace": namespace], waiting[namespace] ?? 0)
        }
        out.family("contree_instances_running", "gauge", "Instances running now, per namespace.")
        for namespace in namespaces {
            out.sample("contree_instances_running", ["namespace": namespace], running[namespace] ?? 0)
        }

        // Finished instances: wall time, CPU, peak memory, counted per bucket by SQLite (a
        // scrape costs one pass over the table, not a copy of it).
        for (name, help, value, bounds) in [
            (
                "contree_instance_duration_seconds", "Wall time of finished instances.", "MAX(0, ended - started)",
                Self.durationBuckets
            ),
            (
                "contree_instance_cpu_seconds", "CPU time (user and system) of finished instances.", "cpu",
                Self.cpuBuckets
            ),
            ("contree_instance_peak_memory_bytes", "Peak memory of finished instances.", "memory", Self.memoryBuckets),
        ] {
            let columns = bounds.enumerated().map { "SUM(CASE WHEN \(value) <= \($1) THEN 1 ELSE 0 END) AS b\($0)" }
            var histograms: [String: (buckets: [Double], sum: Double, count: Double)] = [:]
            for row in try db.query(
                "SELECT namespace, COUNT(*) AS n, COALESCE(SUM(\(value)), 0) AS total, \(columns.joined(separator: ", ")) FROM api_operations WHERE kind = 'instance' AND ended IS NOT NULL AND started IS NOT NULL GROUP BY namespace"
            ) {
                histograms[row["namespace"].string ?? ""] = (
                    bounds.indices.map { Double(row["b\($0)"].int ?? 0) },
                    row["total"].double ?? Double(row["total"].int ?? 0), Double(row["n"].int ?? 0)
                )
            }
            out.histogram(name, help, histograms, bounds, namespaces: namespaces)
        }

        let images = try counts("SELECT namespace, COUNT(*) AS n FROM api_images GROUP BY namespace")
        out.family("contree_namespace_images", "gauge", "Images a namespace holds (its runs' results, imports, tags).")
        for namespace in namespaces {
            out.sample("contree_namespace_images", ["namespace": namespace], images[namespace] ?? 0)
        }
        let uploads = try counts("SELECT namespace, SUM(size) AS n FROM api_files GROUP BY namespace")
        out.family("contree_namespace_upload_bytes", "gauge", "Bytes of files a namespace uploaded.")
        for namespace in namespaces {
            out.sample("contree_namespace_upload_bytes", ["namespace": namespace], uploads[namespace] ?? 0)
        }
        let store = try db.query(
            "SELECT (SELECT COUNT(*) FROM images) AS images, (SELECT COUNT(*) FROM layers) AS layers, (SELECT COALESCE(SUM(size), 0) FROM layers) AS bytes"
        ).first
        out.family("contree_store_images", "gauge", "Images in the store (every namespace, pipelines, built-ins).")
        out.sample("contree_store_images", [:], Double(store?["images"].int ?? 0))
        out.family("contree_store_layers", "gauge", "Layers in the store.")
        out.sample("contree_store_layers", [:], Double(store?["layers"].int ?? 0))
        out.family("contree_store_bytes", "gauge", "Bytes of file content in the store's layers (each layer once).")
        out.sample("contree_store_bytes", [:], Double(store?["bytes"].int ?? 0))
        return out.text
    }

    private func counts(_ sql: String) throws -> [String: Double] {
        var result: [String: Double] = [:]
        for row in try api.database.query(sql) {
            result[row["namespace"].string ?? ""] = row["n"].double ?? Double(row["n"].int ?? 0)
        }
        return result
    }
}

/// The Prometheus text exposition format: `# HELP`, `# TYPE`, samples with escaped labels.
struct MetricsText {
    var text = ""

    mutating func family(_ name: String, _ type: String, _ help: String) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
    }

    mutating func sample(_ name: String, _ labels: [String: String], _ value: Double) {
        text += name
        if !labels.isEmpty {
            text +=
                "{" + labels.keys.sorted().map { "\($0)=\"\(MetricsText.escape(labels[$0]!))\"" }.joined(separator: ",")
                + "}"
        }
        text += " " + MetricsText.format(value) + "\n"
    }

    /// A histogram per namespace: cumulative `_bucket{le=...}` (counts at or below each bound),
    /// `_sum`, `_count`.
    mutating func histogram(
        _ name: String, _ help: String, _ values: [String: (buckets: [Double], sum: Double, count: Double)],
        _ bounds: [Double], namespaces: [String]
    ) {
        family(name, "histogram", help)
        for namespace in Set(namespaces).union(values.keys).sorted() {
            let seen = values[namespace] ?? (bounds.map { _ in 0 }, 0, 0)
            for (bound, count) in zip(bounds, seen.buckets) {
                sample(name + "_bucket", ["namespace": namespace, "le": MetricsText.format(bound)], count)
            }
            sample(name + "_bucket", ["namespace": namespace, "le": "+Inf"], seen.count)
            sample(name + "_sum", ["namespace": namespace], seen.sum)
            sample(name + "_count", ["namespace": namespace], seen.count)
        }
    }

    static func escape(_ value: String) -> String {
        value.replacing("\\", with: "\\\\").replacing("\"", with: "\\\"").replacing("\n", with: "\\n")
    }

    static func format(_ value: Double) -> String {
        if value == value.rounded() && abs(value) < 1e15 { return String(Int64(value)) }
        return String(value)
    }
}
