// contree-bench scale: how cost grows. Pipelines of 10 to 5,000 nodes (a chain, and a matrix
// fan-out), cold and fully cached, with `plan` and `validate` of the same files; a store holding
// 1,000 to 100,000 images (exec, image ls, gc, fsck --quick, the API's image list); 1 to 64
// pipeline runs at once on one store. Each row prints the total and the cost per unit, and each
// curve the ratio of its largest size's per-unit cost to its smallest's (goal: within 1.5x).
import ContreeTestSupport
import Foundation
import Glibc
import ImageStore
import Sandbox
import SystemSupport

struct ScaleBench {
    let home: String
    let rounds: Int
    let cli: String
    let sizes: [Int]
    let imageCounts: [Int]
    let concurrency: [Int]
    let parts: Set<String>
    var work: String { home + "/scale-bench" }

    func environment(home: String) -> [String] {
        ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=\(home)", "CONTREE_MAX_MATRIX=10000"]
    }

    func chain(_ n: Int, salt: String) -> String {
        var yaml = "name: chain\nimage: busybox\nenv: {SALT: \(salt)}\nsteps:\n"
        for i in 1...n { yaml += "  - id: s\(i)\n    run: echo \(i) > f\(i % 50)\n" }
        return yaml
    }

    func fanout(_ n: Int, salt: String) -> String {
        """
        name: fanout
        image: busybox
        env: {SALT: \(salt)}
        steps:
          - id: base
            run: echo base > base
          - id: test
            matrix:
              i: [\((1...n).map(String.init).joined(separator: ", "))]
            run: echo ${{ matrix.i }} > out

        """
    }

    /// Median of `runs` timed CLI calls.
    func timedCLI(_ args: [String], env: [String], runs: Int) throws -> Double {
        var times: [Double] = []
        for _ in 0..<runs {
            let start = now()
            let result = try ChildProcess.run([cli] + args, environment: env)
            times.append(now() - start)
            guard result.succeeded else {
                throw SandboxError(
                    .childProcess, "\(args.joined(separator: " ")) failed: \(result.stderrText.suffix(400))")
            }
        }
        return median(times)
    }

    static func row(_ name: String, _ cells: [String]) -> String {
        pad(name, 34) + cells.map { pad($0, 14) }.joined()
    }

    static func perUnit(_ seconds: Double, _ n: Int) -> String {
        let each = seconds / Double(n)
        return each >= 0.001 ? String(format: "%.2f ms", each * 1000) : String(format: "%.1f us", each * 1e6)
    }

    /// The curve's verdict: largest size's per-unit cost over the smallest's.
    static func flatness(_ name: String, _ points: [(n: Int, seconds: Double)]) -> String {
        guard let first = points.first, let last = points.last, first.n != last.n else { return "" }
        let ratio = (last.seconds / Double(last.n)) / (first.seconds / Double(first.n))
        return String(format: "%@: per-unit cost at %d / at %d = %.2f", name, last.n, first.n, ratio)
            + (ratio <= 1.5 ? " (flat: met)" : " (goal <= 1.5: MISSED)")
    }

    func measure() async throws {
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        if parts.contains("pipelines") { try pipelines() }
        if parts.contains("store") { try await store() }
        if parts.contains("concurrent") { try await concurrentRuns() }
    }

    // MARK: Pipelines of 10 to 5,000 nodes

    func pipelines() throws {
        let home = work + "/pipelines-home"
        let env = environment(home: home)
        _ = try runPipeline(
            chain(2, salt: "warm"), file: work + "/warm.yaml", out: work + "/out-warm", cli: cli, env: env)
        print("== pipelines of N nodes on busybox, CLI end to end (medians; rounds per size in brackets) ==")
        print(Self.row("", ["N", "cold", "per node", "cached", "per node", "plan", "validate"]))
        for shape in ["chain", "fan-out"] {
            var cold: [(Int, Double)] = []
            var cached: [(Int, Double)] = []
            var plans: [(Int, Double)] = []
            for n in sizes {
                let rounds = n >= 5000 ? 1 : self.rounds
                var colds: [Double] = []
                var hits: [Double] = []
                var planTimes: [Double] = []
                var validateTimes: [Double] = []
                for _ in 0..<rounds {
                    let salt = String(UUID().uuidString.prefix(8))
                    let yaml = shape == "chain" ? chain(n, salt: salt) : fanout(n, salt: salt)
                    let nodes = shape == "chain" ? n : n + 1
                    let file = work + "/\(shape)-\(n).yaml"
                    let out = work + "/out-\(shape)-\(n)"
                    let first = try runPipeline(yaml, file: file, out: out, cli: cli, env: env)
                    let second = try runPipeline(yaml, file: file, out: out, cli: cli, env: env)
                    guard first.steps == nodes, first.hits == 0, second.hits == nodes else {
                        throw SandboxError(
                            .childProcess,
                            "\(shape) of \(n): \(first.steps) steps, \(first.hits) then \(second.hits) hits; expected \(nodes), 0, \(nodes)"
                        )
                    }
                    colds.append(first.seconds)
                    hits.append(second.seconds)
                    planTimes.append(try timedCLI(["plan", file], env: env, runs: 1))
                    validateTimes.append(try timedCLI(["validate", file], env: env, runs: 1))
                    try? FileManager.default.removeItem(atPath: out)
                }
                let nodes = shape == "chain" ? n : n + 1
                let (c, h, p, v) = (median(colds), median(hits), median(planTimes), median(validateTimes))
                cold.append((nodes, c))
                cached.append((nodes, h))
                plans.append((nodes, p))
                print(
                    Self.row(
                        "\(shape) [\(rounds)]",
                        [
                            "\(nodes)", ms(c), Self.perUnit(c, nodes), ms(h), Self.perUnit(h, nodes), ms(p), ms(v),
                        ]))
            }
            print("  " + Self.flatness("\(shape) cold", cold))
            print("  " + Self.flatness("\(shape) cached", cached))
            print("  " + Self.flatness("\(shape) plan", plans))
        }
        // The store keeps every snapshot; the next curve starts from a store of its own.
        try? FileManager.default.removeItem(atPath: home)
    }

    // MARK: A store of 1,000 to 100,000 images

    func store() async throws {
        let home = work + "/store-home"
        try? FileManager.default.removeItem(atPath: home)
        let env = environment(home: home)
        let store = try Store(root: home)
        let busybox = try BaseImages(store: store).resolve("busybox")
        let token = "scale-" + String(repeating: "0123456789abcdef", count: 2)
        let tokens = work + "/tokens"
        try FileSystem.writeFile(tokens, Array("scale \(token)\n".utf8), mode: 0o600)
        // The API's own tables exist once serve has started on the store.
        try await ServeProcess.start(binary: cli, tokens: tokens, environment: env).stop()

        print("\n== a store of N images (a tree over busybox; every 10th tagged, all in one API namespace) ==")
        print(
            Self.row(
                "", ["N", "exec true", "image ls", "per image", "gc", "per image", "fsck --quick", "per image"]))
        var uuids = [busybox.uuid]
        var rng = SystemRandomNumberGenerator()
        var ls: [(Int, Double)] = []
        var gc: [(Int, Double)] = []
        var fsck: [(Int, Double)] = []
        var exec: [(Int, Double)] = []
        var api: [(Int, Double, Double)] = []
        for target in imageCounts {
            // Images added in batches of one transaction each (a stack over the same layers).
            let start = now()
            while uuids.count < target {
                let batch = min(1000, target - uuids.count)
                let made: [String] = try store.database.transaction { tx in
                    var made: [String] = []
                    for _ in 0..<batch {
                        let parent = uuids[Int.random(in: 0..<uuids.count, using: &rng)]
                        let uuid = UUID().uuidString.lowercased()
                        // What Snapshotter.stack writes, in batches (one transaction per image
                        // would make filling 100,000 images take minutes of fsync).
                        _ = try tx.query(
                            "INSERT INTO images(uuid, parent, config, size, created, origin) SELECT ?, uuid, config, size, ?, 'scale-bench' FROM images WHERE uuid = ?",
                            [.text(uuid), .real(Date().timeIntervalSince1970), .text(parent)])
                        _ = try tx.query(
                            "INSERT INTO image_layers(image, position, layer) SELECT ?, position, layer FROM image_layers WHERE image = ?",
                            [.text(uuid), .text(parent)])
                        _ = try tx.query(
                            "INSERT INTO api_images(namespace, image, operation, created) VALUES('scale', ?, NULL, ?)",
                            [.text(uuid), .real(Date().timeIntervalSince1970)])
                        made.append(uuid)
                    }
                    return made
                }
                for (i, uuid) in made.enumerated() where (uuids.count + i) % 10 == 0 {
                    try store.tag("scale/\(uuids.count + i)", image: uuid)
                }
                uuids += made
            }
            let filled = now() - start
            let n = uuids.count
            let execTime = try timedCLI(["exec", "--image", "busybox", "--", "true"], env: env, runs: 7)
            let lsTime = try timedCLI(["image", "ls"], env: env, runs: 3)
            let gcTime = try timedCLI(["gc"], env: env, runs: 3)
            let fsckTime = try timedCLI(["fsck", "--quick"], env: env, runs: 3)
            let server = try await ServeProcess.start(binary: cli, tokens: tokens, environment: env)
            var firstPages: [Double] = []
            var lastPages: [Double] = []
            for _ in 0..<3 {
                for (offset, into) in [(0, true), (max(0, n - 100), false)] {
                    let begin = now()
                    let reply = try LoopbackHTTP.exchange(
                        port: server.port, method: "GET", path: "/v1/images?limit=100&offset=\(offset)", token: token)
                    let seconds = now() - begin
                    guard reply.status == 200, reply.text.contains("\"uuid\"") else {
                        throw SandboxError(
                            .childProcess, "GET /v1/images answered \(reply.status): \(reply.text.prefix(300))")
                    }
                    if into { firstPages.append(seconds) } else { lastPages.append(seconds) }
                }
            }
            try await server.stop()
            ls.append((n, lsTime))
            gc.append((n, gcTime))
            fsck.append((n, fsckTime))
            exec.append((n, execTime))
            api.append((n, median(firstPages), median(lastPages)))
            print(
                Self.row(
                    "store [filled in \(String(format: "%.1f", filled)) s]",
                    [
                        "\(n)", ms(execTime), ms(lsTime), Self.perUnit(lsTime, n), ms(gcTime), Self.perUnit(gcTime, n),
                        ms(fsckTime), Self.perUnit(fsckTime, n),
                    ]))
        }
        print(Self.row("", ["N", "API page 1", "API last page"]))
        for (n, first, last) in api { print(Self.row("GET /v1/images?limit=100", ["\(n)", ms(first), ms(last)])) }
        print("  " + Self.flatness("image ls", ls))
        print("  " + Self.flatness("gc", gc))
        print("  " + Self.flatness("fsck --quick", fsck))
        if let first = exec.first, let last = exec.last {
            print(
                String(
                    format: "  exec at %d images / at %d: %.2f (goal <= 1.5)%@", last.0, first.0, last.1 / first.1,
                    last.1 / first.1 <= 1.5 ? " met" : " MISSED"))
        }
        if let first = api.first, let last = api.last {
            print(
                String(
                    format: "  API first page of 100 at %d images / at %d: %.2f (goal <= 1.5)%@", last.0, first.0,
                    last.1 / first.1, last.1 / first.1 <= 1.5 ? " met" : " MISSED"))
            print("  (a page at offset N - 100 walks N entries of the index: offset paging, linear by nature)")
        }
        try? FileManager.default.removeItem(atPath: home)
    }

    // MARK: 1 to 64 runs at once on one store

    func concurrentRuns() async throws {
        let home = work + "/concurrent-home"
        try? FileManager.default.removeItem(atPath: home)
        let env = environment(home: home)
        _ = try runPipeline(
            chain(2, salt: "warm"), file: work + "/warm.yaml", out: work + "/out-warm", cli: cli, env: env)
        let steps = 5
        print(
            "\n== K pipeline runs at once on one store (each a cold \(steps)-step chain of its own), CLI processes ==")
        print(Self.row("", ["K", "wall", "per run", "steps/s", "failed"]))
        var points: [(Int, Double)] = []
        for k in concurrency {
            var walls: [Double] = []
            var failures = 0
            for _ in 0..<rounds {
                let salt = String(UUID().uuidString.prefix(6))
                let start = now()
                let results = try await withThrowingTaskGroup(of: Bool.self) { group in
                    for i in 0..<k {
                        group.addTask {
                            try await BlockingPool.shared.run {
                                let yaml = chain(steps, salt: "\(salt)-\(i)")
                                let file = work + "/concurrent-\(i).yaml"
                                try yaml.write(toFile: file, atomically: true, encoding: .utf8)
                                let result = try ChildProcess.run(
                                    [cli, "run", file, "--out", work + "/out-concurrent-\(i)"], environment: env)
                                if !result.succeeded {
                                    FileHandle.standardError.write(
                                        Data("run \(i) of \(k) failed: \(result.stderrText.suffix(600))\n".utf8))
                                }
                                return result.succeeded
                            }
                        }
                    }
                    var all: [Bool] = []
                    for try await ok in group { all.append(ok) }
                    return all
                }
                walls.append(now() - start)
                failures += results.filter { !$0 }.count
            }
            let wall = median(walls)
            points.append((k, wall))
            print(
                Self.row(
                    "runs at once [\(rounds)]",
                    [
                        "\(k)", ms(wall), Self.perUnit(wall, k), String(format: "%.0f", Double(k * steps) / wall),
                        "\(failures)",
                    ]))
        }
        print("  " + Self.flatness("wall per run", points))
        try? FileManager.default.removeItem(atPath: home)
    }
}
