import ContreeServer
import ContreeTestSupport
import Foundation
import Glibc
import SystemSupport
import Testing

/// One token's instances, uploads, requests and streams stay within limits the operator can
/// read in the tokens file (or its defaults), so that they cannot take the server or the host.
@Suite("serve: resource limits per token", .requiresRoot)
struct ServerLimitTests {
    static let token = "dave-0123456789abcdef0123456789abcdef"

    @Test("every instance has memory, CPU and task limits by default, and whoami shows them")
    func defaults() async throws {
        let server = try await TestServer()
        let whoami = try await server.request("GET", "/v1/whoami").json()
        let memory = try #require(whoami[path: "limits.instance_memory_bytes"] as? Int)
        let pids = try #require(whoami[path: "limits.instance_pids"] as? Int)
        let cpus = try #require(whoami[path: "limits.instance_cpus"] as? Double)
        #expect(memory > 0 && cpus >= 1 && pids >= 64)
        let pidMax = Int(
            try String(contentsOfFile: "/proc/sys/kernel/pid_max", encoding: .utf8).trimmingCharacters(
                in: .whitespacesAndNewlines))!
        // alice, bob and carol: 8 + 1 + 8 instances at once, all well under pid_max.
        #expect(17 * pids <= pidMax / 4)
    }

    @Test("a tokens file whose instances could exhaust pid_max is refused")
    func pidMax() async throws {
        let error = await #expect(throws: (any Error).self) {
            _ = try await TestServer(tokens: "dave \(Self.token) max_concurrency=64 pids=1000000\n")
        }
        #expect("\(error!)".contains("pid_max"), "\(error!)")
    }

    @Test("the memory and task limits hold inside an instance")
    func limitsHold() async throws {
        let server = try await TestServer(tokens: "dave \(Self.token) memory=67108864 pids=24\n")
        let memory = try await server.spawn(
            #"{"command":"x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}","image":"busybox","shell":true}"#,
            token: Self.token)
        let hog = try await server.wait(memory, token: Self.token)
        #expect(hog[path: "metadata.result.state.exit_code"] as? Int != 0, "\(hog)")
        let forks = try await server.spawn(
            #"{"command":"for i in $(seq 40); do sleep 3 & done 2>&1 | head -1; wait","image":"busybox","shell":true}"#,
            token: Self.token)
        let forked = try await server.wait(forks, token: Self.token)
        let output =
            (forked[path: "metadata.result.stdout.value"] as? String ?? "")
            + (forked[path: "metadata.result.stderr.value"] as? String ?? "")
        #expect(output.contains("fork"), "\(forked)")
    }

    @Test("uploads have a size limit and a quota; DELETE /v1/files/{uuid} frees room")
    func uploadQuota() async throws {
        let server = try await TestServer(tokens: "dave \(Self.token) max_upload_bytes=1024 upload_quota_bytes=2500\n")
        func upload(_ byte: UInt8, _ count: Int, chunked: Bool = false) async throws -> Reply {
            try await server.request(
                "POST", "/v1/files", token: Self.token, body: [UInt8](repeating: byte, count: count), chunked: chunked)
        }
        let big = try await upload(1, 2000)
        #expect(big.status == 413)
        #expect(try big.errorMessage().contains("max_upload_bytes"))
        let bigChunked = try await upload(1, 2000, chunked: true)
        #expect(bigChunked.status == 413)
        let first = try await upload(2, 1000)
        #expect(first.status == 201)
        #expect(try await upload(3, 1000).status == 201)
        let over = try await upload(4, 1000)
        #expect(over.status == 413)
        #expect(try over.errorMessage().contains("upload_quota_bytes"))
        let uuid = try #require(try first.json()["uuid"] as? String)
        let sha = try #require(try first.json()["sha256"] as? String)
        #expect(try await server.request("DELETE", "/v1/files/\(uuid)", token: Self.token).status == 204)
        #expect(try await server.request("GET", "/v1/files/\(sha)", token: Self.token).status == 404)
        #expect(!FileSystem.exists(server.home + "/files/" + sha))
        #expect(try await upload(4, 1000).status == 201)
        #expect(try await server.request("DELETE", "/v1/files/\(uuid)", token: Self.token).status == 404)
    }

    @Test("a command line and environment past 1 MiB is refused, not stored")
    func requestMetadata() async throws {
        let server = try await TestServer()
        let value = String(repeating: "x", count: 2 << 20)
        let reply = try await server.request(
            "POST", "/v1/instances", json: #"{"command":"true","image":"busybox","env":{"BIG":"\#(value)"}}"#)
        #expect(reply.status == 400)
        #expect(try reply.errorMessage().contains("1048576 bytes"))
        let listed = try await server.request("GET", "/v1/operations")
        #expect(listed.body.count < 100_000)
    }

    @Test("a token may hold 32 event streams; one it does not read costs the server no memory")
    func eventStreams() async throws {
        let server = try await TestServer()
        let op = try await server.spawn(
            #"{"command":"sleep 1; head -c 4000000 /dev/zero | tr '\\0' x; printf 'writ%s\\n' ten >&2; sleep 600","image":"busybox","shell":true,"truncate_output_at":10000000}"#
        )
        let before = try rss(server.pid)
        var sockets: [Int32] = []
        defer { for fd in sockets { close(fd) } }
        func follow() throws {
            let fd = try LoopbackHTTP.connection(port: server.port)
            let request =
                "GET /v1/operations/\(op)/events?follow=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(TestServer.alice)\r\n\r\n"
            _ = request.withCString { write(fd, $0, strlen($0)) }
            sockets.append(fd)
        }
        // 31 streams nobody reads; the 32nd slot is this test's, to see the output is all logged
        // (the marker is not in the command, which the spawn event repeats).
        for _ in 0..<31 { try follow() }
        var logged = false
        for _ in 0..<600 where !logged {
            logged = try await server.request("GET", "/v1/operations/\(op)/events?spid=1").text.contains("written")
            if !logged { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(logged)
        // 31 streams of 4 MB of output each would have been 124 MB held for readers that never read.
        let grown = try rss(server.pid) - before
        #expect(grown < 64 << 20, "serve grew by \(grown >> 20) MiB with 31 unread streams")
        // A 32nd, once the server has answered it (its headers arrive), leaves no room. (If it
        // came while a request of this test still held the slot, it was refused: ask again.)
        var answered = ""
        for _ in 0..<10 where answered != "HTTP/1.1 200" {
            if !answered.isEmpty { close(sockets.removeLast()) }
            try follow()
            answered = try await BlockingPool.shared.run { [fd = sockets[sockets.count - 1]] () -> String in
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&poller, 1, 60_000) == 1 else { return "" }
                var head = [UInt8](repeating: 0, count: 12)
                let n = read(fd, &head, 12)
                return String(decoding: head.prefix(max(0, n)), as: UTF8.self)
            }
        }
        #expect(answered == "HTTP/1.1 200", "\(answered)")
        var refused = 0
        for _ in 0..<300 where refused != 429 {
            refused = try await server.request("GET", "/v1/operations/\(op)/events").status
            if refused != 429 { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(refused == 429)
        #expect(try await server.request("DELETE", "/v1/operations/\(op)").status < 300)
        for fd in sockets { close(fd) }
        sockets = []
        // The server notices the closed connections (its blocked writes fail) and frees the slots.
        var status = 0
        for _ in 0..<300 where status != 200 {
            status = try await server.request("GET", "/v1/operations/\(op)/events").status
            if status != 200 { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(status == 200)
    }

    @Test("a connection that sends no whole request is closed after the idle timeout")
    func halfOpen() async throws {
        let server = try await TestServer(environment: ["CONTREE_SERVE_IDLE_SECONDS=2"])
        let fd = try LoopbackHTTP.connection(port: server.port)
        defer { close(fd) }
        _ = "GET /v1/whoami HTTP/1.1\r\nHost: x\r\n".withCString { write(fd, $0, strlen($0)) }
        let closed = try await BlockingPool.shared.run { () -> Bool in
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 10_000) == 1 else { return false }
            var byte: UInt8 = 0
            return read(fd, &byte, 1) <= 0
        }
        #expect(closed)
    }

    /// Resident memory of a process, in bytes.
    func rss(_ pid: pid_t) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
    }
}

@Suite("serve: request bodies mean one thing", .requiresRoot)
struct DuplicateKeyTests {
    @Test(
        "a body that names a key twice, escaped or not, is refused",
        arguments: [
            #"{"command":"true","image":"busybox","command":"id"}"#,
            #"{"command":"true","image":"busybox","env":{"A":"1","\u0041":"2"}}"#,
        ])
    func duplicates(_ body: String) async throws {
        let server = try await TestServer()
        let reply = try await server.request("POST", "/v1/instances", json: body)
        #expect(reply.status == 400)
        #expect(try reply.errorMessage().contains("twice"))
    }
}
