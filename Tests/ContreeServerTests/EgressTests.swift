import ContreeTestSupport
import Foundation
import Testing

/// `serve` keeps the default closed: networking.enabled means loopback only, unless the token
/// says allow_egress=1 or the server runs with --allow-egress. Nothing here leaves the host:
/// the instances only list their interfaces.
@Suite("serve: egress is opt-in per token or per server", .requiresRoot)
struct EgressTests {
    static let open = "open-0123456789abcdef0123456789abcdef"
    static let closed = "shut-0123456789abcdef0123456789abcdef"

    func interfaces(_ server: TestServer, token: String, networking: Bool = true) async throws -> String {
        let op = try await server.spawn(
            #"{"command": "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ' '", "shell": true, "image": "busybox", "networking": {"enabled": \#(networking)}}"#,
            token: token)
        let record = try await server.wait(op, token: token)
        #expect(record["status"] as? String == "SUCCESS", "\(record)")
        return record[path: "metadata.result.stdout.value"] as? String ?? ""
    }

    @Test("only a token with allow_egress=1 gets eth0; networking false is still no interface up")
    func perToken() async throws {
        let server = try await TestServer(
            tokens: "open \(EgressTests.open) allow_egress=1\nshut \(EgressTests.closed)\n")
        #expect(try await interfaces(server, token: EgressTests.open) == "eth0 lo ")
        #expect(try await interfaces(server, token: EgressTests.closed) == "lo ")
        #expect(try await interfaces(server, token: EgressTests.open, networking: false) == "lo ")
    }

    @Test("serve --allow-egress grants it to every token")
    func perServer() async throws {
        let server = try await TestServer(arguments: ["--allow-egress"], tokens: "shut \(EgressTests.closed)\n")
        #expect(try await interfaces(server, token: EgressTests.closed) == "eth0 lo ")
    }
}
