import Crypto
import Foundation
import Glibc
import Sandbox

/// Copies paths or globs out of a step's snapshot (read from its layers, no sandbox) into the
/// run's output directory, hashing each file for the manifest.
struct ArtifactCollector {
    let store: Store
    /// The run's output directory.
    let outDir: String

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
        var missing: [String] = []
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
                    guard node.isRegular else { return }
                    records.append(try copy(node, from: fs, into: "artifacts/" + plan.fileName))
                }
            }
        }
        // A file matched twice (two patterns) is listed once.
        var seen = Set<String>()
        records = records.filter { seen.insert($0.path).inserted }.map {
            var record = $0
            record.node = plan.id
            return record
        }
        return (records, missing)
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

    private func copy(
        _ node: ImageFilesystem.Node, from fs: ImageFilesystem, into directory: String
    ) throws
        -> ArtifactRecord
    {
        // A name that is not UTF-8 is written (and listed) escaped: the manifest is JSON.
        let relative = directory + node.path.description
        let destination = outDir + "/" + relative
        try FileManager.default.createDirectory(
            atPath: (destination as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        let input = try fs.openFile(node)
        defer { close(input) }
        let output = open(destination, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode_t(node.status.st_mode & 0o777))
        guard output >= 0 else { throw PipelineError(.failed, "cannot write artifact \(destination)") }
        defer { close(output) }
        var hasher = SHA256()
        var size: Int64 = 0
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            hasher.update(data: buffer[0..<n])
            var done = 0
            while done < n {
                let w = buffer.withUnsafeBytes { write(output, $0.baseAddress! + done, n - done) }
                guard w > 0 else { throw PipelineError(.failed, "cannot write artifact \(destination)") }
                done += w
            }
            size += Int64(n)
        }
        return ArtifactRecord(
            node: "", path: node.path.description, file: relative,
            sha256: hasher.finalize().map { String(format: "%02x", $0) }.joined(),
            size: size)
    }
}
