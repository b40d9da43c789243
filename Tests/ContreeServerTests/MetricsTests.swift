import ContreeTestSupport
import Foundation
import Glibc
import SystemSupport
import Testing

/// `serve --metrics`: Prometheus text at /metrics, scraped by Debian's own `prometheus`.
@Suite(
    "serve --metrics", .requiresRoot,
    .enabled(if: FileManager.default.fileExists(atPath: "/usr/bin/prometheus"), "scripts/setup installs prometheus"))
struct MetricsTests {
    @Test("Debian's prometheus scrapes /metrics on loopback, and PromQL answers from what serve did")
    func scraped() async throws {
        let server = try await TestServer(arguments: ["--metrics"])
        for command in ["echo fine", "exit 3"] {
            _ = try await server.wait(
                try await server.spawn(#"{"command":"\#(command)","image":"busybox","shell":true}"#))
        }
        let page = try await server.request("GET", "/metrics", token: nil)
        #expect(page.status == 200)
        let text = page.text
        #expect(text.contains("# TYPE contree_instance_duration_seconds histogram"))
        #expect(
            text.contains(#"contree_operations{kind="instance",namespace="alice",status="SUCCESS"} 2"#), "\(text)"
        )
        #expect(text.contains(#"contree_instance_duration_seconds_count{namespace="alice"} 2"#))
        #expect(text.contains(#"contree_instance_duration_seconds_bucket{le="+Inf",namespace="alice"} 2"#))
        #expect(text.contains(#"contree_queue_depth{namespace="bob"} 0"#))
        #expect(text.contains("contree_store_bytes "))
        // The API itself still wants its token.
        #expect(try await server.request("GET", "/v1/whoami", token: nil).status == 401)

        let dir = "/tmp/contree-prometheus-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir + "/data", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try """
        global:
          scrape_interval: 1s
        scrape_configs:
          - job_name: contree
            static_configs:
              - targets: ["127.0.0.1:\(server.port)"]
        """.write(toFile: dir + "/prometheus.yml", atomically: true, encoding: .utf8)
        let port = freeLoopbackPort()
        let prometheus = try ChildProcess.spawn(
            [
                "/bin/sh", "-c",
                "exec /usr/bin/prometheus --config.file=\"$0/prometheus.yml\" --storage.tsdb.path=\"$0/data\" --web.listen-address=127.0.0.1:$1 >\"$0/log\" 2>&1",
                dir, String(port),
            ], captureStdout: false)
        defer {
            kill(prometheus.pid, SIGTERM)
            _ = try? ChildProcess.wait(prometheus.pid, "prometheus")
            close(prometheus.stderr)
        }
        #expect(waitForLoopbackPort(port, process: prometheus.pid, seconds: 60))

        /// The value of each sample a PromQL query answers with.
        @Sendable func query(_ promQL: String) throws -> [String] {
            let encoded = promQL.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? promQL
            let reply = try LoopbackHTTP.exchange(port: port, method: "GET", path: "/api/v1/query?query=" + encoded)
            // Until it is ready, Prometheus answers 503 with text.
            let json = (try? JSONSerialization.jsonObject(with: Data(reply.body))) as? [String: Any]
            let samples = (json?["data"] as? [String: Any])?["result"] as? [[String: Any]] ?? []
            return samples.compactMap { ($0["value"] as? [Any])?.last as? String }
        }
        // Scraped every second: up within a minute on a loaded machine.
        var up: [String] = []
        for _ in 0..<120 {
            up = try await BlockingPool.shared.run { try query(#"up{job="contree"}"#) }
            if up.first == "1" { break }
            try await Task.sleep(for: .milliseconds(500))
        }
        let log = (try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? ""
        #expect(up.first == "1", "prometheus never scraped serve: \(log.suffix(2000))")
        let succeeded = try await BlockingPool.shared.run {
            try query(#"sum(contree_operations{namespace="alice",status="SUCCESS"})"#)
        }
        #expect(succeeded.first == "2")
        let median = try await BlockingPool.shared.run {
            try query(#"histogram_quantile(0.5, contree_instance_duration_seconds_bucket{namespace="alice"})"#)
        }
        let seconds = median.first.flatMap(Double.init)
        #expect(seconds != nil && seconds! > 0 && seconds! <= 60, "\(median)")
    }

    @Test("off loopback /metrics needs its own token; with one, a scrape without it is 401")
    func token() async throws {
        let home = "/tmp/contree-metrics-" + UUID().uuidString.prefix(8)
        defer { try? FileSystem.removeTree(home) }
        let refused = try await BlockingPool.shared.run {
            try ChildProcess.run(
                [Paths.cli, "serve", "--metrics", "--listen", "serve.invalid:0"],
                environment: ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_") } + [
                    "CONTREE_HOME=\(home)"
                ])
        }
        #expect(refused.status == 2)
        #expect(refused.stderrText.contains("needs --metrics-token TOKEN"), "\(refused.stderrText)")

        let secret = "metrics-0123456789abcdef"
        let server = try await TestServer(arguments: ["--metrics", "--metrics-token", secret])
        #expect(try await server.request("GET", "/metrics", token: nil).status == 401)
        #expect(try await server.request("GET", "/metrics", token: TestServer.alice).status == 401)
        let page = try await server.request("GET", "/metrics", token: secret)
        #expect(page.status == 200 && page.text.contains("contree_build_info{version="))
    }
}
