import FoundationEssentials
import Glibc
import SystemSupport

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
    /// A spawn with networking enabled gets egress (a NAT uplink) rather than loopback only;
    /// `allow_egress=1`, or `serve --allow-egress` for every token.
    var allowEgress = false
    /// Each instance's memory (cgroup), CPU quota in cores and tasks at once.
    var memoryBytes: Int64 = 0
    var cpus: Double = 1
    var pids = 0
    /// The largest upload, and the bytes of uploads the namespace may hold.
    var maxUploadBytes: Int64 = Token.defaultMaxUploadBytes
    var uploadQuotaBytes: Int64 = Token.defaultUploadQuotaBytes

    static let defaultMaxUploadBytes: Int64 = 1 << 30
    static let defaultUploadQuotaBytes: Int64 = 10 << 30

    static let defaultMaxConcurrency = 8
    static let defaultMaxTimeout = 3600
    static let defaultMaxLayerBytes: Int64 = 12 << 30

    /// A stable UUID for `whoami`, derived from the secret (never the secret itself).
    var uuid: String {
        let hex = Hex.encode(Digest.sha256(secret).bytes.prefix(16))
        let c = Array(hex)
        return [c[0..<8], c[8..<12], c[12..<16], c[16..<20], c[20..<32]].map { String($0) }.joined(separator: "-")
    }
}

/// The tokens file: one token per line, `NAME TOKEN [max_concurrency=N] [max_timeout=SECONDS]
/// [max_layer_bytes=N] [memory=BYTES] [cpus=N] [pids=N] [max_upload_bytes=N]
/// [upload_quota_bytes=N] [import=1] [allow_egress=1]`; `#` starts a comment.
///
/// Every instance runs under limits, stated or not: memory defaults to this machine's RAM over
/// the token's concurrency, CPU to half its cores (at least one), and tasks so that all tokens'
/// instances together stay under a quarter of the kernel's `pid_max` (a stated value may take
/// at most half of it in all).
struct TokenFile: Sendable {
    let path: String
    let tokens: [Token]

    /// Every token with `allow_egress=1` (`serve --allow-egress`).
    func allowingEgress() -> TokenFile {
        TokenFile(
            path: path,
            tokens: tokens.map {
                var token = $0; token.allowEgress = true; return token
            })
    }

    /// Reads the file, creating it with one fresh random token when it does not exist.
    /// - Returns: the file and whether it was created.
    static func loadOrCreate(_ path: String) throws -> (TokenFile, created: Bool) {
        if !FileSystem.exists(path) {
            var generator = SystemRandomNumberGenerator()  // getrandom(2)
            let bytes = (0..<24).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let secret = Hex.encode(bytes)
            let text = """
                # contree-pipeline serve tokens: one per line, NAME TOKEN [max_concurrency=N] [max_timeout=SECONDS]
                # [max_layer_bytes=N] [memory=BYTES] [cpus=N] [pids=N] [max_upload_bytes=N] [upload_quota_bytes=N]
                # [import=1] [allow_egress=1]. Each NAME is its own namespace of images, files and operations;
                # import=1 lets it import from the registries `serve --registry` names; allow_egress=1 gives its
                # instances with networking enabled a NAT uplink to the outside (otherwise loopback only).
                default \(secret)

                """
            let dir = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
            if !dir.isEmpty { try FileSystem.makeDirectory(dir, mode: 0o700) }
            try FileSystem.writeFile(path, Array(text.utf8), mode: 0o600)
            return (try load(path), true)
        }
        return (try load(path), false)
    }

    static func load(_ path: String, host: HostCapacity = .current) throws -> TokenFile {
        let text = String(decoding: try FileSystem.readFile(path), as: UTF8.self)
        var tokens: [Token] = []
        var stated: [String: Set<String>] = [:]  // which limits each token's line states
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
                if parts.first == "import" || parts.first == "allow_egress" {
                    guard parts.count == 2, parts[1] == "0" || parts[1] == "1" else {
                        throw fail("write \(parts[0])=1 or \(parts[0])=0")
                    }
                    if parts[0] == "import" {
                        token.canImport = parts[1] == "1"
                    } else {
                        token.allowEgress = parts[1] == "1"
                    }
                    continue
                }
                if parts.first == "cpus" {
                    guard parts.count == 2, let value = Double(parts[1]), value > 0, value <= Double(host.cores) else {
                        throw fail("write cpus=N with N from 0.01 to this machine's \(host.cores) cores")
                    }
                    token.cpus = value
                    stated[name, default: []].insert("cpus")
                    continue
                }
                guard parts.count == 2, let value = Int64(parts[1]), value > 0 else {
                    throw fail("'\(option)' is not key=positive-integer")
                }
                switch parts[0] {
                case "max_concurrency": token.maxConcurrency = Int(value)
                case "max_timeout": token.maxTimeout = Int(value)
                case "max_layer_bytes": token.maxLayerBytes = value
                case "memory":
                    guard value >= 16 << 20 else {
                        throw fail("memory=\(value) is below 16 MiB; no instance would start")
                    }
                    token.memoryBytes = value
                case "pids":
                    guard value >= 8 else { throw fail("pids=\(value) is below 8; no shell would start") }
                    token.pids = Int(value)
                case "max_upload_bytes": token.maxUploadBytes = value
                case "upload_quota_bytes": token.uploadQuotaBytes = value
                default:
                    throw fail(
                        "unknown option '\(parts[0])' (max_concurrency, max_timeout, max_layer_bytes, memory, cpus, pids, max_upload_bytes, upload_quota_bytes, import)"
                    )
                }
                stated[name, default: []].insert(parts[0])
            }
            guard !tokens.contains(where: { $0.name == name || $0.secret == token.secret }) else {
                throw fail("'\(name)' or its token appears twice")
            }
            tokens.append(token)
        }
        guard !tokens.isEmpty else {
            throw SandboxError(.invalidArgument, "\(path) holds no token; add a line NAME TOKEN")
        }
        // Defaults: what is not stated.
        let totalConcurrency = tokens.reduce(0) { $0 + $1.maxConcurrency }
        for i in tokens.indices {
            let given = stated[tokens[i].name] ?? []
            if !given.contains("memory") {
                tokens[i].memoryBytes = max(256 << 20, host.memoryBytes / Int64(tokens[i].maxConcurrency))
            }
            if !given.contains("cpus") { tokens[i].cpus = max(1, Double(host.cores) / 2) }
            if !given.contains("pids") {
                tokens[i].pids = min(4096, max(64, host.pidMax / (4 * totalConcurrency)))
            }
        }
        let tasks = tokens.reduce(0) { $0 + $1.maxConcurrency * $1.pids }
        guard tasks <= host.pidMax / 2 else {
            throw SandboxError(
                .invalidArgument,
                "\(path): the tokens' instances could hold \(tasks) tasks at once (max_concurrency × pids, summed), more than half of this machine's pid_max (\(host.pidMax)); lower pids or max_concurrency"
            )
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

/// What this machine has, for the tokens' default limits.
struct HostCapacity: Sendable {
    var memoryBytes: Int64
    var cores: Int
    /// The kernel's `pid_max`: the tasks the whole machine may have.
    var pidMax: Int

    static var current: HostCapacity {
        let pages = Int64(sysconf(Int32(_SC_PHYS_PAGES)))
        let pageSize = Int64(sysconf(Int32(_SC_PAGESIZE)))
        let text = (try? FileSystem.readFile("/proc/sys/kernel/pid_max")).map { String(decoding: $0, as: UTF8.self) }
        return HostCapacity(
            memoryBytes: max(1 << 30, pages * pageSize), cores: max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))),
            pidMax: text.flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 32768)
    }
}
