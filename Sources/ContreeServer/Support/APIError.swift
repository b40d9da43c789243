import FoundationEssentials
import HTTPTypes
import Hummingbird
import SystemSupport

/// An error answered in the spec's shape: `{"error": "...", "status": N}` with that status.
struct APIError: Error, HTTPResponseError, CustomStringConvertible {
    let status: HTTPResponse.Status
    let message: String
    /// Seconds for a `Retry-After` header (425, 429).
    var retryAfter: Int?

    init(_ status: HTTPResponse.Status, _ message: String, retryAfter: Int? = nil) {
        self.status = status
        self.message = message
        self.retryAfter = retryAfter
    }

    var description: String { "\(status.code) \(message)" }

    static func notFound(_ what: String) -> APIError { APIError(.notFound, what) }

    func response(from request: Request, context: some RequestContext) throws -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        if let retryAfter { headers[.retryAfter] = String(retryAfter) }
        let body = JSON.object([("error", .string(message)), ("status", .int(Int64(status.code)))]).serialized()
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: body)))
    }

    /// The API's reading of an engine error.
    init(_ error: SandboxError) {
        let status: HTTPResponse.Status =
            switch error.code {
            case .notFound: .notFound
            case .invalidArgument, .pathEscapes: .badRequest
            case .conflict: .conflict
            case .unsupported: .notImplemented
            default: .internalServerError
            }
        self.init(status, error.description)
    }

    /// Any error thrown while answering, as the API reports it.
    static func from(_ error: any Error) -> APIError {
        if let api = error as? APIError { return api }
        if let sandbox = error as? SandboxError { return APIError(sandbox) }
        if let decoding = error as? DecodingError { return APIError(.badRequest, describe(decoding)) }
        return APIError(.internalServerError, "internal error: \(error)")
    }

    /// A request body's decoding error, naming the field.
    static func describe(_ error: DecodingError) -> String {
        func path(_ keys: [any CodingKey]) -> String {
            let text = keys.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
            return text.isEmpty ? "the body" : String(text.drop { $0 == "." })
        }
        switch error {
        case .typeMismatch(let type, let context):
            return "invalid request body: \(path(context.codingPath)) must be \(describeType(type))"
        case .valueNotFound(let type, let context):
            return "invalid request body: \(path(context.codingPath)) must be \(describeType(type)), not null"
        case .keyNotFound(let key, let context):
            return "invalid request body: \(path(context.codingPath + [key])) is required"
        case .dataCorrupted(let context):
            if context.codingPath.isEmpty { return "invalid request body: it is not valid JSON" }
            return "invalid request body: \(path(context.codingPath)): \(context.debugDescription)"
        @unknown default:
            return "invalid request body"
        }
    }

    private static func describeType(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: "a string"
        case is Bool.Type: "a boolean"
        case is Int.Type, is Int64.Type, is UInt32.Type, is Int32.Type: "an integer"
        case is Double.Type: "a number"
        default:
            if "\(type)".hasPrefix("Array") {
                "an array"
            } else if "\(type)".hasPrefix("Dictionary") {
                "an object"
            } else {
                "an object"
            }
        }
    }
}
