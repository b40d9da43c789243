import Foundation
import Glibc
import ImageFormats
import SystemSupport

/// A past run's `artifacts/manifest.json`, read as untrusted input: anyone who can write the
/// run's directory can edit it, so an entry is used only when its file is a normalized relative
/// path beneath `artifacts/`, read beneath the run's directory (no symlink leads out), and its
/// bytes still hash to the recorded sha256.
public struct ArtifactManifest: Sendable {
    public let outDir: String
    public let entries: [ArtifactRecord]
    /// The manifest as read (copied along with the artifacts).
    let bytes: [UInt8]

    /// Reads the manifest of the run whose reports are in `outDir` (no manifest: no entries).
    /// - Throws: `PipelineError` for a manifest that is not a list of artifacts, or an entry
    ///   whose file leaves `artifacts/`.
    public init(outDir: String) throws {
        self.outDir = outDir
        let fd: Int32
        do {
            fd = try HostPaths.beneath(outDir).open("artifacts/manifest.json", what: "the run's manifest")
        } catch let error as SandboxError where error.code == .notFound {
            entries = []
            bytes = []
            return
        }
        defer { close(fd) }
        bytes = try FileSystem.readAll(fd: fd, path: outDir + "/artifacts/manifest.json")
        guard let decoded = try? JSONDecoder().decode([ArtifactRecord].self, from: Data(bytes)) else {
            throw PipelineError(
                .invalid, "\(outDir)/artifacts/manifest.json is not a list of artifacts; it was changed by hand")
        }
        for entry in decoded { _ = try ArtifactManifest.relative(entry.file, manifest: outDir) }
        entries = decoded
    }

    /// The entry's path below `artifacts/`, or a refusal.
    static func relative(_ file: String, manifest: String) throws -> [String] {
        let parts = file.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard parts.count >= 2, parts[0] == "artifacts",
            parts.dropFirst().allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." && !$0.contains("\0") })
        else {
            throw PipelineError(
                .invalid,
                "\(manifest)/artifacts/manifest.json names '\(file)', which is not a path beneath artifacts/; the manifest was changed by hand, nothing was copied"
            )
        }
        return Array(parts.dropFirst())
    }

    /// Copies every artifact (and the manifest) into `destination`: each file created anew
    /// beneath it (an existing regular file is replaced, nothing else is), and checked
    /// against its sha256 as it is copied.
    /// - Returns: how many artifacts were copied.
    @discardableResult
    public func copy(to destination: String) throws -> Int {
        guard !entries.isEmpty else { return 0 }
        try FileSystem.makeDirectories(destination)
        let source = HostPaths.beneath(outDir)
        var tree = DirectoryTree(root: destination)
        for entry in entries {
            let parts = try ArtifactManifest.relative(entry.file, manifest: outDir)
            let input = try source.open(entry.file, what: "artifact \(entry.path)")
            defer { close(input) }
            let directory = try tree.directory(
                parts.dropLast().map { RawPath($0) }[...], member: RawPath(entry.file), source: destination)
            let name = RawPath(parts[parts.count - 1])
            let output = try create(name, in: directory)
            defer { close(output) }
            var hasher = Digest.Hasher()
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                guard n >= 0 else { throw SandboxError.system("read(artifact \(entry.path))") }
                if n == 0 { break }
                buffer.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                try FileSystem.writeAll(fd: output, Array(buffer[0..<n]), path: directory.label(name))
            }
            let digest = hasher.finalize().hex
            guard digest == entry.sha256 else {
                try? directory.remove(name, directory: false)
                throw PipelineError(
                    .failed,
                    "artifact \(entry.file) hashes to \(digest), not the \(entry.sha256) the manifest records: it changed after the run; nothing more was copied"
                )
            }
        }
        let top = try DirectoryHandle(path: destination)
        let manifest = try create("manifest.json", in: top)
        defer { close(manifest) }
        try FileSystem.writeAll(fd: manifest, bytes, path: destination + "/manifest.json")
        return entries.count
    }

    /// A new file `name` in `directory`: an existing regular file is replaced; a directory, a
    /// symlink or anything else there is refused.
    private func create(_ name: RawPath, in directory: DirectoryHandle) throws -> Int32 {
        if let existing = try directory.status(name) {
            guard existing.isRegular else {
                throw PipelineError(
                    .failed,
                    "\(directory.label(name)) exists and is not a regular file; it was left alone, nothing more was copied"
                )
            }
            try directory.remove(name, directory: false)
        }
        return try directory.openFile(name, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o644)
    }
}
