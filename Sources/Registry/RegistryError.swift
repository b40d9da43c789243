/// What went wrong between this client and a registry: carried as the `cause` of the
/// `SandboxError` the client throws (whose message says what to do), so that a caller can
/// tell a refusal from an absence, a server error or an unreachable host without reading text.
public struct RegistryError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The registry answered with this HTTP status (not a success).
        case status(Int)
        /// No answer: the connection or the transfer failed (see `underlying`).
        case transport
        /// A redirect to an address this client may not follow.
        case redirectRefused
    }

    public var kind: Kind
    /// The URL asked (its path; never credentials).
    public var path: String
    /// The OCI error codes of the answer's body (`MANIFEST_UNKNOWN`), if any.
    public var codes: [String]
    /// The transport's own error, for `.transport`.
    public var underlying: (any Error)?

    public init(_ kind: Kind, path: String, codes: [String] = [], underlying: (any Error)? = nil) {
        self.kind = kind
        self.path = path
        self.codes = codes
        self.underlying = underlying
    }

    public var description: String {
        switch kind {
        case .status(let status):
            "HTTP \(status) for \(path)" + (codes.isEmpty ? "" : " (\(codes.joined(separator: ", ")))")
        case .transport: "no answer for \(path)" + (underlying.map { ": \($0)" } ?? "")
        case .redirectRefused: "a refused redirect from \(path)"
        }
    }
}
