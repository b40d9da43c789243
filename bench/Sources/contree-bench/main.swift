// contree-bench: figures measured side by side with peers, in one run, on one machine.
//
//   contree-bench sandbox [--runs N] [--forks N] [--home DIR] [--skip-debian]
//   contree-bench pipeline [--runs N] [--home DIR]
//   contree-bench api [--runs N] [--home DIR]
//   contree-bench oci [--runs N] [--home DIR]
//   contree-bench network [--runs N] [--home DIR]
//   contree-bench slurm [--runs N] [--home DIR]
//   contree-bench loop [--runs N] [--home DIR]
//   contree-bench scale [--runs N] [--home DIR] [--sizes ...] [--images ...] [--concurrency ...] [--only ...]
//   contree-bench table [--runs N] [--home DIR]   (issue 16's table: sandbox, pipeline, api and oci, then the table)
//   contree-bench memory [--runs N] [--home DIR] [--sizes 256,512,1024] [--forks N]   (memory snapshots)
//
// Prints medians and ratios; the machines are shared and noisy, so ratios and medians are what
// count. Needs root, bubblewrap, and crun or runc (scripts/setup installs them).
import Foundation
import Glibc
import ImageStore
import Sandbox
import Synchronization
import SystemSupport

struct Options {
    var runs = 30
    var forks = 100
    var home = "/var/tmp/contree-bench"
    var skipDebian = false
    var sizes = [10, 100, 1000, 5000]
    var images = [1000, 10000, 100_000]
    var concurrency = [1, 2, 4, 8, 16, 32, 64]
    var parts: Set<String> = ["pipelines", "store", "concurrent"]

    /// Parses the flags after the mode; an unknown flag, or one without its value, is an error
    /// that names it (a typo must not run an hour-long benchmark with the defaults).
    init(_ args: [String]) throws(OptionError) {
        var i = 0
        func value() throws(OptionError) -> String {
            guard i + 1 < args.count else { throw OptionError("\(args[i]) needs a value") }
            i += 1
            return args[i]
        }
        func number() throws(OptionError) -> Int {
            let flag = args[i]
            let text = try value()
            guard let n = Int(text), n > 0 else { throw OptionError("\(flag) takes a positive integer, not '\(text)'") }
            return n
        }
        func numbers() throws(OptionError) -> [Int] {
            let flag = args[i]
            let text = try value()
            guard let list = Options.list(text) else {
                throw OptionError("\(flag) takes positive integers separated by commas, not '\(text)'")
            }
            return list
        }
        while i < args.count {
            switch args[i] {
            case "--runs": runs = try number()
            case "--forks": forks = try number()
            case "--home": home = try value()
            case "--skip-debian": skipDebian = true
            case "--sizes": sizes = try numbers()
            case "--images": images = try numbers()
            case "--concurrency": concurrency = try numbers()
            case "--only": parts = Set(try value().split(separator: ",").map(String.init))
            default: throw OptionError("unknown option '\(args[i])'")
            }
            i += 1
        }
    }
}

struct OptionError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

extension Options {
    /// `10,100,1000`; nil unless every item is a positive integer.
    static func list(_ text: String) -> [Int]? {
        let values = text.split(separator: ",", omittingEmptySubsequences: false).map { Int($0) }
        guard !values.isEmpty, values.allSatisfy({ ($0 ?? 0) > 0 }) else { return nil }
        return values.compactMap { $0 }
    }
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return .nan }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

func percentile(_ xs: [Double], _ p: Double) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return .nan }
    return s[min(s.count - 1, Int((Double(s.count - 1) * p).rounded()))]
}

func ms(_ seconds: Double) -> String { String(format: "%.1f ms", seconds * 1000) }

func pad(_ s: String, _ width: Int) -> String {
    s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count)
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Runs a program to completion with output discarded; returns its wall time.
func timed(_ argv: [String], env: [String]? = nil) throws -> Double {
    let start = now()
    let result = try ChildProcess.run(argv, environment: env)
    let elapsed = now() - start
    guard result.succeeded else {
        throw SandboxError(
            .childProcess, "\(argv.joined(separator: " ")) failed (\(result.status)): \(result.stderrText)")
    }
    return elapsed
}

/// Runs `contree-pipeline run FILE --out OUT --json EXTRA...` with `yaml` written to FILE; returns
/// its wall time, the steps its report lists and how many were cache hits.
func runPipeline(
    _ yaml: String, file: String, out: String, cli: String, env: [String], extra: [String] = []
) throws -> (seconds: Double, steps: Int, hits: Int) {
    try yaml.write(toFile: file, atomically: true, encoding: .utf8)
    let start = now()
    let result = try ChildProcess.run([cli, "run", file, "--out", out, "--json"] + extra, environment: env)
    let seconds = now() - start
    guard result.succeeded else { throw SandboxError(.childProcess, "pipeline \(file) failed: \(result.stderrText)") }
    let report = try JSONSerialization.jsonObject(with: Data(result.stdout)) as? [String: Any]
    let steps = report?["steps"] as? [[String: Any]] ?? []
    return (seconds, steps.count, steps.filter { $0["cached"] as? Bool == true }.count)
}

func which(_ name: String) -> String? {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] where access(dir + "/" + name, X_OK) == 0 {
        return dir + "/" + name
    }
    return nil
}

/// An OCI bundle over `rootfs` whose process is /bin/true, for crun/runc.
func ociBundle(rootfs: String, at dir: String) throws {
    try? FileManager.default.removeItem(atPath: dir)
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    let config: [String: Any] = [
        "ociVersion": "1.0.2",
        "process": [
            "terminal": false, "user": ["uid": 0, "gid": 0], "args": ["/bin/true"], "env": ["PATH=/bin"],
            "cwd": "/", "noNewPrivileges": true,
        ],
        "root": ["path": rootfs, "readonly": true],
        "hostname": "bench",
        "mounts": [
            ["destination": "/proc", "type": "proc", "source": "proc"],
            ["destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]],
        ],
        "linux": [
            "namespaces": [["type": "pid"], ["type": "network"], ["type": "ipc"], ["type": "uts"], ["type": "mount"]]
        ],
    ]
    let data = try JSONSerialization.data(withJSONObject: config)
    try data.write(to: URL(fileURLWithPath: dir + "/config.json"))
}

func sandboxBenchmark(_ options: Options) async throws {
    guard geteuid() == 0 else { throw SandboxError(.unsupported, "the benchmark needs root") }
    let store = try Store(root: options.home)
    let engine = SandboxEngine(store: store, progress: ProgressReporter())
    let busybox = try engine.baseImages.resolve("busybox")
    let cli = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        .appendingPathComponent("contree-pipeline").path
    guard FileManager.default.isExecutableFile(atPath: cli) else {
        throw SandboxError(.notFound, "\(cli) is missing: build the package first (swift build -c release)")
    }
    let env =
        ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
        + ["CONTREE_HOME=\(options.home)"]
    let rootfs = store.layerPath(busybox.layers[0])

    // 1. `true` on busybox: our CLI (run, commit, metrics, record) against bwrap and an OCI runtime.
    var peers: [(String, [String])] = []
    if let bwrap = which("bwrap") {
        peers.append(
            (
                "bwrap",
                [
                    bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", rootfs, "/", "--proc", "/proc",
                    "--dev", "/dev", "/bin/true",
                ]
            ))
    }
    let bundle = options.home + "/oci-bundle"
    try ociBundle(rootfs: rootfs, at: bundle)
    for runtime in ["crun", "runc"] {
        guard let path = which(runtime) else { continue }
        let probe = try ChildProcess.run([path, "run", "--bundle", bundle, "contree-bench-probe-\(getpid())"])
        if probe.succeeded {
            peers.append((runtime, [path, "run", "--bundle", bundle]))
            break
        }
        print("note: \(runtime) does not run on this host: \(probe.stderrText.split(separator: "\n").last ?? "")")
    }
    print("== `true` on busybox: \(options.runs) runs each, interleaved (after 3 warm-up runs) ==")
    var samples: [String: [Double]] = [:]
    let cliName = "contree-pipeline exec (CLI process)"
    let engineName = "SandboxEngine.run (in process)"
    for round in -3..<options.runs {
        let ours = try timed([cli, "exec", "--image", "busybox", "--", "true"], env: env)
        if round >= 0 { samples[cliName, default: []].append(ours) }
        let start = now()
        let run = try await engine.run(
            RunSpec(image: busybox.uuid, command: ["true"], stdout: .discard, stderr: .discard))
        guard run.record.exitCode == 0 else { throw SandboxError(.childProcess, "true failed in the sandbox") }
        if round >= 0 { samples[engineName, default: []].append(now() - start) }
        for (name, argv) in peers {
            let args = name == "bwrap" ? argv : argv + ["contree-bench-\(getpid())-\(round + 3)"]
            let t = try timed(args)
            if round >= 0 { samples[name, default: []].append(t) }
        }
    }
    print(pad("", 40) + pad("median", 12) + "p90")
    for name in [cliName, engineName] + peers.map(\.0) {
        let xs = samples[name]!
        print(pad(name, 40) + pad(ms(median(xs)), 12) + ms(percentile(xs, 0.9)))
    }
    if let bwrap = samples["bwrap"] {
        Summary.record(.execCLI, median(samples[cliName]!), peer: median(bwrap))
        Summary.record(.inProcess, median(samples[engineName]!), peer: median(bwrap))
    }
    for ours in [cliName, engineName] {
        for (name, _) in peers {
            let ratio = median(samples[ours]!) / median(samples[name]!)
            let target = name == "bwrap" ? "  (target <= 1.5: \(ratio <= 1.5 ? "met" : "MISSED"))" : ""
            print("ratio \(ours) / \(name): \(String(format: "%.2f", ratio))\(target)")
        }
    }

    // 2. Fork N children from one image at once, each writing one file, each committed.
    var images: [(String, ImageRecord)] = [("busybox", busybox)]
    if !options.skipDebian { images.append(("debian:bookworm", try engine.baseImages.resolve("debian:bookworm"))) }
    print("\n== fork \(options.forks) children from one image, each writes a file and is committed (median of 3) ==")
    var forkTimes: [String: Double] = [:]
    for (name, image) in images {
        var totals: [Double] = []
        for _ in 0..<3 {
            let start = now()
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<options.forks {
                    group.addTask {
                        let r = try await engine.run(
                            RunSpec(
                                image: image.uuid, command: ["sh", "-c", "echo \(i) > /branch-\(i)"], stdout: .discard,
                                stderr: .discard))
                        guard r.record.exitCode == 0, r.record.resultImage != image.uuid else {
                            throw SandboxError(.childProcess, "fork \(i) failed")
                        }
                    }
                }
                try await group.waitForAll()
            }
            totals.append(now() - start)
        }
        forkTimes[name] = median(totals)
        print(
            pad(name, 18)
                + String(
                    format: "%6.2f s total (%@ per child)", median(totals),
                    ms(median(totals) / Double(options.forks)))
                + "  (target < 3 s: \(median(totals) < 3 ? "met" : "MISSED"))")
    }
    if let b = forkTimes["busybox"], let d = forkTimes["debian:bookworm"] {
        print(
            String(format: "ratio debian/busybox: %.2f", d / b)
                + " (target <= 1.5: \(d / b <= 1.5 ? "met" : "MISSED"); images of \(Format.size(images[1].1.size)) and \(Format.size(images[0].1.size)))"
        )
    }

    // 3. Commit of a one-file change on debian minbase (or busybox when skipped).
    let (commitName, commitImage) = images.last!
    var commits: [Double] = []
    var walls: [Double] = []
    for i in 0..<options.runs {
        let r = try await engine.run(
            RunSpec(
                image: commitImage.uuid, command: ["sh", "-c", "echo \(i) > /one-file"], stdout: .discard,
                stderr: .discard))
        commits.append(r.record.metrics.commitSeconds)
        walls.append(r.record.metrics.wallSeconds)
    }
    print("\n== commit of a one-file change on \(commitName) (\(options.runs) runs) ==")
    print(
        "commit median \(ms(median(commits))), p90 \(ms(percentile(commits, 0.9))) (target < 15 ms: \(median(commits) < 0.015 ? "met" : "MISSED")); sandbox wall median \(ms(median(walls)))"
    )
    _ = try store.collectGarbage(pruneUntaggedOlderThan: 0)
}

/// The figures of issue 16's table, recorded by the benches that measure them; `contree-bench
/// table` runs those benches and prints them together with their peers and goals.
enum Summary {
    enum Figure: Int, CaseIterable {
        case execCLI, inProcess, stepOverhead, cachedRerun, ociImport, apiThroughput

        var title: String {
            switch self {
            case .execCLI: "`exec --image busybox -- true`, CLI process, vs bwrap `true`"
            case .inProcess: "the same in process (`SandboxEngine.run`) vs bwrap"
            case .stepOverhead: "a pipeline step, cold, above the command itself"
            case .cachedRerun: "fully cached 20-step rerun, CLI end to end"
            case .ociImport: "OCI import of debian:bookworm vs skopeo copy + umoci unpack"
            case .apiThroughput: "API: 50 concurrent spawns, throughput vs the engine in process"
            }
        }

        /// The goal, and whether `value` (a ratio, or seconds without a peer) meets it.
        var goal: (text: String, met: (Double) -> Bool) {
            switch self {
            case .execCLI: ("<= 1.5x", { $0 <= 1.5 })
            case .inProcess: ("<= 1.0x", { $0 <= 1.0 })
            case .stepOverhead: ("<= 5 ms", { $0 <= 0.005 })
            case .cachedRerun: ("<= 20 ms", { $0 <= 0.020 })
            case .ociImport: ("<= 0.5", { $0 <= 0.5 })
            case .apiThroughput: (">= 0.9", { $0 >= 0.9 })
            }
        }
    }

    private static let figures = Mutex<[Figure: (ours: Double, peer: Double?)]>([:])

    static func record(_ figure: Figure, _ ours: Double, peer: Double? = nil) {
        figures.withLock { $0[figure] = (ours, peer) }
    }

    static func printTable() {
        let recorded = figures.withLock { $0 }
        print("\n== issue 16's table, measured side by side in this run ==")
        print("| figure | contree | peer | ratio | goal |")
        print("| --- | --- | --- | --- | --- |")
        for figure in Figure.allCases {
            guard let (ours, peer) = recorded[figure] else {
                print("| \(figure.title) | not measured | | | \(figure.goal.text) |")
                continue
            }
            let isRate = figure == .apiThroughput
            func show(_ value: Double) -> String { isRate ? String(format: "%.0f runs/s", value) : ms(value) }
            let ratio = peer.map { ours / $0 }
            let judged = ratio ?? ours
            print(
                "| \(figure.title) | \(show(ours)) | \(peer.map(show) ?? "") | "
                    + (ratio.map { String(format: "%.2f", $0) } ?? "") + " | \(figure.goal.text) "
                    + (figure.goal.met(judged) ? "✔" : "✘") + " |")
        }
    }
}

enum Format {
    static func size(_ bytes: Int64) -> String { String(format: "%.1f MiB", Double(bytes) / 1_048_576) }
}

let args = Array(CommandLine.arguments.dropFirst())
let usage =
    "usage: contree-bench sandbox [--runs N] [--forks N] [--home DIR] [--skip-debian]\n       contree-bench pipeline [--runs N] [--home DIR]\n       contree-bench api [--runs N] [--home DIR]\n       contree-bench oci [--runs N] [--home DIR]\n       contree-bench vm [--runs N] [--home DIR]\n       contree-bench network [--runs N] [--home DIR]\n       contree-bench slurm [--runs N] [--home DIR]\n       contree-bench loop [--runs N] [--home DIR]\n       contree-bench scale [--runs N] [--home DIR] [--sizes 10,100,1000,5000] [--images 1000,10000,100000] [--concurrency 1,2,4,8,16,32,64] [--only pipelines,store,concurrent]\n       contree-bench table [--runs N] [--home DIR]\n       contree-bench memory [--runs N] [--home DIR] [--sizes 256,512,1024] [--forks N]"
if args.contains("--help") || args.contains("-h") {
    print(usage)
    exit(0)
}
guard let mode = args.first,
    ["sandbox", "pipeline", "api", "oci", "vm", "network", "slurm", "loop", "scale", "table", "memory"].contains(mode)
else {
    FileHandle.standardError.write(Data("contree-bench: name a benchmark\n\(usage)\n".utf8))
    exit(2)
}
let options: Options
do {
    options = try Options(Array(args.dropFirst()))
} catch {
    FileHandle.standardError.write(Data("contree-bench: \(error)\n\(usage)\n".utf8))
    exit(2)
}
do {
    let cliPath = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        .appendingPathComponent("contree-pipeline").path
    if mode == "table" {
        // Each bench that measures a figure of issue 16's table, fewer rounds, then the table.
        let env =
            ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=\(options.home)"]
        var sandbox = options
        if !args.contains("--runs") { sandbox.runs = 20 }
        sandbox.forks = 10
        sandbox.skipDebian = true
        try await sandboxBenchmark(sandbox)
        try await PipelineBench(home: options.home, rounds: 3, cli: cliPath, env: env).measure()
        try await APIBench(home: options.home, cli: cliPath, concurrency: 50, rounds: 3).measure()
        try await OCIBench(home: options.home, rounds: 3, cli: cliPath).measure()
        Summary.printTable()
    } else if mode == "sandbox" {
        try await sandboxBenchmark(options)
    } else if mode == "network" {
        try await NetworkBench(home: options.home, rounds: args.contains("--runs") ? options.runs : 5, cli: cliPath)
            .measure()
    } else if mode == "slurm" {
        try await SlurmBench(home: options.home, rounds: args.contains("--runs") ? options.runs : 3, cli: cliPath)
            .measure()
    } else if mode == "memory" {
        try await MemoryBench(
            home: options.home, rounds: args.contains("--runs") ? options.runs : 3, cli: cliPath,
            sizes: args.contains("--sizes") ? options.sizes : [256, 512, 1024],
            forks: args.contains("--forks") ? options.forks : 4
        ).measure()
    } else if mode == "vm" {
        try await VMBench(home: options.home, rounds: args.contains("--runs") ? options.runs : 3, cli: cliPath)
            .measure()
    } else if mode == "oci" {
        try await OCIBench(home: options.home, rounds: args.contains("--runs") ? options.runs : 3, cli: cliPath)
            .measure()
    } else if mode == "loop" {
        let env =
            ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=\(options.home)"]
        try await LoopBench(
            home: options.home, rounds: args.contains("--runs") ? options.runs : 5, cli: cliPath, env: env
        )
        .measure()
    } else if mode == "scale" {
        try await ScaleBench(
            home: options.home, rounds: args.contains("--runs") ? options.runs : 3, cli: cliPath,
            sizes: options.sizes, imageCounts: options.images, concurrency: options.concurrency, parts: options.parts
        ).measure()
    } else if mode == "api" {
        try await APIBench(
            home: options.home, cli: cliPath, concurrency: 50, rounds: args.contains("--runs") ? options.runs : 3
        ).measure()
    } else {
        let cli = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
            .appendingPathComponent("contree-pipeline").path
        let env =
            ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=\(options.home)"]
        try await PipelineBench(
            home: options.home, rounds: args.contains("--runs") ? options.runs : 5, cli: cli, env: env
        ).measure()
    }
} catch {
    FileHandle.standardError.write(Data("error: \(error)\n".utf8))
    exit(1)
}
