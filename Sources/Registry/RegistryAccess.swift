import Foundation
import SystemSupport

/// Which hosts a registry client may reach, and over which scheme.
///
/// The CLI's own commands reach any registry their operator names (`.any`). `serve` reaches
/// only the operator's allowlist (`serve --registry HOST[:PORT]`, none by default): there a
/// tenant names the reference, and a server that fetched any URL a tenant named would reach
/// whatever this machine can reach. The allowlist holds for every request of an import, the
/// token service a `401` names and every redirect included (or they stay on the registry's own
/// host). Plain http goes to loopback hosts, to hosts listed as `http://HOST[:PORT]`, or with
/// `--allow-http` anywhere; everything else is https.
public struct RegistryAccess: Sendable, Equatable {
    /// Lower-cased `HOST[:PORT]` that may be reached; nil for any.
    public private(set) var hosts: Set<String>?
    /// Hosts plain http may reach (besides loopback ones).
    public private(set) var httpHosts: Set<String> = []
    /// Plain http to any host (the CLI's `--allow-http`).
    public private(set) var httpAnywhere = false

    /// No registry at all (`serve` without `--registry`).
    public static let allowlistClosed = RegistryAccess(hosts: [])

    /// Any registry (the operator's own commands); http to loopback, or anywhere when allowed.
    public static func any(allowHTTP: Bool = false) -> RegistryAccess {
        RegistryAccess(hosts: nil, httpAnywhere: allowHTTP)
    }

    /// Only the listed registries: `HOST[:PORT]` (https, or http on loopback) or
    /// `http://HOST[:PORT]` (plain http).
    /// - Throws: `invalidArgument` for an entry that is not a host.
    public static func allowlist(_ entries: [String]) throws -> RegistryAccess {
        var access = RegistryAccess(hosts: [])
        for entry in entries {
            var host = entry.lowercased()
            var http = false
            if host.hasPrefix("http://") {
                host.removeFirst("http://".count)
                http = true
            } else if host.hasPrefix("https://") {
                host.removeFirst("https://".count)
            }
            while host.hasSuffix("/") { host.removeLast() }
            let valid =
                !host.isEmpty
                && host.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || ".-:[]".contains($0)) }
            guard valid else {
                throw SandboxError(
                    .invalidArgument,
                    "--registry \(entry) is not HOST[:PORT] or http://HOST[:PORT], e.g. registry.example.com")
            }
            access.hosts?.insert(host)
            if http { access.httpHosts.insert(host) }
        }
        return access
    }

    /// Whether nothing at all may be reached (a server without `--registry`).
    public var isClosed: Bool { hosts?.isEmpty == true }

    /// Whether `host` (`HOST[:PORT]`) may be reached.
    public func permits(host: String) -> Bool {
        hosts.map { $0.contains(host.lowercased()) } ?? true
    }

    /// The scheme to reach `host` with.
    func scheme(for host: String) -> String {
        RegistryAccess.isLoopback(host) || httpAnywhere || httpHosts.contains(host.lowercased()) ? "http" : "https"
    }

    /// Refuses a reference whose registry is not on the allowlist.
    public func check(_ reference: RegistryReference) throws {
        guard permits(host: reference.host) else {
            throw SandboxError(
                .invalidArgument,
                isClosed
                    ? "\(reference.host) is not a registry this server may reach: it reaches none until its operator names them with `serve --registry HOST[:PORT]`"
                    : "\(reference.host) is not a registry this server may reach; its operator allows \(hosts!.sorted().joined(separator: ", ")) (serve --registry)"
            )
        }
    }

    /// Checks a URL a registry sent this client to (a token realm, a redirect): the registry's
    /// own host or an allowed one, over https unless http is allowed there.
    /// - Returns: nil when it may be followed, else why not.
    func refusal(of url: URL, from registryHost: String) -> String? {
        guard let scheme = url.scheme?.lowercased(), scheme == "https" || scheme == "http", let name = url.host else {
            return "\(url.absoluteString) is not an http(s) address"
        }
        let host = (name.contains(":") && !name.hasPrefix("[") ? "[\(name)]" : name) + (url.port.map { ":\($0)" } ?? "")
        guard host.lowercased() == registryHost.lowercased() || permits(host: host) else {
            return "\(host) is neither the registry nor on this server's allowlist (serve --registry)"
        }
        if scheme == "http" && self.scheme(for: host) != "http" {
            return "\(url.absoluteString) is plain http, which is allowed only to loopback or with --allow-http"
        }
        return nil
    }

    static func isLoopback(_ host: String) -> Bool {
        let name = host.hasPrefix("[") ? String(host.prefix { $0 != "]" }) + "]" : String(host.prefix { $0 != ":" })
        return name == "localhost" || name == "[::1]" || name.hasPrefix("127.")
    }
}
