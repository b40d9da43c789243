import ContreeTestSupport
import Foundation
import Glibc
import Testing

@testable import ImageStore
@testable import Sandbox
@testable import SystemSupport

/// Tests that create namespaces, mounts and cgroups need root (CI runs as root).

/// A store in a fresh temporary directory, removed when the test ends.
final class TemporaryStore {
    let root: String
    let store: Store

    init(flattenThreshold: Int = 64) throws {
        root = "/tmp/contree-test-" + UUID().uuidString.lowercased().prefix(12)
        store = try Store(root: root, flattenThreshold: flattenThreshold)
    }

    deinit { try? FileSystem.removeTree(root) }

    var engine: SandboxEngine { SandboxEngine(store: store) }

    /// The built-in busybox image (built on first use).
    func busybox() throws -> ImageRecord { try BaseImages(store: store).resolve("busybox") }

    /// The image a run produced (fails the test when it produced none).
    func image(of result: RunResult, sourceLocation: SourceLocation = #_sourceLocation) throws -> ImageRecord {
        let uuid = try #require(result.record.resultImage, sourceLocation: sourceLocation)
        return try #require(try store.image(uuid), sourceLocation: sourceLocation)
    }

    /// Runs a shell script in a sandbox and returns the result.
    func sh(
        _ script: String, image: String = "busybox", configure: (inout RunSpec) -> Void = { _ in }
    ) async throws
        -> RunResult
    {
        var spec = RunSpec(image: image, command: ["sh", "-c", script])
        configure(&spec)
        return try await engine.run(spec)
    }
}

/// A scratch directory on the host, removed when the test ends.
final class ScratchDirectory {
    let path: String
    init() throws {
        path = "/tmp/contree-scratch-" + UUID().uuidString.lowercased().prefix(12)
        try FileSystem.makeDirectories(path)
    }
    deinit { try? FileSystem.removeTree(path) }

    @discardableResult
    func write(_ relative: String, _ text: String, mode: mode_t = 0o644) throws -> String {
        let path = self.path + "/" + relative
        let parent = String(path[..<path.lastIndex(of: "/")!])
        try FileSystem.makeDirectories(parent)
        try FileSystem.writeFile(path, Array(text.utf8), mode: mode)
        chmod(path, mode)
        return path
    }
}

extension RunResult {
    var out: String { String(decoding: stdout, as: UTF8.self) }
    var err: String { String(decoding: stderr, as: UTF8.self) }
}

/// Runs the CLI and returns its exit status and output.
/// (On a thread of its own: the cooperative pool has two threads here and other tests need them.)
func runCLI(
    _ arguments: [String], home: String, stdin: String? = nil
) async throws -> (status: Int32, out: String, err: String) {
    try await BlockingPool.shared.run { try runCLIBlocking(arguments, home: home) }
}

func runCLIBlocking(_ arguments: [String], home: String) throws -> (status: Int32, out: String, err: String) {
    var env = ChildProcess.hostEnvironment().filter { !$0.hasPrefix("CONTREE_HOME=") }
    env.append("CONTREE_HOME=\(home)")
    let result = try ChildProcess.run([Paths.cli] + arguments, environment: env)
    return (result.status, String(decoding: result.stdout, as: UTF8.self), result.stderrText)
}
