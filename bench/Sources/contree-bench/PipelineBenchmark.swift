// contree-bench pipeline: a 20-step linear pipeline and a 1-to-16 fan-out on busybox, cold, fully
// cached, and after changing the last step; the same 20 steps as a Containerfile built by buildah
// (--layers, overlay, chroot isolation), cold and cached, in the same run.
import Foundation
import Glibc
import ImageStore
import Sandbox
import SystemSupport

struct PipelineBench {
    let home: String
    let rounds: Int
    let cli: String
    let env: [String]
    var work: String { home + "/pipeline-bench" }

    func linear(salt: String, last: String = "echo 20 > f20") -> String {
        var yaml = "name: bench-linear\nimage: busybox\nenv: {SALT: \(salt)}\nsteps:\n"
        for i in 1...20 {
            yaml += "  - id: s\(i)\n    run: \(i == 20 ? last : "echo \(i) > f\(i)")\n"
        }
        return yaml
    }

    func fanout(salt: String) -> String {
        var yaml =
            "name: bench-fanout\nimage: busybox\nenv: {SALT: \(salt)}\nsteps:\n  - id: base\n    run: echo base > base\n"
        for i in 1...16 { yaml += "  - id: b\(i)\n    from: base\n    run: echo \(i) > f\(i)\n" }
        return yaml
    }

    func containerfile(last: String = "echo 20 > f20") -> String {
        var text = "FROM scratch\nADD rootfs.tar /\nWORKDIR /workspace\n"
        for i in 1...20 { text += "RUN \(i == 20 ? last : "echo \(i) > f\(i)")\n" }
        return text
    }

    /// Runs the pipeline CLI on `yaml`; returns its wall time and how many steps were cache hits.
    func run(_ yaml: String, name: String) throws -> (seconds: Double, hits: Int, steps: Int) {
        let r = try runPipeline(
            yaml, file: work + "/" + name + ".yaml", out: work + "/out-" + name, cli: cli, env: env)
        return (r.seconds, r.hits, r.steps)
    }

    func buildah(_ text: String, root: String) throws -> Double {
        try text.write(toFile: work + "/buildah/Containerfile", atomically: true, encoding: .utf8)
        let start = now()
        let result = try ChildProcess.run(
            [
                "buildah", "--root", root, "--runroot", root + "-run", "--storage-driver", "overlay", "build",
                "--layers",
                "-q", "-f", work + "/buildah/Containerfile", "-t", "contree-bench", work + "/buildah",
            ],
            environment: ChildProcess.hostEnvironment() + ["BUILDAH_ISOLATION=chroot"])
        let seconds = now() - start
        guard result.succeeded else { throw SandboxError(.childProcess, "buildah failed: \(result.stderrText)") }
        return seconds
    }

    func measure() async throws {
        try FileManager.default.createDirectory(atPath: work + "/buildah", withIntermediateDirectories: true)
        let store = try Store(root: home)
        let busybox = try BaseImages(store: store).resolve("busybox")
        // The same rootfs for buildah's ADD.
        let tar = try ChildProcess.run([
            "tar", "-C", store.layerPath(busybox.layers[0]), "-cf", work + "/buildah/rootfs.tar", ".",
        ])
        guard tar.succeeded else { throw SandboxError(.childProcess, "tar failed: \(tar.stderrText)") }

        // The command itself, on the host: what a step costs with no sandbox at all.
        var host: [Double] = []
        for i in 0..<20 { host.append(try timed(["sh", "-c", "echo \(i) > \(work)/host-f"])) }
        let command = median(host)

        var rows: [String: [Double]] = [:]
        for round in 0..<rounds {
            let salt = UUID().uuidString.prefix(8)
            let cold = try run(linear(salt: String(salt)), name: "linear")
            let cached = try run(linear(salt: String(salt)), name: "linear")
            let changed = try run(linear(salt: String(salt), last: "echo changed-\(round) > f20"), name: "linear")
            guard cold.hits == 0, cached.hits == 20, changed.hits == 19 else {
                throw SandboxError(
                    .childProcess, "unexpected cache behaviour: \(cold.hits)/\(cached.hits)/\(changed.hits) hits")
            }
            rows["linear cold", default: []].append(cold.seconds)
            rows["linear cached", default: []].append(cached.seconds)
            rows["linear last step changed", default: []].append(changed.seconds)
            let fanCold = try run(fanout(salt: String(salt)), name: "fanout")
            let fanCached = try run(fanout(salt: String(salt)), name: "fanout")
            rows["fan-out 1->16 cold", default: []].append(fanCold.seconds)
            rows["fan-out 1->16 cached", default: []].append(fanCached.seconds)

            let root = work + "/buildah-root-\(round)"
            try? FileManager.default.removeItem(atPath: root)
            rows["buildah cold", default: []].append(try buildah(containerfile(), root: root))
            rows["buildah cached", default: []].append(try buildah(containerfile(), root: root))
            rows["buildah last step changed", default: []].append(
                try buildah(containerfile(last: "echo changed-\(round) > f20"), root: root))
            _ = try? ChildProcess.run(
                ["buildah", "--root", root, "--runroot", root + "-run", "--storage-driver", "overlay", "rm", "--all"])
            _ = try? ChildProcess.run(["umount", "-R", root + "/overlay"])
            try? FileManager.default.removeItem(atPath: root)
        }
        print(
            "== pipelines on busybox, CLI end to end, medians of \(rounds) rounds (buildah: --layers, overlay, chroot) =="
        )
        let names = [
            "linear cold", "linear cached", "linear last step changed", "fan-out 1->16 cold", "fan-out 1->16 cached",
            "buildah cold", "buildah cached", "buildah last step changed",
        ]
        for name in names { print(pad(name, 32) + ms(median(rows[name]!))) }
        let cold = median(rows["linear cold"]!)
        let cached = median(rows["linear cached"]!)
        let bCold = median(rows["buildah cold"]!)
        let bCached = median(rows["buildah cached"]!)
        let changed = median(rows["linear last step changed"]!)
        let bChanged = median(rows["buildah last step changed"]!)
        func verdict(_ ok: Bool) -> String { ok ? "met" : "MISSED" }
        print(
            String(format: "ratio cold run / buildah cold: %.3f", cold / bCold)
                + " (target <= 0.2: \(verdict(cold / bCold <= 0.2)))")
        print(
            String(format: "ratio cached rerun / buildah cached: %.3f", cached / bCached)
                + " (target <= 0.2: \(verdict(cached / bCached <= 0.2))); cached rerun \(ms(cached)) (target < 200 ms: \(verdict(cached < 0.2)))"
        )
        print(String(format: "ratio rerun after changing the last step / buildah: %.3f", changed / bChanged))
        let perStep = cold / 20
        Summary.record(.stepOverhead, perStep - command)
        Summary.record(.cachedRerun, cached)
        print(
            "per step, cold: \(ms(perStep)); the command itself on the host: \(ms(command)); overhead \(ms(perStep - command)) (target < 25 ms: \(verdict(perStep - command < 0.025)))"
        )
        print(
            "fan-out: \(ms(median(rows["fan-out 1->16 cold"]!) / 17)) per step cold, \(ms(median(rows["fan-out 1->16 cached"]!))) fully cached"
        )
    }
}
