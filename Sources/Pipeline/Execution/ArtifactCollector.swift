import Foundation
import Glibc
import ImageFormats
import ImageStore
import SystemSupport

/// Copies paths or globs out of a step's snapshot (read from its layers, no sandbox) into the
/// run's output directory, hashing each file for the manifest. An artifact an earlier run
/// already copied out of the same snapshot is hard-linked from that copy instead, when the
/// copy is unchanged since (a cached step's 200 MiB artifact costs no new 200 MiB per run).
struct ArtifactCollector {
    let store: Store
    /// The run's output directory.
    let outDir: String
    /// Where earlier copies are remembered (nil: always copy).
    var cache: StepCache? = nil

    /// Exports what `patterns` match in `image`; returns the records and the patterns that
    /// matched nothing.
    func collect(
        _ patterns: [String], from imageUUID: String, workdir: String, node plan: PlanNode
    ) throws
        -> (records: [ArtifactRecord], missing: [String])
    {
        guard let image = try store.image(imageUUID) else { return ([], patterns) }
        let fs = ImageFilesystem(layersTopFirst: image.layers.reversed().map(store.layerPath))
        var records: [ArtifactRecord] = []
        let missing = try files(patterns, in: fs, workdir: workdir) { node in
            records.append(try export(node, of: imageUUID, from: fs, into: "artifacts/" + plan.fileName))
        }
        records = records.map {
            var record = $0
            record.node = plan.id
            return record
        }
        return (records, missing)
    }

    /// Reads the regular files `patterns` match in `image` (no larger than `limit` bytes each;
    /// `nil` contents for a larger one), in path order; returns them and the patterns that
    /// matched nothing.
    func readFiles(
        _ patterns: [String], from imageUUID: String, workdir: String, limit: Int
    ) throws -> (
        files: [(path: String, contents: Data?)], missing: [String]
    ) {
        guard let image = try store.image(imageUUID) else { return ([], patterns) }
        let fs = ImageFilesystem(layersTopFirst: image.layers.reversed().map(store.layerPath))
        var found: [(path: String, contents: Data?)] = []
        let missing = try files(patterns, in: fs, workdir: workdir) { node in
            guard node.status.st_size <= limit else {
                found.append((node.path.description, nil))
                return
            }
            let fd = try fs.openFile(node)
            defer { close(fd) }
            found.append((node.path.description, Data(try FileSystem.readAll(fd: fd, path: node.path.description))))
        }
        return (found.sorted { $0.path < $1.path }, missing)
    }

    /// Calls `body` once for each regular file `patterns` match (under a matched directory:
    /// each file in it); returns the patterns that matched nothing.
    private func files(
        _ patterns: [String], in fs: ImageFilesystem, workdir: String, _ body: (ImageFilesystem.Node) throws -> Void
    ) throws -> [String] {
        var missing: [String] = []
        var seen = Set<String>()  // a file matched twice (two patterns) is taken once
        for pattern in patterns {
            let absolute =
                pattern.hasPrefix("/") ? pattern : (workdir.hasSuffix("/") ? workdir : workdir + "/") + pattern
            let parts = absolute.split(separator: "/").map(String.init).filter { $0 != "." }
            guard !parts.contains("..") else {
                missing.append(pattern)
                continue
            }
            var matches: [ImageFilesystem.Node] = []
            try expand(parts[...], from: fs.root, in: fs, into: &matches)
            if matches.isEmpty { missing.append(pattern) }
            for match in matches {
                try fs.walk(match) { node in
                    guard node.isRegular, seen.insert(node.path.description).inserted else { return }
                    try body(node)
                }
            }
        }
        return missing
    }

    private func expand(
        _ parts: ArraySlice<String>, from current: ImageFilesystem.Node, in fs: ImageFilesystem,
        into matches: inout [ImageFilesystem.Node]
    ) throws {
        guard let first = parts.first else {
            matches.append(current)
            return
        }
        guard current.isDirectory else { return }
        let rest = parts.dropFirst()
        if first == "**" {
            try expand(rest, from: current, in: fs, into: &matches)
            for (_, child) in try fs.list(current) where child.isDirectory {
                try expand(parts, from: child, in: fs, into: &matches)
            }
            return
        }
        if !InputResolver.isGlob(first) {
            if let child = try fs.child(of: current, named: first) {
                try expand(rest, from: child, in: fs, into: &matches)
            }
            return
        }
        for (name, child) in try fs.list(current) where name.withCString({ fnmatch(first, $0, FNM_PERIOD) }) == 0 {
            try expand(rest, from: child, in: fs, into: &matches)
        }
    }

    private func export(
        _ node: ImageFilesystem.Node, of image: String, from fs: ImageFilesystem, into directory: String
    ) throws
        -> ArtifactRecord
    {
        // A name that is not UTF-8 is written (and listed) escaped: the manifest is JSON.
        let path = node.path.description
        let relative = directory + path
        let destination = outDir + "/" + relative
        try FileManager.default.createDirectory(
            atPath: (destination as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        // Never write through a name that is there already: it may be a link to another run's copy.
        unlink(destination)
        if let cache, let previous = try? cache.artifactCopy(image: image, path: path),
            previous.size == Int64(node.status.st_size)
        {
            var status = stat()
            if lstat(previous.file, &status) == 0, previous.isUnchanged(status), link(previous.file, destination) == 0 {
                try? cache.rememberArtifactCopy(
                    image: image, path: path, ArtifactCopy(file: destination, sha256: previous.sha256, status: status))
                return ArtifactRecord(
                    node: "", path: path, file: relative, sha256: previous.sha256, size: previous.size)
            }
        }
        let record = try copy(node, from: fs, to: destination, relative: relative)
        var status = stat()
        if let cache, lstat(destination, &status) == 0 {
            try? cache.rememberArtifactCopy(
                image: image, path: path, ArtifactCopy(file: destination, sha256: record.sha256, status: status))
        }
        return record
    }

    private func copy(
        _ node: ImageFilesystem.Node, from fs: ImageFilesystem, to destination: String, relative: String
    ) throws
        -> ArtifactRecord
    {
        let input = try fs.openFile(node)
        defer { close(input) }
        let output = open(
            destination, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode_t(node.status.st_mode & 0o777))
        guard output >= 0 else {
            throw PipelineError(
                .failed, "cannot write artifact \(destination): \(String(cString: strerror(errno)))")
        }
        defer { close(output) }
        var hasher = Digest.Hasher()
        var size: Int64 = 0
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(artifact \(node.path))") }
            if n == 0 { break }
            try buffer.withUnsafeBytes {
                let chunk = UnsafeRawBufferPointer(rebasing: $0[0..<n])
                hasher.update(chunk)
                try FileSystem.writeAll(fd: output, chunk, path: destination)
            }
            size += Int64(n)
        }
        return ArtifactRecord(
            node: "", path: node.path.description, file: relative,
            sha256: hasher.finalize().hex,
            size: size)
    }
}
