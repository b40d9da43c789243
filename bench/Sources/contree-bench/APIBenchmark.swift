// contree-bench api: 50 concurrent spawns of `true` from one image through `serve`'s REST API
// (POST /v1/instances, then the event stream to `completion`), then a burst of
// GET /v1/operations/{id}; next to the same 50 runs made with `contree-pipeline exec`, in the
// same run, so the API's overhead is a ratio; and the engine in this process, for what HTTP,
// the event log and the operation records add.
import ContreeTestSupport
import Foundation
import Glibc
import ImageStore
import Sandbox
import SystemSupport

struct APIBench {
    let home: String
    let cli: String
    let concurrency: Int
    let rounds: Int
    let token = "bench-" + String(repeating: "0123456789abcdef", count: 2)

    func measure() async throws {
        let store = home + "/api-bench"
        try? FileSystem.removeTree(store)
        try FileSystem.makeDirectories(store)
        let tokens = store + "/tokens"
        try FileSystem.writeFile(
            tokens, Array("bench \(token) max_concurrency=\(concurrency) max_timeout=600\n".utf8), mode: 0o600)
        let env =
            ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=\(store)"]
        let server = try await ServeProcess.start(binary: cli, tokens: tokens, environment: env)
        do {
            try await measure(port: server.port, env: env)
        } catch {
            try? await server.stop()
            throw error
        }
        try await server.stop()
    }

    func measure(port: Int, env: [String]) async throws {
        print(
            "API: \(concurrency) concurrent spawns of `true` on busybox, \(rounds) rounds (serve on 127.0.0.1:\(port))")

        let body = Array(#"{"command":"true","image":"busybox","disposable":true,"timeout":60}"#.utf8)
        let token = self.token
        // One spawn: POST, then follow the events to completion.
        @Sendable func spawnAndWait() throws -> (seconds: Double, operation: String?) {
            let start = now()
            let reply = try LoopbackHTTP.exchange(
                port: port, method: "POST", path: "/v1/instances", token: token, body: body,
                headers: ["Content-Type": "application/json"])
            guard reply.status == 201, let uuid = Self.uuid(reply.text) else {
                FileHandle.standardError.write(Data("spawn: \(reply.status) \(reply.text)\n".utf8))
                return (now() - start, nil)
            }
            let events = try LoopbackHTTP.exchange(
                port: port, method: "GET", path: "/v1/operations/\(uuid)/events?follow=1", token: token)
            guard events.text.contains(#""type":"completion""#), events.text.contains(#""status":"SUCCESS""#) else {
                FileHandle.standardError.write(
                    Data("events of \(uuid): \(events.status) \(events.text.suffix(600))\n".utf8))
                return (now() - start, nil)
            }
            return (now() - start, uuid)
        }
        _ = try await BlockingPool.shared.run { try spawnAndWait() }  // warm-up

        var apiLatencies: [Double] = []
        var apiWalls: [Double] = []
        var execLatencies: [Double] = []
        var execWalls: [Double] = []
        var engineLatencies: [Double] = []
        var engineWalls: [Double] = []
        // The engine itself, in this process, on a store of its own: what the API adds to a run.
        let engineStore = home + "/api-bench-engine"
        try? FileSystem.removeTree(engineStore)
        let engine = SandboxEngine(store: try Store(root: engineStore))
        _ = try await engine.run(RunSpec(command: ["true"], disposable: true))
        var errors = 0
        var operations: [String] = []
        let execArgv = [cli, "exec", "--disposable", "--image", "busybox", "--", "true"]
        for _ in 0..<rounds {
            let started = now()
            let results = try await concurrently(concurrency) { _ in try spawnAndWait() }
            apiWalls.append(now() - started)
            for result in results {
                apiLatencies.append(result.seconds)
                if let operation = result.operation { operations.append(operation) } else { errors += 1 }
            }
            let execStarted = now()
            let execResults = try await concurrently(concurrency) { _ in
                let start = now()
                let status = try ChildProcess.run(execArgv, environment: env).status
                return (now() - start, status)
            }
            execWalls.append(now() - execStarted)
            let engineStarted = now()
            let engineResults = try await withThrowingTaskGroup(of: (Double, Int32?).self) { group in
                for _ in 0..<concurrency {
                    group.addTask {
                        let start = now()
                        let result = try await engine.run(RunSpec(command: ["true"], disposable: true))
                        return (now() - start, result.record.exitCode)
                    }
                }
                var results: [(Double, Int32?)] = []
                for try await result in group { results.append(result) }
                return results
            }
            engineWalls.append(now() - engineStarted)
            for (seconds, code) in engineResults {
                engineLatencies.append(seconds)
                if code != 0 { errors += 1 }
            }
            for (seconds, status) in execResults {
                execLatencies.append(seconds)
                if status != 0 {
                    FileHandle.standardError.write(Data("exec exited \(status)\n".utf8))
                    errors += 1
                }
            }
        }

        // A burst of status reads: every operation, from `concurrency` clients at once.
        let ids = Array(operations.prefix(concurrency))
        let burstStarted = now()
        let reads = try await concurrently(concurrency) { i -> [(Double, Bool)] in
            var out: [(Double, Bool)] = []
            for j in 0..<20 {
                let start = now()
                let reply = try LoopbackHTTP.exchange(
                    port: port, method: "GET", path: "/v1/operations/\(ids[(i + j) % ids.count])", token: token)
                out.append((now() - start, reply.status == 200 && reply.text.contains(#""status":"SUCCESS""#)))
            }
            return out
        }.flatMap { $0 }
        let burstWall = now() - burstStarted
        let failedReads = reads.filter { !$0.1 }.count
        if failedReads > 0 { FileHandle.standardError.write(Data("\(failedReads) status reads failed\n".utf8)) }
        errors += failedReads

        let total = Double(concurrency * rounds)
        let apiRate = total / apiWalls.reduce(0, +)
        let execRate = total / execWalls.reduce(0, +)
        let engineRate = total / engineWalls.reduce(0, +)
        print(
            pad("spawn to completion, API", 34)
                + "p50 \(ms(median(apiLatencies)))  p99 \(ms(percentile(apiLatencies, 0.99)))  "
                + String(format: "%.1f runs/s", apiRate))
        print(
            pad("same runs, contree-pipeline exec", 34)
                + "p50 \(ms(median(execLatencies)))  p99 \(ms(percentile(execLatencies, 0.99)))  "
                + String(format: "%.1f runs/s", execRate))
        print(
            pad("ratio API / exec", 34)
                + String(
                    format: "p50 %.2f  p99 %.2f  throughput %.2f", median(apiLatencies) / median(execLatencies),
                    percentile(apiLatencies, 0.99) / percentile(execLatencies, 0.99), apiRate / execRate))
        print(
            pad("same runs, engine in process", 34)
                + "p50 \(ms(median(engineLatencies)))  p99 \(ms(percentile(engineLatencies, 0.99)))  "
                + String(format: "%.1f runs/s", engineRate))
        print(pad("ratio API / engine", 34) + String(format: "throughput %.2f", apiRate / engineRate))
        Summary.record(.apiThroughput, apiRate, peer: engineRate)
        let readLatencies = reads.map(\.0)
        print(
            pad("GET /operations/{id} burst", 34)
                + "p50 \(ms(median(readLatencies)))  p99 \(ms(percentile(readLatencies, 0.99)))  "
                + String(format: "%.0f req/s (%d requests)", Double(reads.count) / burstWall, reads.count))
        print(pad("errors", 34) + "\(errors)")
        if errors > 0 { throw LoopbackHTTP.Failure("\(errors) requests or runs failed") }
    }

    static func uuid(_ text: String) -> String? {
        guard let range = text.range(of: #""uuid":""#) else { return nil }
        return String(text[range.upperBound...].prefix(36))
    }

    /// Runs `count` copies of `body` at once, each on a thread of its own.
    func concurrently<T: Sendable>(_ count: Int, _ body: @escaping @Sendable (Int) throws -> T) async throws -> [T] {
        try await withThrowingTaskGroup(of: T.self) { group in
            for i in 0..<count { group.addTask { try await BlockingPool.shared.run { try body(i) } } }
            var results: [T] = []
            for try await result in group { results.append(result) }
            return results
        }
    }
}
