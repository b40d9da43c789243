// contree-bench loop: the everyday CI loop's new machinery against what it replaces, in one run:
// a 100-instance matrix expanded while the pipeline runs (fromJSON of a step's output) against
// the same matrix written out, cold and fully cached; and `run --verify` of the 20-step chain
// (every step run again from its recorded parent and compared) against the chain's cold run.
import Foundation
import Glibc
import SystemSupport

struct LoopBench {
    let home: String
    let rounds: Int
    let cli: String
    let env: [String]
    var work: String { home + "/loop-bench" }
    static let instances = 100

    func matrix(salt: String, dynamic: Bool) -> String {
        let names = (1...LoopBench.instances).map { "p\($0)" }
        let list = "[" + names.map { "\"\($0)\"" }.joined(separator: ",") + "]"
        let axis = dynamic ? "${{ fromJSON(steps.discover.outputs.pkgs) }}" : "[" + names.joined(separator: ", ") + "]"
        return """
            name: bench-matrix
            image: busybox
            env: {SALT: \(salt)}
            steps:
              - id: discover
                run: echo 'pkgs=\(list)' >> $CONTREE_OUTPUT
              - id: test
                matrix:
                  pkg: \(axis)
                run: echo ${{ matrix.pkg }} > out

            """
    }

    func chain(salt: String) -> String {
        var yaml = "name: bench-linear\nimage: busybox\nenv: {SALT: \(salt)}\nsteps:\n"
        for i in 1...20 { yaml += "  - id: s\(i)\n    run: echo \(i) > f\(i)\n" }
        return yaml
    }

    func run(_ yaml: String, name: String, extra: [String] = []) throws -> (seconds: Double, steps: Int, hits: Int) {
        try runPipeline(
            yaml, file: work + "/" + name + ".yaml", out: work + "/out-" + name, cli: cli, env: env, extra: extra)
    }

    func measure() async throws {
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        _ = try run(chain(salt: "warm-up"), name: "warm-up")  // the base image, built once
        var rows: [String: [Double]] = [:]
        for round in 0..<rounds {
            // Alternate which goes first: a noisy neighbour favours neither.
            for dynamic in round % 2 == 0 ? [true, false] : [false, true] {
                let salt = UUID().uuidString.prefix(8) + (dynamic ? "d" : "s")
                let name = dynamic ? "dynamic" : "static"
                let cold = try run(matrix(salt: String(salt), dynamic: dynamic), name: name)
                let cached = try run(matrix(salt: String(salt), dynamic: dynamic), name: name)
                guard cold.steps == LoopBench.instances + 1, cold.hits == 0, cached.hits == cold.steps else {
                    throw SandboxError(
                        .childProcess,
                        "\(name): \(cold.steps) steps, \(cold.hits)/\(cached.hits) hits: not what was meant")
                }
                rows["\(name) matrix cold", default: []].append(cold.seconds)
                rows["\(name) matrix cached", default: []].append(cached.seconds)
            }
            let salt = String(UUID().uuidString.prefix(8))
            let cold = try run(chain(salt: salt), name: "chain")
            let verified = try run(chain(salt: salt), name: "chain", extra: ["--verify"])
            guard cold.hits == 0, verified.hits == 20 else {
                throw SandboxError(.childProcess, "chain: \(cold.hits)/\(verified.hits) hits: not what was meant")
            }
            rows["20-step chain cold", default: []].append(cold.seconds)
            rows["20-step chain run --verify", default: []].append(verified.seconds)
        }
        print("== the everyday loop, CLI end to end on busybox, medians of \(rounds) rounds ==")
        let names = [
            "dynamic matrix cold", "static matrix cold", "dynamic matrix cached", "static matrix cached",
            "20-step chain cold", "20-step chain run --verify",
        ]
        for name in names { print(pad(name, 34) + ms(median(rows[name]!))) }
        func ratio(_ a: String, _ b: String) -> Double { median(rows[a]!) / median(rows[b]!) }
        let coldRatio = ratio("dynamic matrix cold", "static matrix cold")
        let cachedRatio = ratio("dynamic matrix cached", "static matrix cached")
        print(
            String(
                format: "ratio dynamic / static, %d instances: cold %.3f, cached %.3f (target <= 1.10: %@)",
                LoopBench.instances, coldRatio, cachedRatio, coldRatio <= 1.1 && cachedRatio <= 1.1 ? "met" : "MISSED"))
        print(
            String(
                format: "ratio run --verify / cold run, 20-step chain: %.3f (every step run again and compared)",
                ratio("20-step chain run --verify", "20-step chain cold")))
    }
}
