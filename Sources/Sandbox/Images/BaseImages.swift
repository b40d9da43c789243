import Glibc
import ImageFormats
import ImageStore
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// The built-in images, created on first use without a registry: `busybox` (from Debian's
/// busybox-static; the default image) and `debian:bookworm` (debootstrap minbase).
public struct BaseImages: Sendable {
    public static let names = ["busybox", "debian:bookworm"]
    public static let defaultImage = "busybox"

    public let store: Store
    public let progress: ProgressReporter?
    /// Where references to images outside the store are imported from.
    public let sources: ImageSources

    public init(store: Store, progress: ProgressReporter? = nil, sources: ImageSources = .builtIn) {
        self.store = store
        self.progress = progress
        self.sources = sources
    }

    /// Resolves a reference, building a built-in image the first time it is named.
    /// `debian:bookworm+gcc,make` is debian:bookworm with extra packages: one layer over it (see
    /// `DebianPackageLayer`), or a debootstrap `--include` where the host has no apt.
    /// An external reference (`oci:…`, `docker://…`, see `ImageSources`) is imported on first use.
    public func resolve(_ reference: String, cancellation: Cancellation? = nil) throws -> ImageRecord {
        if let external = sources.resolver(for: reference) { return try external(store, reference, cancellation) }
        let name = try BaseImages.canonical(reference) ?? reference
        if let record = try store.findImage(name) { return record }
        guard BaseImages.isBuiltin(name) else { return try store.resolveImage(reference) }
        return try build(name)
    }

    /// Whether `name` (canonical) names a built-in image.
    public static func isBuiltin(_ name: String) -> Bool {
        names.contains(name) || name.hasPrefix("debian:bookworm+")
    }

    /// The canonical form of a built-in reference with packages (sorted, deduplicated), or nil
    /// for other references.
    /// - Throws: `invalidArgument` for a malformed package list.
    public static func canonical(_ reference: String) throws -> String? {
        guard reference.hasPrefix("debian:bookworm+") else { return nil }
        let list = reference.dropFirst("debian:bookworm+".count).split(separator: ",", omittingEmptySubsequences: false)
        let packages = Set(list.map(String.init))
        for package in packages {
            let valid =
                package.count >= 2 && package.first.map { $0.isLowercase || $0.isNumber } == true
                && package.allSatisfy { $0.isASCII && ($0.isLowercase || $0.isNumber || "+-.".contains($0)) }
            guard valid else {
                throw SandboxError(
                    .invalidArgument,
                    "'\(package)' in \(reference) is not a Debian package name; write debian:bookworm+pkg1,pkg2")
            }
        }
        return "debian:bookworm+" + packages.sorted().joined(separator: ",")
    }

    /// Builds (or rebuilds, when its tag is gone) a built-in image and tags it with its name.
    /// Concurrent callers wait for one build.
    public func build(_ name: String) throws -> ImageRecord {
        let lockPath = store.root + "/builtin-" + name.replacing(":", with: "_") + ".lock"
        return try FileSystem.withLock(lockPath) {
            if let record = try store.findImage(name) { return record }
            let lease = try store.acquireLease(layers: [])
            defer { lease.release() }
            let image: ImageRecord
            switch name {
            case "busybox": image = try buildBusybox(lease: lease)
            case "debian:bookworm": image = try buildDebian(lease: lease, suite: "bookworm", packages: [])
            case let other where other.hasPrefix("debian:bookworm+"):
                let packages = other.dropFirst("debian:bookworm+".count).split(separator: ",").map(String.init)
                if DebianPackageLayer.isAvailable {
                    let parent = try resolve("debian:bookworm")
                    image = try DebianPackageLayer(store: store, progress: progress).build(
                        packages, over: parent, in: lease.workPath + "/packages", task: other, suite: "bookworm")
                } else {
                    image = try buildDebian(lease: lease, suite: "bookworm", packages: packages)
                }
            default:
                throw SandboxError(
                    .notFound, "no built-in image named \(name); built-ins: \(BaseImages.names.joined(separator: ", "))"
                )
            }
            try store.tag(name, image: image.uuid)
            return try store.image(image.uuid) ?? image
        }
    }

    // MARK: busybox

    static let busyboxPath = "/bin/busybox"

    private func buildBusybox(lease: Lease) throws -> ImageRecord {
        let binary = BaseImages.busyboxPath
        guard FileSystem.exists(binary) else {
            throw SandboxError(
                .unsupported, "\(binary) is missing: install Debian's busybox-static (`scripts/setup` does it)")
        }
        guard try !ELF.isDynamic(binary) else {
            throw SandboxError(
                .unsupported,
                "\(binary) is dynamically linked and cannot run alone in an image: install busybox-static instead of busybox"
            )
        }
        let list = try ChildProcess.run([binary, "--list-full"])
        guard list.succeeded else {
            throw SandboxError(.childProcess, "\(binary) --list-full failed: \(list.stderrText)")
        }
        var st = stat()
        lstat(binary, &st)
        let epoch = Int64(st.st_mtim.tv_sec)
        let root = lease.workPath + "/rootfs"
        try FileSystem.makeDirectory(root, mode: 0o755)
        var directories: [String: mode_t] = [
            "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "etc": 0o755,
            "dev": 0o755, "proc": 0o555, "sys": 0o555, "tmp": 0o1777, "root": 0o700, "home": 0o755,
            "var": 0o755, "var/tmp": 0o1777, "mnt": 0o755, "usr/local": 0o755, "usr/local/bin": 0o755,
        ]
        let applets = String(decoding: list.stdout, as: UTF8.self).split(separator: "\n").map(String.init)
        for applet in applets {
            let parent = applet.split(separator: "/").dropLast().joined(separator: "/")
            if !parent.isEmpty && directories[parent] == nil { directories[parent] = 0o755 }
        }
        for (dir, mode) in directories.sorted(by: { $0.key < $1.key }) {
            try FileSystem.makeDirectories(root + "/" + dir)
            chmod(root + "/" + dir, mode)
        }
        try FileSystem.copyContents(from: binary, to: root + "/bin/busybox", mode: 0o755)
        chmod(root + "/bin/busybox", 0o755)
        for applet in applets where applet != "bin/busybox" {
            let target = applet.hasPrefix("bin/") && !applet.dropFirst(4).contains("/") ? "busybox" : "/bin/busybox"
            if symlink(target, root + "/" + applet) != 0 && errno != EEXIST {
                throw SandboxError.system("symlink(\(applet))")
            }
        }
        let files: [(String, String, mode_t)] = [
            (
                "etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
                0o644
            ),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644),
            ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n", 0o644),
            ("etc/hostname", "sandbox\n", 0o644),
            ("etc/shells", "/bin/sh\n/bin/ash\n", 0o644),
        ]
        for (path, content, mode) in files {
            try FileSystem.writeFile(root + "/" + path, Array(content.utf8), mode: mode)
        }
        // One fixed time for every entry: the same busybox gives the same layer digest.
        try BaseImages.setTimes(root, epoch)
        return try Snapshotter(store: store).importRoot(
            root, config: ImageConfig(), origin: "builtin:busybox", lease: lease)
    }

    static func setTimes(_ root: String, _ epoch: Int64) throws {
        for name in try FileSystem.list(root) {
            let path = root + "/" + name
            if FileSystem.isDirectory(path) { try setTimes(path, epoch) }
            try Metadata.setTime(path, epoch)
        }
        try Metadata.setTime(root, epoch)
    }

    // MARK: debian

    private func buildDebian(lease: Lease, suite: String, packages: [String]) throws -> ImageRecord {
        let task = "debian:\(suite)" + (packages.isEmpty ? "" : "+" + packages.joined(separator: ","))
        guard FileSystem.exists("/usr/sbin/debootstrap") else {
            throw SandboxError(.unsupported, "debootstrap is missing: install it (`scripts/setup` does)")
        }
        let root = lease.workPath + "/rootfs"
        let mirror = BaseImages.debianMirror()
        let started = Monotonic.now
        progress?.report(task, "debootstrap --variant=minbase \(suite) from \(mirror)", elapsed: 0)
        var lastLines: [String] = []
        let result = try ChildProcess.run(
            ["/usr/sbin/debootstrap", "--variant=minbase"]
                + (packages.isEmpty ? [] : ["--include=" + packages.joined(separator: ",")]) + [suite, root, mirror],
            environment: [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C",
                "DEBIAN_FRONTEND=noninteractive",
            ]
        ) { line in
            lastLines = Array((lastLines + [line]).suffix(8))
            if line.hasPrefix("I: ") || line.hasPrefix("W: ") || line.hasPrefix("E: ") {
                self.progress?.report(task, String(line.dropFirst(3)), elapsed: Monotonic.now - started)
            }
        }
        guard result.succeeded else {
            throw SandboxError(
                .childProcess,
                "debootstrap failed (exit \(result.status)); its last lines:\n\(lastLines.joined(separator: "\n"))\ncheck that \(mirror) is reachable"
            )
        }
        // Package files debootstrap leaves behind are not part of a base image.
        let archives = root + "/var/cache/apt/archives"
        for name in (try? FileSystem.list(archives)) ?? [] where name.hasSuffix(".deb") {
            unlink(archives + "/" + name)
        }
        try FileSystem.removeTree(root + "/var/log/bootstrap.log")
        chmod(root, 0o755)
        progress?.report(task, "committing the image", elapsed: Monotonic.now - started)
        let image = try Snapshotter(store: store).importRoot(
            root, config: ImageConfig(env: ImageConfig.defaultEnv + ["LANG=C.UTF-8"]),
            origin: "builtin:\(task)", lease: lease)
        progress?.finish(task, "built \(image.uuid) in \(Int(Monotonic.now - started)) s")
        return image
    }

    /// The Debian mirror the host's apt uses, or deb.debian.org.
    static func debianMirror() -> String {
        let sources = ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"]
        for file in sources {
            guard let text = try? String(decoding: FileSystem.readFile(file), as: UTF8.self) else { continue }
            for line in text.split(separator: "\n") {
                let trimmed = line.drop { $0 == " " }
                if trimmed.hasPrefix("URIs:") {
                    if let uri = trimmed.dropFirst(5).split(separator: " ").first, !uri.contains("security") {
                        return String(uri)
                    }
                } else if trimmed.hasPrefix("deb ") {
                    let parts = trimmed.split(separator: " ").filter { !$0.hasPrefix("[") }
                    if parts.count > 1, !parts[1].contains("security") { return String(parts[1]) }
                }
            }
        }
        return "http://deb.debian.org/debian"
    }
}
