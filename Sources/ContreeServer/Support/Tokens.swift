import Crypto
import FoundationEssentials
import Glibc
import Sandbox

/// One API token: its namespace and its limits.
struct Token: Sendable, Equatable {
    /// The namespace everything the token creates belongs to.
    var name: String
    var secret: String
    var maxConcurrency: Int
    /// Seconds.
    var maxTimeout: Int
    var maxLayerBytes: Int64
    /// May import images from registries (`/images/import`, a spawn naming `docker://…`); the
    /// registries themselves are the operator's allowlist (`serve --registry`).
    var canImport = false

    static let defaultMaxConcurrency = 8
    static let defaultMaxTimeout = 3600
    static let defaultMaxLayerBytes: Int64 = 12 << 30

    /// A stable UUID for `whoami`, derived from the secret (never the secret itself).
    var uuid: String {
        let digest = Array(SHA256.hash(data: Array(secret.utf8)))
        let hex = digest.prefix(16).map { String($0, radix: 16).leftPadded2 }.joined()
        let c = Array(hex)
        return [c[0..<8], c[8..<12], c[12..<16], c[16..<20], c[20..<32]].map { String($0) }.joined(separator: "-")
    }
}

extension String {
    fileprivate var leftPadded2: String { count < 2 ? "0" + self : self }
}

/// The tokens file: one token per line, `NAME TOKEN [max_concurrency=N] [max_timeout=SECONDS]
/// [max_layer_bytes=N] [import=1]`; `#` starts a comment.
struct TokenFile: Sendable {
    let path: String
    let tokens: [Token]

    /// Reads the file, creating it with one fresh random token when it does not exist.
    /// - Returns: the file and whether it was created.
    static func loadOrCreate(_ path: String) throws -> (TokenFile, created: Bool) {
        if !FileSystem.exists(path) {
            var generator = SystemRandomNumberGenerator()  // getrandom(2)
            let bytes = (0..<24).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let secret = bytes.map { String($0, radix: 16).leftPadded2 }.joined()
            let text = """
                # contree-pipeline serve tokens: one per line, NAME TOKEN [max_concurrency=N] [max_timeout=SECONDS]
                # [max_layer_bytes=N] [import=1]. Each NAME is its own namespace of images, files and operations;
                # import=1 lets it import from the registries `serve --registry` names.
                default \(secret)

                """
            let dir = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
            if !dir.isEmpty { try FileSystem.makeDirectory(dir, mode: 0o700) }
            try FileSystem.writeFile(path, Array(text.utf8), mode: 0o600)
            return (try load(path), true)
        }
        return (try load(path), false)
    }

    static func load(_ path: String) throws -> TokenFile {
        let text = String(decoding: try FileSystem.readFile(path), as: UTF8.self)
        var tokens: [Token] = []
        for (index, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let content = line.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let fields = content.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            if fields.isEmpty { continue }
            func fail(_ why: String) -> SandboxError {
                SandboxError(.invalidArgument, "\(path):\(index + 1): \(why)")
            }
            guard fields.count >= 2 else { throw fail("a token line is NAME TOKEN [key=value...]") }
            let name = fields[0]
            guard name.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
                throw fail("the name '\(name)' may only hold letters, digits, '-', '_' and '.'")
            }
            guard fields[1].count >= 16 else { throw fail("the token of '\(name)' is shorter than 16 characters") }
            var token = Token(
                name: name, secret: fields[1], maxConcurrency: Token.defaultMaxConcurrency,
                maxTimeout: Token.defaultMaxTimeout, maxLayerBytes: Token.defaultMaxLayerBytes)
            for option in fields.dropFirst(2) {
                let parts = option.split(separator: "=", maxSplits: 1).map(String.init)
                if parts.first == "import" {
                    guard parts.count == 2, parts[1] == "0" || parts[1] == "1" else { throw fail("write import=1 or import=0") }
                    token.canImport = parts[1] == "1"
                    continue
                }
                guard parts.count == 2, let value = Int64(parts[1]), value > 0 else {
                    throw fail("'\(option)' is not key=positive-integer")
                }
                switch parts[0] {
                case "max_concurrency": token.maxConcurrency = Int(value)
                case "max_timeout": token.maxTimeout = Int(value)
                case "max_layer_bytes": token.maxLayerBytes = value
                default: throw fail("unknown option '\(parts[0])' (max_concurrency, max_timeout, max_layer_bytes, import)")
                }
            }
            guard !tokens.contains(where: { $0.name == name || $0.secret == token.secret }) else {
                throw fail("'\(name)' or its token appears twice")
            }
            tokens.append(token)
        }
        guard !tokens.isEmpty else {
            throw SandboxError(.invalidArgument, "\(path) holds no token; add a line NAME TOKEN")
        }
        return TokenFile(path: path, tokens: tokens)
    }

    /// The token a request's secret belongs to, compared in constant time.
    func token(for secret: String) -> Token? {
        let given = Array(secret.utf8)
        var found: Token?
        for token in tokens {
            let expected = Array(token.secret.utf8)
            var diff = UInt8(expected.count == given.count ? 0 : 1)
            for i in 0..<expected.count { diff |= expected[i] ^ (i < given.count ? given[i] : 0) }
            if diff == 0 { found = token }
        }
        return found
    }
}
