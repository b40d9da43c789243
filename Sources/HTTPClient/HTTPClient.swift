import CCurl
import Glibc

/// One HTTP request: what `HTTPTransfer.perform` sends.
public struct HTTPRequest: Sendable {
    public var method: String
    public var url: String
    /// In the order given; a name may repeat.
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]?
    /// Fails when the connection is not made within this many seconds.
    public var connectTimeout: Double = 30
    /// Fails when no byte moves for this many seconds (a stalled transfer); 0: never.
    public var idleTimeout: Int = 60
    /// Fails when the whole exchange takes longer; nil: no limit (large downloads).
    public var totalTimeout: Double?

    public init(
        _ method: String, _ url: String, headers: [(name: String, value: String)] = [], body: [UInt8]? = nil
    ) {
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
    }
}

/// The final response's status and headers (a `100 Continue` before it is not kept).
public struct HTTPResponse: Sendable {
    public var status: Int
    /// Names lower-cased; a repeated header keeps its last value.
    public var headers: [String: String]

    public init(status: Int, headers: [String: String] = [:]) {
        self.status = status
        self.headers = headers
    }

    /// A header's value, by name in any case.
    public func header(_ name: String) -> String? { headers[name.lowercased()] }
}

/// Why a request got no response.
public struct HTTPFailure: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable {
        /// libcurl cannot be loaded on this machine.
        case unavailable
        /// The connection or the transfer failed (refused, timed out, TLS, reset).
        case transport
        /// `cancel()` was called.
        case cancelled
        /// The body's receiver asked to stop.
        case stopped
    }

    public var kind: Kind
    public var description: String
}

/// One HTTP exchange at a time, through libcurl (`CCurl` loads it on first use, so a process that
/// never talks HTTP never maps it). Blocking: call it from a thread that may wait. `cancel()`
/// from any thread stops a request in flight at once (an eventfd libcurl's poll watches).
/// Redirects are answered, not followed: the caller decides where it may go.
public final class HTTPTransfer: @unchecked Sendable {
    private let cancelFD: Int32

    public init() {
        cancelFD = ccurl_cancel_fd()
    }

    deinit {
        if cancelFD >= 0 { close(cancelFD) }
    }

    /// Stops the request in flight, and every later one, with `HTTPFailure.cancelled`.
    public func cancel() {
        if cancelFD >= 0 { ccurl_cancel(cancelFD) }
    }

    /// Sends `request`; `onData` receives the body's bytes as they arrive (return false to stop:
    /// `HTTPFailure.stopped`) with the response they belong to. Without it the body is collected
    /// and returned.
    @discardableResult
    public func perform(
        _ request: HTTPRequest,
        onData: ((HTTPResponse, UnsafeRawBufferPointer) -> Bool)? = nil
    ) throws(HTTPFailure) -> (response: HTTPResponse, body: [UInt8]) {
        let state = State(onData: onData)
        let headerLines = request.headers.map { "\($0.name): \($0.value)" }
        let strings = headerLines.map { strdup($0) }
        defer { strings.forEach { free($0) } }
        var status = 0
        var message = [CChar](repeating: 0, count: 512)
        let rc: Int32 = strings.map { UnsafePointer<CChar>($0) }.withUnsafeBufferPointer { headers in
            do {
                let context = Unmanaged.passUnretained(state).toOpaque()
                return request.method.withCString { method in
                    request.url.withCString { url in
                        let perform = { (body: UnsafeRawPointer?, length: Int) -> Int32 in
                            var c = ccurl_request()
                            c.method = method
                            c.url = url
                            c.headers = headers.baseAddress
                            c.header_count = headers.count
                            c.body = body
                            c.body_length = length
                            c.connect_timeout_ms = Int(request.connectTimeout * 1000)
                            c.idle_timeout_s = request.idleTimeout
                            c.total_timeout_ms = request.totalTimeout.map { Int($0 * 1000) } ?? 0
                            c.cancel_fd = self.cancelFD
                            c.context = context
                            c.on_header = { context, line, length in
                                let state = Unmanaged<State>.fromOpaque(context!).takeUnretainedValue()
                                state.header(UnsafeRawBufferPointer(start: line, count: length))
                                return 0
                            }
                            c.on_data = { context, data, length in
                                let state = Unmanaged<State>.fromOpaque(context!).takeUnretainedValue()
                                return state.data(UnsafeRawBufferPointer(start: data, count: length)) ? 0 : 1
                            }
                            var code = 0
                            let rc = ccurl_perform(&c, &code, &message, message.count)
                            status = code
                            return rc
                        }
                        guard let body = request.body else { return perform(nil, 0) }
                        // An empty body is still a body (Content-Length: 0), never a null pointer.
                        return body.isEmpty
                            ? perform(UnsafeRawPointer(bitPattern: 1), 0)
                            : body.withUnsafeBytes { perform($0.baseAddress, $0.count) }
                    }
                }
            }
        }
        let text = String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        switch rc {
        case Int32(CCURL_OK):
            var response = state.response
            response.status = status
            return (response, state.body)
        case Int32(CCURL_UNAVAILABLE): throw HTTPFailure(kind: .unavailable, description: text)
        case Int32(CCURL_CANCELLED): throw HTTPFailure(kind: .cancelled, description: "cancelled")
        case Int32(CCURL_STOPPED): throw HTTPFailure(kind: .stopped, description: text)
        default: throw HTTPFailure(kind: .transport, description: text)
        }
    }

    /// What the callbacks collect; only the transfer's thread touches it.
    private final class State {
        let onData: ((HTTPResponse, UnsafeRawBufferPointer) -> Bool)?
        var response = HTTPResponse(status: 0)
        var body: [UInt8] = []

        init(onData: ((HTTPResponse, UnsafeRawBufferPointer) -> Bool)?) { self.onData = onData }

        func header(_ line: UnsafeRawBufferPointer) {
            let text = String(decoding: line, as: UTF8.self)
            if text.hasPrefix("HTTP/") {
                // A new response (after a 100 Continue): its headers alone count.
                let fields = text.split(separator: " ", maxSplits: 2)
                response = HTTPResponse(status: fields.count > 1 ? Int(fields[1]) ?? 0 : 0)
            } else if let colon = text.firstIndex(of: ":") {
                let name = text[..<colon].lowercased()
                let value = text[text.index(after: colon)...].trimmingCharacters(in: " \t")
                response.headers[name] = value
            }
        }

        func data(_ bytes: UnsafeRawBufferPointer) -> Bool {
            guard let onData else {
                body.append(contentsOf: bytes)
                return true
            }
            return onData(response, bytes)
        }
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var slice = self[...]
        while let first = slice.first, set.contains(first) { slice = slice.dropFirst() }
        while let last = slice.last, set.contains(last) { slice = slice.dropLast() }
        return String(slice)
    }
}
