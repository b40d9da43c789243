import ContreeTestSupport
import Foundation
import Glibc
import SystemSupport
import Testing

@testable import Pipeline

/// An OTLP/HTTP receiver on loopback that decodes with the OpenTelemetry protobuf definitions
/// (Tests/Fixtures/otlp-receiver.py in the venv scripts/test-venv makes).
final class OTLPReceiver: Sendable {
    static let python = Repository.root + "/.build/test-venv/bin/python"
    let directory: String
    let port: Int
    let pid: pid_t

    init() throws {
        directory = "/tmp/contree-otlp-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let spawned = try ChildProcess.spawn(
            [OTLPReceiver.python, Repository.root + "/Tests/Fixtures/otlp-receiver.py", directory],
            captureStdout: true)
        pid = spawned.pid
        close(spawned.stderr)
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while read(spawned.stdout!, &byte, 1) == 1, byte != UInt8(ascii: "\n") { line.append(byte) }
        close(spawned.stdout!)
        port = Int(String(decoding: line, as: UTF8.self)) ?? 0
    }

    deinit {
        kill(pid, SIGTERM)
        _ = try? ChildProcess.wait(pid, "otlp-receiver")
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// The decoded requests, in order; and the bodies it could not decode.
    func requests() throws -> (decoded: [[String: Any]], errors: [String]) {
        let names = try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
        let decoded = try names.filter { $0.hasPrefix("request-") }.map {
            try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: directory + "/" + $0)))
                as? [String: Any] ?? [:]
        }
        let errors = try names.filter { $0.hasPrefix("error-") }.map {
            try String(contentsOfFile: directory + "/" + $0, encoding: .utf8)
        }
        return (decoded, errors)
    }
}

@Suite(
    "Traces of runs (OTLP)", .requiresRoot,
    .enabled(
        if: FileManager.default.fileExists(atPath: OTLPReceiver.python), "scripts/test-venv makes the receiver's venv"))
struct TraceTests {
    static let yaml = """
        name: traced
        steps:
          - id: build
            matrix: {os: [debian]}
            run: echo built
          - id: test
            run: exit 2
        """

    /// Attribute `key` of an OTLP JSON span or resource, as the decoder wrote it.
    static func attribute(_ owner: [String: Any], _ key: String) -> [String: Any]? {
        (owner["attributes"] as? [[String: Any]])?.first { $0["key"] as? String == key }?["value"] as? [String: Any]
    }

    @Test(
        "a trace per run, a span per step with its key, cache hit, exit code, image and metrics; TRACEPARENT nests it")
    func exported() async throws {
        let receiver = try OTLPReceiver()
        #expect(receiver.port > 0)
        let w = try Workspace()
        var options = RunOptions(keepGoing: true)
        options.environment = [
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:\(receiver.port)",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-team=ci%20one",
            "OTEL_SERVICE_NAME": "ci-build",
            "TRACEPARENT": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ]
        options.version = "9.9.9-test"
        let report = try await w.run(Self.yaml, options: options)
        #expect(report.status == .failed)
        #expect(report.trace?.traceID == "0af7651916cd43dd8448eb211c80319c")
        #expect(report.trace?.error == nil, "\(report.trace?.error ?? "")")
        let again = try await w.run(options: options)

        let (decoded, errors) = try receiver.requests()
        #expect(errors.isEmpty, "\(errors)")
        #expect(decoded.count == 2)
        let first = try #require(decoded.first)
        #expect((first["headers"] as? [String: String])?["x-team"] == "ci one")
        let resourceSpans = try #require((first["resource_spans"] as? [[String: Any]])?.first)
        let resource = try #require(resourceSpans["resource"] as? [String: Any])
        #expect(Self.attribute(resource, "service.name")?["string_value"] as? String == "ci-build")
        #expect(Self.attribute(resource, "service.version")?["string_value"] as? String == "9.9.9-test")
        let scopeSpans = try #require((resourceSpans["scope_spans"] as? [[String: Any]])?.first)
        #expect((scopeSpans["scope"] as? [String: Any])?["name"] as? String == "contree-pipeline")
        let spans = try #require(scopeSpans["spans"] as? [[String: Any]])
        #expect(
            spans.map { $0["name"] as? String ?? "" } == ["pipeline traced", "build[os=debian]", "test[os=debian]"])
        // Bytes fields come back base64.
        let traceID = Data([
            0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80, 0x31, 0x9c,
        ])
        #expect(spans.allSatisfy { $0["trace_id"] as? String == traceID.base64EncodedString() })
        let root = spans[0]
        #expect(
            root["parent_span_id"] as? String
                == Data([0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]).base64EncodedString())
        #expect(spans[1]["parent_span_id"] as? String == root["span_id"] as? String)
        #expect((root["status"] as? [String: Any])?["code"] as? String == "STATUS_CODE_ERROR")

        let build = spans[1]
        #expect(
            Self.attribute(build, "contree.step.key")?["string_value"] as? String
                == report.node("build[os=debian]")?.key)
        #expect(Self.attribute(build, "contree.step.cached")?["bool_value"] as? Bool == false)
        #expect(
            Self.attribute(build, "contree.step.image")?["string_value"] as? String
                == report.node("build[os=debian]")?.resultImage)
        #expect(Self.attribute(build, "contree.matrix.os")?["string_value"] as? String == "debian")
        #expect(Self.attribute(build, "contree.step.cpu_seconds")?["double_value"] != nil)
        #expect(Self.attribute(build, "contree.step.peak_memory_bytes")?["int_value"] != nil)
        #expect((build["status"] as? [String: Any])?["code"] as? String == "STATUS_CODE_OK")
        let start = UInt64(build["start_time_unix_nano"] as? String ?? "") ?? 0
        let end = UInt64(build["end_time_unix_nano"] as? String ?? "") ?? 0
        let started = UInt64(report.node("build[os=debian]")!.started!.timeIntervalSince1970 * 1e9)
        #expect(start > 0 && end >= start && (Int64(start) - Int64(started)).magnitude < 1_000_000)
        let test = spans[2]
        #expect(Self.attribute(test, "contree.step.exit_code")?["int_value"] as? String == "2")
        let status = try #require(test["status"] as? [String: Any])
        #expect(
            status["code"] as? String == "STATUS_CODE_ERROR" && status["message"] as? String == "exited with status 2")

        // The rerun's step is a cache hit.
        let rerun = try #require(
            ((decoded[1]["resource_spans"] as? [[String: Any]])?.first?["scope_spans"] as? [[String: Any]])?.first?[
                "spans"] as? [[String: Any]])
        #expect(Self.attribute(rerun[1], "contree.step.cached")?["bool_value"] as? Bool == true)
        #expect(again.trace?.traceID == report.trace?.traceID, "TRACEPARENT names the trace")
    }

    @Test("a collector that is down, or a protocol not spoken, is a note; the run's result stands")
    func notes() async throws {
        let w = try Workspace()
        var options = RunOptions()
        options.environment = ["OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:\(freeLoopbackPort())"]
        let down = try await w.run("steps:\n  - id: a\n    run: \"true\"\n", options: options)
        #expect(down.status == .passed)
        #expect(down.trace?.error?.contains("no answer from http://127.0.0.1:") == true, "\(down.trace?.error ?? "")")
        #expect(down.notes.contains { $0.hasPrefix("traces: not exported: no answer from") })
        options.environment["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
        let grpc = try await w.run(options: options)
        #expect(grpc.status == .passed && grpc.trace == nil)
        #expect(grpc.notes.contains { $0.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported") })
        options.environment["OTEL_SDK_DISABLED"] = "true"
        #expect(try await w.run(options: options).notes.isEmpty)
    }
}
