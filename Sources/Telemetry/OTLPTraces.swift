import Foundation
import HTTPClient

/// A value of a span or resource attribute (OTLP's `AnyValue`, the scalar kinds).
public enum AttributeValue: Sendable, Equatable {
    case string(String)
    case bool(Bool)
    case int(Int64)
    case double(Double)
}

/// One finished span, as OTLP carries it.
public struct TraceSpan: Sendable {
    public enum Status: Sendable, Equatable {
        case unset
        case ok
        case error(String)
    }

    public var traceID: [UInt8]
    public var spanID: [UInt8]
    public var parentSpanID: [UInt8]?
    public var name: String
    public var start: Date
    public var end: Date
    public var attributes: [(String, AttributeValue)]
    public var status: Status

    public init(
        traceID: [UInt8], spanID: [UInt8], parentSpanID: [UInt8]?, name: String, start: Date, end: Date,
        attributes: [(String, AttributeValue)], status: Status
    ) {
        self.traceID = traceID
        self.spanID = spanID
        self.parentSpanID = parentSpanID
        self.name = name
        self.start = start
        self.end = end
        self.attributes = attributes
        self.status = status
    }

    public static func newTraceID() -> [UInt8] { randomBytes(16) }
    public static func newSpanID() -> [UInt8] { randomBytes(8) }

    static func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        var bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
        if bytes.allSatisfy({ $0 == 0 }) { bytes[count - 1] = 1 }  // all zero is invalid
        return bytes
    }
}

/// Where and how traces go, from the OpenTelemetry SDK's environment variables:
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (a full URL) or `OTEL_EXPORTER_OTLP_ENDPOINT` (a base:
/// `/v1/traces` is added), `OTEL_EXPORTER_OTLP[_TRACES]_HEADERS` (`k=v,k2=v2`, percent-encoded),
/// `OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT` (milliseconds), `OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it
/// off. `TRACEPARENT` (W3C trace context, as CI systems and `otel-cli` pass it) makes the run
/// a child of the caller's span.
public struct OTLPConfiguration: Sendable {
    public var endpoint: URL
    public var headers: [(String, String)]
    public var timeout: Double
    public var resource: [(String, AttributeValue)]
    /// The caller's trace and span, from `TRACEPARENT`.
    public var parent: (traceID: [UInt8], spanID: [UInt8])?

    /// The configuration the environment asks for; nil when it asks for no traces.
    /// - Throws: `OTLPError` for a setting that cannot work (a protocol other than
    ///   http/protobuf, an endpoint that is not an http(s) URL).
    public static func from(environment env: [String: String], serviceVersion: String) throws -> OTLPConfiguration? {
        if env["OTEL_SDK_DISABLED"]?.lowercased() == "true" || env["OTEL_TRACES_EXPORTER"]?.lowercased() == "none" {
            return nil
        }
        let endpoint: String
        if let traces = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"], !traces.isEmpty {
            endpoint = traces
        } else if let base = env["OTEL_EXPORTER_OTLP_ENDPOINT"], !base.isEmpty {
            endpoint = (base.hasSuffix("/") ? String(base.dropLast()) : base) + "/v1/traces"
        } else {
            return nil
        }
        let proto = env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] ?? env["OTEL_EXPORTER_OTLP_PROTOCOL"] ?? "http/protobuf"
        guard proto == "http/protobuf" else {
            throw OTLPError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=\(proto) is not supported: traces are sent as OTLP over HTTP with protobuf (http/protobuf); point the endpoint at the collector's HTTP port (4318)"
            )
        }
        guard let url = URL(string: endpoint), ["http", "https"].contains(url.scheme ?? ""), url.host != nil else {
            throw OTLPError("the OTLP endpoint '\(endpoint)' is not an http:// or https:// URL")
        }
        let headers = parsePairs(env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] ?? env["OTEL_EXPORTER_OTLP_HEADERS"] ?? "")
        let timeout =
            (env["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"] ?? env["OTEL_EXPORTER_OTLP_TIMEOUT"]).flatMap(Double.init)
            .map { $0 / 1000 } ?? 10
        var resource: [(String, AttributeValue)] = parsePairs(env["OTEL_RESOURCE_ATTRIBUTES"] ?? "").map {
            ($0.0, .string($0.1))
        }
        // OTEL_SERVICE_NAME wins over a service.name in OTEL_RESOURCE_ATTRIBUTES.
        if let service = env["OTEL_SERVICE_NAME"], !service.isEmpty {
            resource.removeAll { $0.0 == "service.name" }
            resource.insert(("service.name", .string(service)), at: 0)
        } else if !resource.contains(where: { $0.0 == "service.name" }) {
            resource.insert(("service.name", .string("contree-pipeline")), at: 0)
        }
        resource.append(("service.version", .string(serviceVersion)))
        resource.append(("telemetry.sdk.name", .string("contree-pipeline")))
        resource.append(("telemetry.sdk.language", .string("swift")))
        var hostname = [CChar](repeating: 0, count: 256)
        if gethostname(&hostname, hostname.count) == 0 {
            resource.append(("host.name", .string(String(cString: hostname))))
        }
        return OTLPConfiguration(
            endpoint: url, headers: headers, timeout: max(0.1, timeout), resource: resource,
            parent: env["TRACEPARENT"].flatMap(parseTraceparent))
    }

    /// `k=v,k2=v2` with percent-encoded values (the OTel environment format).
    static func parsePairs(_ text: String) -> [(String, String)] {
        text.split(separator: ",").compactMap { pair in
            guard let eq = pair.firstIndex(of: "=") else { return nil }
            let key = pair[..<eq].trimmingCharacters(in: .whitespaces)
            let value = pair[pair.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            guard !key.isEmpty else { return nil }
            return (key, value.removingPercentEncoding ?? value)
        }
    }

    /// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
    static func parseTraceparent(_ text: String) -> (traceID: [UInt8], spanID: [UInt8])? {
        let parts = text.trimmingCharacters(in: .whitespaces).split(separator: "-")
        guard parts.count == 4, parts[1].count == 32, parts[2].count == 16,
            let trace = hex(parts[1]), let span = hex(parts[2]),
            trace.contains(where: { $0 != 0 }), span.contains(where: { $0 != 0 })
        else { return nil }
        return (trace, span)
    }

    static func hex(_ text: Substring) -> [UInt8]? {
        var bytes: [UInt8] = []
        var index = text.startIndex
        while index < text.endIndex {
            let next = text.index(index, offsetBy: 2)
            guard let byte = UInt8(text[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        return bytes
    }
}

public struct OTLPError: Error, CustomStringConvertible, Sendable {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// Sends spans as one OTLP/HTTP `ExportTraceServiceRequest` (protobuf).
public enum OTLPExporter {
    /// - Throws: `OTLPError` naming the endpoint and what it answered (or why it did not).
    public static func export(
        _ spans: [TraceSpan], configuration: OTLPConfiguration, scope: (name: String, version: String)
    ) async throws {
        var request = HTTPRequest(
            "POST", configuration.endpoint.absoluteString,
            headers: [(name: "Content-Type", value: "application/x-protobuf")]
                + configuration.headers.map { (name: $0.0, value: $0.1) },
            body: encode(spans, resource: configuration.resource, scope: scope))
        request.connectTimeout = configuration.timeout
        request.totalTimeout = configuration.timeout
        // A blocking exchange, on a thread of its own rather than one of the tasks' threads.
        let exchange = request
        let result: Result<(response: HTTPResponse, body: [UInt8]), HTTPFailure> = await withCheckedContinuation {
            continuation in
            Thread.detachNewThread {
                do throws(HTTPFailure) {
                    continuation.resume(returning: .success(try HTTPTransfer().perform(exchange)))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
        let response: HTTPResponse
        let data: [UInt8]
        switch result {
        case .success(let answer): (response, data) = answer
        case .failure(let error):
            throw OTLPError("no answer from \(configuration.endpoint.absoluteString): \(error.description)")
        }
        guard (200..<300).contains(response.status) else {
            let text = String(decoding: data.prefix(300), as: UTF8.self)
            throw OTLPError(
                "\(configuration.endpoint.absoluteString) answered \(response.status)\(text.isEmpty ? "" : ": " + text)"
            )
        }
    }

    /// The request's protobuf bytes (field numbers from opentelemetry-proto's trace.proto,
    /// common.proto, resource.proto and trace_service.proto).
    public static func encode(
        _ spans: [TraceSpan], resource: [(String, AttributeValue)], scope: (name: String, version: String)
    ) -> [UInt8] {
        var resourceMessage = Protobuf()
        for attribute in resource { resourceMessage.message(1, keyValue(attribute)) }
        var scopeMessage = Protobuf()
        scopeMessage.string(1, scope.name)
        scopeMessage.string(2, scope.version)
        var scopeSpans = Protobuf()
        scopeSpans.message(1, scopeMessage)
        for span in spans { scopeSpans.message(2, encode(span)) }
        var resourceSpans = Protobuf()
        resourceSpans.message(1, resourceMessage)
        resourceSpans.message(2, scopeSpans)
        var request = Protobuf()
        request.message(1, resourceSpans)
        return request.bytes
    }

    static func encode(_ span: TraceSpan) -> Protobuf {
        var message = Protobuf()
        message.bytes(1, span.traceID)
        message.bytes(2, span.spanID)
        if let parent = span.parentSpanID { message.bytes(4, parent) }
        message.string(5, span.name)
        message.varint(6, 1)  // SPAN_KIND_INTERNAL
        message.fixed64(7, nanoseconds(span.start))
        message.fixed64(8, nanoseconds(max(span.end, span.start)))
        for attribute in span.attributes { message.message(9, keyValue(attribute)) }
        var status = Protobuf()
        switch span.status {
        case .unset: break
        case .ok: status.varint(3, 1)
        case .error(let text):
            status.string(2, text)
            status.varint(3, 2)
        }
        message.message(15, status)
        return message
    }

    static func keyValue(_ attribute: (String, AttributeValue)) -> Protobuf {
        var value = Protobuf()
        switch attribute.1 {
        case .string(let s): value.string(1, s, always: true)
        case .bool(let b): value.varint(2, b ? 1 : 0, always: true)
        case .int(let i): value.varint(3, UInt64(bitPattern: i), always: true)
        case .double(let d): value.fixed64(4, d.bitPattern, always: true)
        }
        var pair = Protobuf()
        pair.string(1, attribute.0)
        pair.message(2, value)
        return pair
    }

    static func nanoseconds(_ date: Date) -> UInt64 {
        UInt64(max(0, date.timeIntervalSince1970 * 1_000_000_000).rounded())
    }
}

/// A protobuf message being written: fields in order, each tag then its value. Default values
/// are left out (as proto3 does), unless `always` (a oneof member must be present).
struct Protobuf {
    private(set) var bytes: [UInt8] = []

    mutating func tag(_ field: Int, _ wireType: UInt64) { writeVarint(UInt64(field) << 3 | wireType) }

    mutating func writeVarint(_ value: UInt64) {
        var v = value
        while v >= 0x80 {
            bytes.append(UInt8(v & 0x7f) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    mutating func varint(_ field: Int, _ value: UInt64, always: Bool = false) {
        guard value != 0 || always else { return }
        tag(field, 0)
        writeVarint(value)
    }

    mutating func fixed64(_ field: Int, _ value: UInt64, always: Bool = false) {
        guard value != 0 || always else { return }
        tag(field, 1)
        for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8((value >> UInt64(shift)) & 0xff)) }
    }

    mutating func bytes(_ field: Int, _ value: [UInt8]) {
        guard !value.isEmpty else { return }
        tag(field, 2)
        writeVarint(UInt64(value.count))
        bytes += value
    }

    mutating func string(_ field: Int, _ value: String, always: Bool = false) {
        guard !value.isEmpty || always else { return }
        tag(field, 2)
        writeVarint(UInt64(value.utf8.count))
        bytes += value.utf8
    }

    mutating func message(_ field: Int, _ value: Protobuf) {
        tag(field, 2)
        writeVarint(UInt64(value.bytes.count))
        bytes += value.bytes
    }
}
