import Foundation
import SystemSupport
import Telemetry

/// Where a run's trace went (`OTEL_EXPORTER_OTLP_ENDPOINT`): its id, and why it did not arrive.
public struct TraceExport: Sendable, Codable {
    /// 32 hex digits: find the run in the tracing backend by it.
    public var traceID: String
    public var endpoint: String
    public var spans: Int
    public var error: String?

    enum CodingKeys: String, CodingKey {
        case traceID = "trace_id"
        case endpoint, spans, error
    }
}

extension RunReport {
    /// The run as spans: one for the run (a child of the caller's span under `TRACEPARENT`),
    /// one per step under it, with the step's key, cache hit, exit code, images, node, CPU and
    /// peak memory as attributes, and ERROR for a step that failed the run.
    func spans(traceID: [UInt8], parentSpanID: [UInt8]?) -> [TraceSpan] {
        let root = TraceSpan.newSpanID()
        var spans = [
            TraceSpan(
                traceID: traceID, spanID: root, parentSpanID: parentSpanID, name: "pipeline \(pipeline)",
                start: started,
                end: ended,
                attributes: [
                    ("contree.run.id", .string(runID)), ("contree.pipeline.name", .string(pipeline)),
                    ("contree.pipeline.file", .string(file)), ("contree.run.status", .string(status.rawValue)),
                    ("contree.run.steps", .int(Int64(nodes.count))), ("contree.run.cached", .int(Int64(cachedCount))),
                    ("contree.run.jobs", .int(Int64(jobs))),
                ],
                status: status == .passed ? .ok : status == .failed ? .error("the pipeline failed") : .unset)
        ]
        for node in nodes {
            var attributes: [(String, AttributeValue)] = [
                ("contree.step.id", .string(node.step)), ("contree.step.node", .string(node.node)),
                ("contree.step.status", .string(node.status.rawValue)), ("contree.step.cached", .bool(node.cached)),
                ("contree.step.attempts", .int(Int64(node.attempts))),
            ]
            if let key = node.key { attributes.append(("contree.step.key", .string(key))) }
            if let code = node.exitCode { attributes.append(("contree.step.exit_code", .int(Int64(code)))) }
            if let image = node.resultImage { attributes.append(("contree.step.image", .string(image))) }
            if let image = node.parentImage { attributes.append(("contree.step.parent_image", .string(image))) }
            if let machine = node.executorNode { attributes.append(("contree.step.executor_node", .string(machine))) }
            if let job = node.slurmJobID { attributes.append(("contree.step.slurm_job_id", .string(job))) }
            if let m = node.metrics, !node.cached {
                attributes.append(("contree.step.cpu_seconds", .double(m.cpuUserSeconds + m.cpuSystemSeconds)))
                attributes.append(("contree.step.peak_memory_bytes", .int(m.peakMemoryBytes)))
                attributes.append(("contree.step.bytes_written", .int(m.bytesWritten)))
            }
            if let tests = node.tests {
                attributes.append(("contree.step.tests", .int(Int64(tests.total))))
                attributes.append(("contree.step.tests_failed", .int(Int64(tests.failed + tests.errors))))
            }
            for (name, value) in node.matrix.sorted(by: { $0.key < $1.key }) {
                attributes.append(("contree.matrix.\(name)", .string(value)))
            }
            let status: TraceSpan.Status =
                node.failsPipeline
                ? .error(node.reason ?? "failed") : node.status == .passed ? .ok : .unset
            // A step that never started (skipped, cancelled before it ran) is an instant at the end.
            let start = node.started ?? node.ended ?? ended
            spans.append(
                TraceSpan(
                    traceID: traceID, spanID: TraceSpan.newSpanID(), parentSpanID: root, name: node.node, start: start,
                    end: node.ended ?? start, attributes: attributes, status: status))
        }
        return spans
    }
}

extension PipelineRunner {
    /// Sends the run's trace where the OpenTelemetry environment says (nothing when it names
    /// no endpoint). A collector that is down or refuses is a note, never a failure.
    func exportTrace(_ report: RunReport) async -> TraceExport? {
        let configuration: OTLPConfiguration?
        do {
            configuration = try OTLPConfiguration.from(
                environment: options.environment, serviceVersion: options.version)
        } catch {
            notes.withLock { $0.append("traces: \(error)") }
            return nil
        }
        guard let configuration else { return nil }
        let traceID = configuration.parent?.traceID ?? TraceSpan.newTraceID()
        let spans = report.spans(traceID: traceID, parentSpanID: configuration.parent?.spanID)
        var export = TraceExport(
            traceID: Hex.encode(traceID),
            endpoint: configuration.endpoint.absoluteString,
            spans: spans.count)
        do {
            try await OTLPExporter.export(
                spans, configuration: configuration, scope: (name: "contree-pipeline", version: options.version))
        } catch {
            export.error = "\(error)"
            notes.withLock { $0.append("traces: not exported: \(error)") }
        }
        return export
    }
}
