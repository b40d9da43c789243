// contree-bench network: what egress, services and dependency caches cost, side by side.
//
// - Egress throughput: a 200 MiB download from a server on the host's loopback with busybox
//   wget, on the host, in a sandbox with egress (pasta), and through slirp4netns (the other
//   user-mode NAT, in a bare network namespace), timed around wget itself.
// - A service: a pipeline step with a busybox httpd service (start to ready) against the same
//   step without it, CLI end to end.
// - A dependency cache: a pip install of a 32 MiB wheel over egress from a local index, with the
//   pip cache cold (removed) and warm, CLI end to end.
import ContreeTestSupport
import Foundation
import Glibc
import ImageStore
import Sandbox
import SystemSupport

struct NetworkBench {
    let home: String
    let rounds: Int
    let cli: String
    var work: String { home + "/network-bench" }
    var env: [String] {
        ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=\(home)"]
    }

    /// Five downloads with busybox wget (the sandbox's client, run on the host too).
    static let loop = #"for i in 1 2 3 4 5; do wget -q -O /dev/null "$1"; done"#
    /// The same, timed by the host's GNU date around the loop, in nanoseconds.
    static let timedLoop = #"s=$(date +%s%N); busybox sh -c '"# + loop + #"' sh "$1"; e=$(date +%s%N); echo $((e - s))"#

    func measure() async throws {
        try FileManager.default.createDirectory(atPath: work + "/www", withIntermediateDirectories: true)
        let big = work + "/www/big"
        if !FileManager.default.fileExists(atPath: big) {
            let made = try ChildProcess.run(["head", "-c", "209715200", "/dev/urandom"])
            try Data(made.stdout).write(to: URL(fileURLWithPath: big))
        }
        let server = try HostHTTPServer(serving: work + "/www")
        defer { server.stop() }
        let store = try Store(root: home)
        let engine = SandboxEngine(store: store)
        _ = try BaseImages(store: store).resolve("busybox")

        var host: [Double] = []
        var pasta: [Double] = []
        var slirp: [Double] = []
        for _ in 0..<rounds {
            host.append(
                try wgetSeconds(["bash", "-c", NetworkBench.timedLoop, "sh", "http://127.0.0.1:\(server.port)/big"]) / 5
            )
            // In the sandbox: its life with five downloads less its life with none (busybox has
            // no sub-second clock), so the sandbox's start and pasta's are not counted.
            func life(_ script: String) async throws -> Double {
                let run = try await engine.run(
                    RunSpec(
                        image: "busybox", command: ["sh", "-c", script, "sh", "http://10.0.2.2:\(server.port)/big"],
                        network: .egressHostLoopback, disposable: true))
                guard run.record.exitCode == 0 else { throw SandboxError(.childProcess, "wget in the sandbox failed") }
                return run.record.metrics.wallSeconds
            }
            let downloads = try await life(NetworkBench.loop)
            let none = try await life("true")
            pasta.append(max(0.001, downloads - none) / 5)
            slirp.append(try slirpSeconds(port: server.port) / 5)
        }
        let mib = 200.0
        print(
            "== egress: 200 MiB from a server on the host's loopback (busybox wget, 5 per round), medians of \(rounds) =="
        )
        print(pad("host", 36) + String(format: "%.0f MiB/s", mib / median(host)))
        print(pad("contree sandbox, egress (pasta)", 36) + String(format: "%.0f MiB/s", mib / median(pasta)))
        print(pad("slirp4netns (bare network namespace)", 36) + String(format: "%.0f MiB/s", mib / median(slirp)))
        let ratio = median(host) / median(pasta)
        print(
            String(
                format: "ratio sandbox / host: %.2f (goal >= 0.5: %@); slirp4netns / host: %.2f", ratio,
                ratio >= 0.5 ? "met" : "MISSED", median(host) / median(slirp)))

        // What egress adds to a sandbox's start: pasta, started and configured before the clone.
        var loopbackStart: [Double] = []
        var egressStart: [Double] = []
        for _ in 0..<max(10, rounds * 4) {
            for (mode, into) in [(NetworkMode.loopback, 0), (.egress, 1)] {
                let started = now()
                _ = try await engine.run(RunSpec(image: "busybox", command: ["true"], network: mode, disposable: true))
                if into == 0 { loopbackStart.append(now() - started) } else { egressStart.append(now() - started) }
            }
        }
        print("== a sandbox running `true`, in process: loopback vs egress (pasta), medians ==")
        print(pad("loopback", 36) + ms(median(loopbackStart)))
        print(pad("egress", 36) + ms(median(egressStart)))
        print("egress adds \(ms(median(egressStart) - median(loopbackStart))) to a sandbox's start")

        try services()
        try await dependencyCache()
    }

    private func wgetSeconds(_ argv: [String]) throws -> Double {
        let result = try ChildProcess.run(argv)
        guard result.succeeded,
            let ns = Double(
                String(decoding: result.stdout, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
        else { throw SandboxError(.childProcess, "\(argv) failed: \(result.stderrText)") }
        return ns / 1e9
    }

    /// The same download in a bare network namespace whose uplink is slirp4netns.
    private func slirpSeconds(port: Int) throws -> Double {
        guard which("slirp4netns") != nil else { throw SandboxError(.unsupported, "slirp4netns is not installed") }
        let script = """
            unshare -n sleep 60 & holder=$!
            sleep 0.1
            slirp4netns --configure --mtu=65520 --netns-type=path /proc/$holder/ns/net tap0 >/dev/null 2>&1 & nat=$!
            for i in $(seq 1 50); do nsenter -t $holder -n ip -o addr show tap0 2>/dev/null | grep -q 10.0.2 && break; sleep 0.05; done
            nsenter -t $holder -n bash -c '\(NetworkBench.timedLoop.replacingOccurrences(of: "'", with: "'\\''"))' sh http://10.0.2.2:\(port)/big
            kill $nat $holder
            """
        return try wgetSeconds(["bash", "-c", script])
    }

    /// A step with a busybox httpd service against the same step alone (cache off: both run).
    private func services() throws {
        let with = """
            name: bench-service
            services:
              web:
                run: mkdir -p /www && echo ok > /www/index.html && httpd -f -p 8080 -h /www
                ready: wget -q -O /dev/null http://127.0.0.1:8080/
            steps:
              - {id: use, services: [web], cache: false, run: "wget -q -O- http://127.0.0.1:8080/"}
            """
        let without = """
            name: bench-service-none
            steps:
              - {id: use, cache: false, run: "echo ok"}
            """
        var withTimes: [Double] = []
        var withoutTimes: [Double] = []
        for _ in 0..<max(5, rounds * 2) {
            withTimes.append(try runPipeline(with, name: "service"))
            withoutTimes.append(try runPipeline(without, name: "no-service"))
        }
        print("== a service: busybox httpd started, ready-checked and stopped around one step, CLI end to end ==")
        print(pad("step alone", 36) + ms(median(withoutTimes)))
        print(pad("step with the service", 36) + ms(median(withTimes)))
        print(
            "the service adds \(ms(median(withTimes) - median(withoutTimes))) "
                + String(format: "(%.2fx the step alone)", median(withTimes) / median(withoutTimes)))
    }

    /// pip installs a 32 MiB wheel from a local index over egress: cold (cache removed) and warm.
    private func dependencyCache() async throws {
        let index = work + "/index"
        try FileManager.default.createDirectory(atPath: index, withIntermediateDirectories: true)
        let made = try ChildProcess.run(["python3", "-c", NetworkBench.makeIndex, index])
        guard made.succeeded else { throw SandboxError(.childProcess, "building the index: \(made.stderrText)") }
        // Served as PyPI serves files (wheels immutable), so that pip keeps them in its cache.
        let server = try ChildProcess.spawn(
            ["python3", "-u", "-c", NetworkBench.serveIndex, index], captureStdout: true)
        defer {
            kill(server.pid, SIGKILL)
            _ = try? ChildProcess.wait(server.pid, "index")
        }
        var line = [UInt8](repeating: 0, count: 64)
        let n = read(server.stdout!, &line, line.count)
        guard n > 0,
            let port = Int(String(decoding: line[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
        else { throw SandboxError(.childProcess, "the bench's package index did not start") }
        let yaml = """
            name: bench-pip
            image: "debian:bookworm+python3,python3-venv"
            caches:
              pip: {path: /root/.cache/pip}
            steps:
              - id: venv
                run: python3 -m venv /opt/venv
              - id: install
                network: {mode: egress, host-loopback: true}
                caches: [pip]
                cache: false
                run: /opt/venv/bin/pip install -q --disable-pip-version-check --index-url http://$CONTREE_HOST:\(port)/simple/ --trusted-host $CONTREE_HOST bigdep
            """
        var cold: [Double] = []
        var warm: [Double] = []
        _ = try runPipeline(yaml, name: "pip")  // builds the image once
        for _ in 0..<rounds {
            _ = try ChildProcess.run([cli, "cache", "rm", "pip"], environment: env)
            cold.append(try runPipeline(yaml, name: "pip"))
            warm.append(try runPipeline(yaml, name: "pip"))
        }
        print(
            "== a dependency cache: pip install of a 32 MiB wheel over egress into a cached venv, CLI end to end, medians of \(rounds) =="
        )
        print(pad("cache cold", 36) + ms(median(cold)))
        print(pad("cache warm", 36) + ms(median(warm)))
        print(String(format: "warm / cold: %.2f", median(warm) / median(cold)))
    }

    private func runPipeline(_ yaml: String, name: String) throws -> Double {
        let file = work + "/" + name + ".yaml"
        try yaml.write(toFile: file, atomically: true, encoding: .utf8)
        let start = now()
        let result = try ChildProcess.run([cli, "run", file, "--out", work + "/out-" + name], environment: env)
        let seconds = now() - start
        guard result.succeeded else {
            throw SandboxError(.childProcess, "pipeline \(name) failed: \(result.stderrText)")
        }
        return seconds
    }

    /// Serves a directory on 127.0.0.1 (a free port, printed first) with PyPI's cache headers.
    static let serveIndex = #"""
        import http.server, os, sys
        os.chdir(sys.argv[1])
        class Handler(http.server.SimpleHTTPRequestHandler):
            def end_headers(self):
                self.send_header("Cache-Control", "max-age=365000000, immutable, public" if self.path.startswith("/packages/") else "max-age=600, public")
                super().end_headers()
            def log_message(self, *args):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        print(server.server_address[1], flush=True)
        server.serve_forever()
        """#

    /// A PEP 503 index with one wheel holding 32 MiB of random bytes.
    static let makeIndex = #"""
        import base64, hashlib, os, sys, zipfile
        root = sys.argv[1]
        name, version = "bigdep", "1.0.0"
        wheel = "%s-%s-py3-none-any.whl" % (name, version)
        info = "%s-%s.dist-info" % (name, version)
        files = {
            name + "/__init__.py": b"",
            name + "/blob.bin": os.urandom(32 << 20),
            info + "/METADATA": ("Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, version)).encode(),
            info + "/WHEEL": b"Wheel-Version: 1.0\nGenerator: contree-bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        }
        record = ["%s,sha256=%s,%d" % (p, base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode(), len(d)) for p, d in files.items()]
        files[info + "/RECORD"] = ("\n".join(record + [info + "/RECORD,,"]) + "\n").encode()
        os.makedirs(os.path.join(root, "packages"), exist_ok=True)
        path = os.path.join(root, "packages", wheel)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for p, d in files.items():
                z.writestr(zipfile.ZipInfo(p, date_time=(2020, 1, 1, 0, 0, 0)), d)
        sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
        os.makedirs(os.path.join(root, "simple", name), exist_ok=True)
        open(os.path.join(root, "simple", "index.html"), "w").write('<a href="%s/">%s</a>\n' % (name, name))
        open(os.path.join(root, "simple", name, "index.html"), "w").write('<a href="../../packages/%s#sha256=%s">%s</a>\n' % (wheel, sha, wheel))
        """#
}
