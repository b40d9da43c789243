// contree-bench memory: memory snapshots against the cold path, per guest memory size.
//
// The state: a guest that loaded a dataset (random bytes, a quarter of its memory, in /dev/shm)
// and indexed it (its md5), then serves the index on 127.0.0.1:7000. For each size, side by side:
//   cold      boot a VM (no template: CONTREE_VM_COLD=1) and warm up until the index is ready
//   started   `sandbox start` (restored from a template) and warm up until the first answer
//   snapshot  `sandbox snapshot` of that warm sandbox
//   fork N    `sandbox fork IMAGE --count N`, then an answer from each child (ready)
//   resumed   one child forked and answering: the figure against `cold` (goal < 0.1x)
// and the memory each child adds (PSS of its QEMU, and its private pages) right after it
// answers and after it wrote 32 MiB more (goal: proportional to what it writes, not to the
// guest's size). Under TCG here: KVM cannot run Debian's kernel on this machine kind.
import Foundation
import Glibc
import SystemSupport

struct MemoryBench {
    let home: String
    let rounds: Int
    let cli: String
    let sizes: [Int]
    let forks: Int

    var env: [String] {
        ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=\(home)"]
    }

    /// The warm-up: load, index, then serve the index (or exit, for the cold path's clock).
    func warmUp(mib: Int, serve: Bool) -> String {
        let load = "head -c \(mib / 4)m /dev/urandom > /dev/shm/data && md5sum /dev/shm/data | cut -c1-32 > /index"
        return serve ? load + "; while true; do nc -l -p 7000 < /index; done" : load + " && cat /index"
    }

    static let ask = "for t in $(seq 600); do nc 127.0.0.1 7000 </dev/null && exit 0; sleep 0.1; done; exit 1"

    func cliOutput(_ arguments: [String], extraEnv: [String] = []) throws -> String {
        let result = try ChildProcess.run([cli] + arguments, environment: env + extraEnv)
        guard result.succeeded else {
            throw SandboxError(
                .childProcess, "contree-pipeline \(arguments.joined(separator: " ")) failed: \(result.stderrText)")
        }
        return String(decoding: result.stdout, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// PSS and private (dirty) memory of a live sandbox's QEMU, in MiB.
    func memory(of id: String) throws -> (pss: Double, privateDirty: Double) {
        let list = try cliOutput(["sandbox", "ls", "--json"])
        let entries = try JSONSerialization.jsonObject(with: Data(list.utf8)) as? [[String: Any]] ?? []
        guard
            let entry = entries.first(where: { ($0["sandbox"] as? [String: Any])?["id"] as? String == id }),
            let pid = (entry["sandbox"] as? [String: Any])?["pid"] as? Int
        else { throw SandboxError(.notFound, "sandbox \(id) is not listed") }
        let rollup = String(decoding: try FileSystem.readFile("/proc/\(pid)/smaps_rollup"), as: UTF8.self)
        func field(_ name: String) -> Double {
            for line in rollup.split(separator: "\n") where line.hasPrefix(name + ":") {
                return Double(line.split(separator: " ").dropFirst().first ?? "0").map { $0 / 1024 } ?? 0
            }
            return 0
        }
        return (field("Pss"), field("Private_Dirty"))
    }

    func measure() async throws {
        try FileSystem.makeDirectories(home)
        _ = try cliOutput(["exec", "--isolation", "vm", "--disposable", "--", "true"])  // kit, template: not measured
        _ = try cliOutput(["sandbox", "stop", "--all"])
        print(
            "Memory snapshots (VM backend under TCG), medians of \(rounds); the state: a quarter of the guest's memory loaded and indexed, served on loopback"
        )
        let columns: [(String, Int)] = [
            ("guest", 8), ("cold boot+warm-up", 19), ("start+warm-up", 15), ("snapshot", 10),
            ("fork \(forks)+ready", 15), ("resumed ready", 15), ("resumed/cold", 14), ("child PSS", 11),
            ("child private", 15),
        ]
        print(columns.map { pad($0.0, $0.1) }.joined() + "after writing 32 MiB (PSS / private)")
        for mib in sizes {
            var cold: [Double] = []
            var started: [Double] = []
            var snapshots: [Double] = []
            var forked: [Double] = []
            var resumed: [Double] = []
            var pss: [Double] = []
            var privateDirty: [Double] = []
            var written: [(Double, Double)] = []
            for _ in 0..<rounds {
                cold.append(
                    try timed(
                        [
                            cli, "exec", "--isolation", "vm", "--memory", "\(mib)m", "--disposable", "--", "sh", "-c",
                            warmUp(mib: mib, serve: false),
                        ], env: env + ["CONTREE_VM_COLD=1"]))
                var clock = now()
                let id = try cliOutput(
                    ["sandbox", "start", "--memory", "\(mib)m", "--", "sh", "-c", warmUp(mib: mib, serve: true)])
                _ = try cliOutput(["sandbox", "exec", id, "--", "sh", "-c", MemoryBench.ask])
                started.append(now() - clock)
                clock = now()
                let image = try cliOutput(["sandbox", "snapshot", id])
                snapshots.append(now() - clock)
                _ = try cliOutput(["sandbox", "stop", id])

                clock = now()
                let one = try cliOutput(["sandbox", "fork", image])
                _ = try cliOutput(["sandbox", "exec", one, "--", "sh", "-c", MemoryBench.ask])
                resumed.append(now() - clock)
                clock = now()
                let children = try cliOutput(["sandbox", "fork", image, "--count", "\(forks)"]).split(separator: "\n")
                    .map(String.init)
                for child in children {
                    _ = try cliOutput(["sandbox", "exec", child, "--", "sh", "-c", MemoryBench.ask])
                }
                forked.append(now() - clock)
                for child in children {
                    let used = try memory(of: child)
                    pss.append(used.pss)
                    privateDirty.append(used.privateDirty)
                }
                _ = try cliOutput([
                    "sandbox", "exec", children[0], "--", "sh", "-c", "head -c 32m /dev/urandom > /dev/shm/more",
                ])
                written.append(try memory(of: children[0]))
                _ = try cliOutput(["sandbox", "stop", "--all"])
                _ = try cliOutput(["image", "rm", image])
            }
            let ratio = median(resumed) / median(cold)
            let cells: [(String, Int)] = [
                ("\(mib) MiB", 8), (ms(median(cold)), 19), (ms(median(started)), 15), (ms(median(snapshots)), 10),
                (ms(median(forked)), 15), (ms(median(resumed)), 15),
                (String(format: "%.3f", ratio) + (ratio < 0.1 ? " ✔" : " ✘"), 14),
                (String(format: "%.1f MiB", median(pss)), 11), (String(format: "%.1f MiB", median(privateDirty)), 15),
            ]
            let after = String(format: "%.1f / %.1f MiB", median(written.map(\.0)), median(written.map(\.1)))
            print(cells.map { pad($0.0, $0.1) }.joined() + after)
        }
        print("goal: a resumed child ready in under 0.1x of the cold path; a child's memory grows with what it writes")
    }
}
