import Dispatch
import Glibc
import ImageFormats
import ImageStore
import Sandbox
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Live container sandboxes. A container's pid 1 lives only as long as the process that
/// supervises it (it reads that process's going as "the parent died"), so a detached holder
/// process (`contree-pipeline sandbox hold ID`, in a session of its own) runs the sandbox as an
/// ordinary disposable run and writes its handle (`container.json`) once it runs; `exec` joins
/// it from any process through that handle; `stop` ends the holder, which ends the run. Such a
/// sandbox cannot be snapshotted with its memory (this host's CRIU cannot checkpoint), and it
/// ends when its main command does.
extension LiveSandboxes {
    /// What the holder runs, as `start` chose it (`spec.json` in the sandbox's directory).
    struct HeldRun: Codable {
        var image: String
        var command: [String]
        var env: [String: String]
        var cwd: String?
        var uid: UInt32
        var gid: UInt32
        var hostname: String
        var network: NetworkMode
    }

    /// The main command of a container sandbox started without one: something to keep its
    /// namespaces alive.
    static let idleCommand = ["sh", "-c", "while :; do sleep 86400; done"]

    func startContainer(_ options: StartOptions) throws -> LiveSandbox {
        guard !holder.isEmpty else {
            throw SandboxError(.unsupported, "this program cannot hold a live container sandbox; use contree-pipeline")
        }
        let image = try baseImages.resolve(options.image)
        let (id, directory, uid, gid) = try prepare(options, image: image)
        var holderPID: pid_t?
        do {
            let held = HeldRun(
                image: image.uuid, command: options.command.isEmpty ? LiveSandboxes.idleCommand : options.command,
                env: options.env, cwd: options.cwd, uid: uid, gid: gid, hostname: options.hostname,
                network: options.network)
            try FileSystem.writeFile(directory + "/spec.json", Array(try JSONEncoder().encode(held)), mode: 0o600)
            let log = open(directory + "/main.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            guard log >= 0 else { throw SandboxError.system("open(\(directory)/main.log)") }
            let spawned = try ChildProcess.spawn(
                holder + ["sandbox", "hold", "--home", store.root, id], captureStdout: false, stdoutFD: log,
                ownProcessGroup: true)
            Glibc.close(log)
            Glibc.close(spawned.stderr)  // the holder sends its stderr to the log too
            holderPID = spawned.pid
            let deadline = Monotonic.now + 600
            while !FileSystem.exists(directory + "/container.json") {
                var status: Int32 = 0
                let ended = waitpid(spawned.pid, &status, WNOHANG) == spawned.pid
                guard !ended, Monotonic.now < deadline else {
                    let said = String(
                        decoding: (try? FileSystem.readFile(directory + "/main.log")) ?? [], as: UTF8.self)
                    throw SandboxError(
                        .sandboxSetup,
                        "the container sandbox did not start: \(said.isEmpty ? "its holder ended with nothing said" : said.trimmingCharacters(in: .whitespacesAndNewlines))"
                    )
                }
                usleep(20_000)
            }
            let sandbox = LiveSandbox(
                id: id, image: image.uuid, base: image.uuid, isolation: .container, pid: spawned.pid,
                startTicks: ChildProcess.startTicks(of: spawned.pid) ?? 0, memoryMiB: 0, layerSlots: 0, upper: "",
                command: options.command, env: SandboxEngine.environment(options.env, image: image.config.env),
                workdir: options.cwd ?? image.config.workingDir, uid: uid, gid: gid, hostname: options.hostname,
                created: Date().timeIntervalSince1970)
            try record(sandbox)
            return sandbox
        } catch {
            if let holderPID {
                kill(holderPID, SIGTERM)
                var status: Int32 = 0
                _ = waitpid(holderPID, &status, 0)
            }
            abandon(id, image: image)
            throw error
        }
    }

    /// Runs the container sandbox `id` (in the holder process) until it is stopped or its main
    /// command ends; its output goes to this process's stdout (the sandbox's main.log).
    public func hold(_ id: String) async throws {
        let directory = self.directory(id)
        let held = try JSONDecoder().decode(
            HeldRun.self, from: Data(try FileSystem.readFile(directory + "/spec.json")))
        setsid()  // no terminal's signals reach it
        dup2(1, 2)
        var spec = RunSpec(
            image: held.image, command: held.command, env: held.env, cwd: held.cwd, network: held.network,
            hostname: held.hostname, disposable: true, stdout: .fileDescriptor(1), stderr: .fileDescriptor(1),
            isolation: .container)
        spec.user = (held.uid, held.gid)
        let control = RunControl()
        control.whenStarted {
            guard let handle = control.containerHandle, let bytes = try? JSONEncoder().encode(handle) else { return }
            try? FileSystem.writeFile(directory + "/container.json.new", Array(bytes), mode: 0o600)
            try? FileSystem.rename(directory + "/container.json.new", directory + "/container.json")
        }
        spec.control = control
        signal(SIGTERM, SIG_IGN)
        let stop = DispatchSource.makeSignalSource(signal: SIGTERM, queue: .global())
        stop.setEventHandler { control.signal(SIGKILL) }
        stop.resume()
        defer { stop.cancel() }
        let engine = SandboxEngine(store: store, backends: [ContainerBackend()])
        let record = try await engine.run(spec).record
        print(
            "contree: the sandbox's main command ended (exit code \(record.exitCode.map(String.init) ?? "none"), signal \(record.signal.map(String.init) ?? "none"))"
        )
    }

    /// Runs a command in a running container sandbox and waits for it.
    public func execContainer(_ sandbox: LiveSandbox, _ spec: ExecSpec) async throws -> CommandOutcome {
        guard isRunning(sandbox),
            let bytes = try? FileSystem.readFile(directory(sandbox.id) + "/container.json"),
            let handle = try? JSONDecoder().decode(ContainerHandle.self, from: Data(bytes)), handle.isRunning
        else {
            throw SandboxError(
                .conflict,
                "live sandbox \(sandbox.id) is not running (its main command ended); `contree-pipeline sandbox stop \(sandbox.id)` removes it"
            )
        }
        return try await handle.exec(spec)
    }

    /// Ends the holder (and so the sandbox); waits up to ten seconds before killing it.
    func stopHolder(_ sandbox: LiveSandbox) {
        guard isRunning(sandbox) else { return }
        kill(sandbox.pid, SIGTERM)
        let deadline = Monotonic.now + 10
        while isRunning(sandbox) && Monotonic.now < deadline {
            var status: Int32 = 0
            _ = waitpid(sandbox.pid, &status, WNOHANG)  // when this process started it
            usleep(20_000)
        }
        if isRunning(sandbox) { kill(sandbox.pid, SIGKILL) }
        var status: Int32 = 0
        _ = waitpid(sandbox.pid, &status, WNOHANG)
    }
}
