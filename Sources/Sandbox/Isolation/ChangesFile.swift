import Glibc
import ImageFormats
import SystemSupport

/// A sandbox's changes as a guest sends them (an OCI layer tar, in pieces), kept in a file no
/// larger than `limit` (the guest is not trusted with its size), then unpacked into a directory
/// by the same extractor as any layer (paths that would escape refused). The VM backend's runs,
/// memory snapshots and live sandboxes take their changes this way. Used by one thread at a time.
public final class ChangesFile: @unchecked Sendable {
    public let path: String
    private let fd: Int32
    private let limit: Int64
    private var received: Int64 = 0

    public init(_ path: String, limit: Int64) throws {
        fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        self.path = path
        self.limit = limit
    }

    deinit { close(fd) }

    /// Appends a piece. - Throws: when the changes grow past the limit.
    public func take(_ chunk: [UInt8]) throws {
        received += Int64(chunk.count)
        guard received <= limit else {
            throw SandboxError(.sandboxSetup, "the VM sent more changes than its upper disk holds")
        }
        try FileSystem.writeAll(fd: fd, chunk, path: path)
    }

    /// Unpacks what was received into `directory` (made, empty).
    public func extract(into directory: String, source: String) throws {
        try FileSystem.makeDirectory(directory, mode: 0o755)
        guard lseek(fd, 0, SEEK_SET) == 0 else { throw SandboxError.system("lseek(\(path))") }
        var reader = TarReader(fd: fd, name: source)
        var extractor = LayerExtractor(root: directory)
        try extractor.extract(&reader, source: source)
    }
}
