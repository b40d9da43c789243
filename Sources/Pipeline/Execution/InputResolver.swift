import Foundation
import Glibc
import SystemSupport

/// A host file a step copies in.
public struct ResolvedInput: Sendable, Equatable, Codable {
    /// Relative to the pipeline's directory, and opened beneath it (never through a symlink
    /// that leads out).
    public var hostPath: String
    public var sandboxPath: String
    public var mode: UInt32
    public var sha256: String
}

/// Expands input paths and globs (`*`, `?`, `[...]`, `**`) relative to the pipeline's
/// directory and hashes each file's content. Every file is opened beneath the directory
/// (`HostPaths.beneath`): a symlink in a repository cannot hand a step `/proc/self/environ`
/// or any file of the host's.
enum InputResolver {
    /// The files of one input; relative paths below its static prefix are kept.
    /// - Parameter workdir: where inputs without `to` land (each file's path as written).
    static func resolve(_ input: InputDefinition, directory: String, workdir: String) throws -> [ResolvedInput] {
        let parts = input.pattern.value.split(separator: "/").map(String.init).filter { $0 != "." }
        let firstGlob = parts.firstIndex { isGlob($0) } ?? parts.count - 1
        let prefix = Array(parts[..<firstGlob])
        var matches: [String] = []  // relative to `directory`
        expand(parts[...], base: "", directory: directory, into: &matches)
        var files: [String] = []
        for match in matches.sorted() {
            var st = stat()
            guard stat(directory + "/" + match, &st) == 0 else { continue }
            if (st.st_mode & S_IFMT) == S_IFDIR {
                files += walk(directory + "/" + match).map { match + "/" + $0 }
            } else if (st.st_mode & S_IFMT) == S_IFREG {
                files.append(match)
            }
        }
        guard !files.isEmpty else {
            throw PipelineError(
                .invalid, "input '\(input.pattern.value)' matches no file under \(directory)",
                at: input.pattern.location)
        }
        let root = HostPaths.beneath(directory)
        return try files.map { relative in
            let target: String
            if let destination = input.destination {
                let below = relative.split(separator: "/").dropFirst(prefix.count).joined(separator: "/")
                target = (destination.hasSuffix("/") ? destination : destination + "/") + below
            } else {
                target = (workdir.hasSuffix("/") ? workdir : workdir + "/") + relative
            }
            let fd: Int32
            do {
                fd = try root.open(relative, what: "input '\(input.pattern.value)'")
            } catch let error as SandboxError {
                throw PipelineError(.invalid, error.message, at: input.pattern.location)
            }
            defer { close(fd) }
            var st = stat()
            fstat(fd, &st)
            return ResolvedInput(
                hostPath: relative, sandboxPath: normalize(target), mode: UInt32(st.st_mode & 0o7777),
                sha256: try sha256(of: fd, name: relative))
        }
    }

    static func isGlob(_ component: String) -> Bool {
        component.contains { "*?[".contains($0) }
    }

    private static func expand(
        _ parts: ArraySlice<String>, base: String, directory: String, into matches: inout [String]
    ) {
        guard let first = parts.first else {
            if !base.isEmpty { matches.append(base) }
            return
        }
        let rest = parts.dropFirst()
        let here = base.isEmpty ? directory : directory + "/" + base
        func join(_ name: String) -> String { base.isEmpty ? name : base + "/" + name }
        if first == "**" {
            // Zero directories, then one more level at a time.
            expand(rest, base: base, directory: directory, into: &matches)
            for name in entries(here) where isDirectory(here + "/" + name) {
                expand(parts, base: join(name), directory: directory, into: &matches)
            }
            return
        }
        if !isGlob(first) {
            if access(here + "/" + first, F_OK) == 0 {
                expand(rest, base: join(first), directory: directory, into: &matches)
            }
            return
        }
        for name in entries(here) where fnmatch(first, name, FNM_PERIOD) == 0 {
            expand(rest, base: join(name), directory: directory, into: &matches)
        }
    }

    private static func entries(_ path: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
    }

    private static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// Regular files below a directory, relative to it (symlinked directories not followed).
    private static func walk(_ root: String) -> [String] {
        var result: [String] = []
        for name in entries(root) {
            var st = stat()
            guard lstat(root + "/" + name, &st) == 0 else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFDIR: result += walk(root + "/" + name).map { name + "/" + $0 }
            case S_IFREG: result.append(name)
            case S_IFLNK:
                var target = stat()
                if stat(root + "/" + name, &target) == 0 && (target.st_mode & S_IFMT) == S_IFREG { result.append(name) }
            default: break
            }
        }
        return result
    }

    static func normalize(_ path: String) -> String {
        "/" + path.split(separator: "/").filter { $0 != "." && !$0.isEmpty }.joined(separator: "/")
    }

    static func sha256(of fd: Int32, name: String) throws -> String {
        var hasher = Digest.Hasher()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else {
                throw PipelineError(.failed, "cannot read input \(name): \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            buffer.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        }
        return hasher.finalize().hex
    }
}
