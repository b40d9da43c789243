import Dispatch
import Glibc
import ImageFormats
import ImageStore
import Synchronization
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// `debian:bookworm+gcc,make` as one layer over `debian:bookworm`, not a second debootstrap:
/// the host's apt works out what the packages need that the parent lacks (reading the parent's
/// dpkg status) and downloads them from the bookworm archive into the store, signatures checked
/// with Debian's keyring; a sandbox over the parent, with no network, installs them with dpkg.
struct DebianPackageLayer {
    let store: Store
    let progress: ProgressReporter?

    /// apt's lists and archives live in the store (`apt/`), never in the host's own state.
    var aptRoot: String { store.root + "/apt" }

    static var isAvailable: Bool {
        FileSystem.exists("/usr/bin/apt-get") && FileSystem.exists(keyring)
    }

    static let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"

    /// Installs `packages` over `parent`, downloading into `work` (a directory of the caller's
    /// lease, so that no other process's recovery takes it for abandoned work).
    /// - Returns: the new image (the parent itself when it has them all). - Throws:
    /// `invalidArgument` for a package the archive does not have, `childProcess` when apt or
    /// dpkg fail (with their last lines).
    func build(
        _ packages: [String], over parent: ImageRecord, in work: String, task: String, suite: String
    ) throws -> ImageRecord {
        let started = Monotonic.now
        try FileSystem.makeDirectories(work + "/archives/partial")
        defer { try? FileSystem.removeTree(work) }
        for dir in ["lists/partial", "cache"] { try FileSystem.makeDirectories(aptRoot + "/" + dir) }
        let filesystem = ImageFilesystem(layersTopFirst: parent.layers.reversed().map(store.layerPath))
        guard let statusNode = try filesystem.lookup("/var/lib/dpkg/status") else {
            throw SandboxError(.corrupt, "\(parent.uuid) has no /var/lib/dpkg/status: it is not a Debian image")
        }
        try FileSystem.writeFile(work + "/status", try filesystem.readFile(statusNode), mode: 0o644)
        let sources = "deb [signed-by=\(DebianPackageLayer.keyring)] \(BaseImages.debianMirror()) \(suite) main\n"
        try FileSystem.writeFile(work + "/sources.list", Array(sources.utf8), mode: 0o644)
        let options = [
            "-o", "Dir::Etc::SourceList=\(work)/sources.list", "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", "Dir::Etc::Preferences=/dev/null", "-o", "Dir::Etc::PreferencesParts=/nonexistent",
            "-o", "Dir::State::Lists=\(aptRoot)/lists", "-o", "Dir::State::status=\(work)/status",
            "-o", "Dir::Cache=\(aptRoot)/cache", "-o", "Dir::Cache::archives=\(work)/archives",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-o", "APT::Install-Recommends=0",
        ]
        // One apt at a time on the store's lists (two package sets may be built at once).
        try FileSystem.withLock(aptRoot + "/lock") {
            progress?.report(task, "apt-get update (\(suite) main)", elapsed: 0)
            try apt(["update"] + options, task: task, started: started)
            progress?.report(task, "downloading \(packages.joined(separator: ", ")) and what they need", elapsed: 0)
            try apt(["install", "--download-only", "-y"] + options + packages, task: task, started: started)
        }
        let debs = try FileSystem.list(work + "/archives").filter { $0.hasSuffix(".deb") }
        guard !debs.isEmpty else { return parent }
        progress?.report(
            task, "installing \(Plural.count(debs.count, "package")) over \(parent.tags.first ?? parent.uuid)",
            elapsed: Monotonic.now - started)
        let directory = "/var/cache/contree-packages"
        let spec = RunSpec(
            image: parent.uuid,
            command: [
                // A package that pre-depends on another (python3 on python3-minimal) unpacks only
                // once that one is configured: unpack what can be, configure it, and again.
                "sh", "-ec",
                """
                for pass in 1 2 3 4 5 6 7 8; do
                  if dpkg --unpack --skip-same-version \(directory)/*.deb >/tmp/.contree-unpack 2>&1; then break; fi
                  if [ "$pass" = 8 ]; then cat /tmp/.contree-unpack >&2; exit 1; fi
                  dpkg --configure -a >/dev/null 2>&1 || true
                done
                dpkg --configure -a
                rm -rf \(directory) /tmp/.contree-unpack /var/log/dpkg.log /var/log/apt
                """,
            ],
            env: ["DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"],
            files: debs.map { FileMapping(hostPath: work + "/archives/" + $0, sandboxPath: directory + "/" + $0) },
            timeout: 1800, network: .none, hostname: "contree")
        let result = try DebianPackageLayer.runBlocking(SandboxEngine(store: store), spec)
        guard result.record.exitCode == 0, let image = result.record.resultImage else {
            let lines = String(decoding: result.stdout + result.stderr, as: UTF8.self).split(separator: "\n").suffix(8)
            throw SandboxError(
                .childProcess,
                "installing \(packages.joined(separator: ",")) over debian:\(suite) failed (\(result.record.exitCode.map { "exit \($0)" } ?? "killed")); dpkg's last lines:\n\(lines.joined(separator: "\n"))"
            )
        }
        return try store.image(image) ?? parent
    }

    private func apt(_ arguments: [String], task: String, started: Double) throws {
        var lastLines: [String] = []
        let result = try ChildProcess.run(
            ["/usr/bin/apt-get", "-q"] + arguments,
            environment: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive"]
        ) { line in
            lastLines = Array((lastLines + [line]).suffix(8))
        }
        guard result.succeeded else {
            let text = lastLines.joined(separator: "\n")
            if text.contains("Unable to locate package") || text.contains("has no installation candidate") {
                throw SandboxError(
                    .invalidArgument, "a package is not in the Debian archive: \(lastLines.last ?? text)")
            }
            throw SandboxError(
                .childProcess,
                "apt-get \(arguments[0]) failed (exit \(result.status)); its last lines:\n\(text)\ncheck that \(BaseImages.debianMirror()) is reachable"
            )
        }
    }

    /// Runs a sandbox from a thread that may block (a base image is built on one).
    static func runBlocking(_ engine: SandboxEngine, _ spec: RunSpec) throws -> RunResult {
        let box = Mutex<Result<RunResult, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task {
            let result: Result<RunResult, any Error>
            do { result = .success(try await engine.run(spec)) } catch { result = .failure(error) }
            box.withLock { $0 = result }
            done.signal()
        }
        // The run needs threads of the pool this one may be on: lend it this place meanwhile.
        BlockingPool.whileBlocked { done.wait() }
        return try box.withLock { $0! }.get()
    }
}
