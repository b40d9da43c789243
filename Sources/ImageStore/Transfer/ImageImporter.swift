import Glibc
import ImageFormats
import SystemSupport

/// Imports a root file system from a directory or a tar archive (plain or gzip) as a new root
/// image. Nothing reaches the store unless the whole import succeeds.
public struct ImageImporter: Sendable {
    public let store: Store

    public init(store: Store) {
        self.store = store
    }

    /// Imports `path` (a directory, a `.tar` or a `.tar.gz`).
    public func importRootfs(from path: String, config: ImageConfig = ImageConfig()) throws -> ImageRecord {
        guard let st = try FileSystem.status(path) else {
            throw SandboxError(.notFound, "\(path) does not exist; give a directory or a tar file to import")
        }
        let lease = try store.acquireLease(layers: [])
        defer { lease.release() }
        let root = lease.workPath + "/rootfs"
        if st.isDirectory {
            // GNU cp keeps owners, modes, times, links, devices and xattrs.
            try FileSystem.makeDirectory(root, mode: 0o755)
            let copy = try ChildProcess.run(["cp", "-a", path + "/.", root + "/"])
            guard copy.succeeded else {
                throw SandboxError(.childProcess, "copying \(path) failed: \(copy.stderrText)")
            }
        } else if st.isRegular {
            try FileSystem.makeDirectory(root, mode: 0o755)
            try extractTar(path, into: root)
        } else {
            throw SandboxError(.invalidArgument, "\(path) is neither a directory nor a tar file")
        }
        chmod(root, 0o755)
        return try Snapshotter(store: store).importRoot(root, config: config, origin: "import:\(path)", lease: lease)
    }

    private func extractTar(_ path: String, into root: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        defer { close(fd) }
        var magic = [UInt8](repeating: 0, count: 2)
        let n = pread(fd, &magic, 2, 0)
        var extractor = LayerExtractor(root: root)
        if n == 2 && magic == [0x1f, 0x8b] {
            let gunzip = try ChildProcess.spawn(["gzip", "-dc"], stdinFD: fd, captureStdout: true)
            defer { close(gunzip.stdout!) }
            var reader = TarReader(fd: gunzip.stdout!, name: path)
            do {
                try extractor.extract(&reader, source: path)
            } catch {
                kill(gunzip.pid, SIGKILL)
                _ = try? ChildProcess.wait(gunzip.pid, "gzip")
                close(gunzip.stderr)
                throw error
            }
            let errors = try FileSystem.readAll(fd: gunzip.stderr, path: "gzip stderr")
            close(gunzip.stderr)
            guard try ChildProcess.wait(gunzip.pid, "gzip") == 0 else {
                throw SandboxError(
                    .invalidArgument, "\(path) is not valid gzip: \(String(decoding: errors, as: UTF8.self))")
            }
        } else {
            var reader = TarReader(fd: fd, name: path)
            try extractor.extract(&reader, source: path)
        }
    }
}
