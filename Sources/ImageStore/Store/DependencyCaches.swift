import Glibc
import ImageFormats
import SystemSupport

/// Dependency caches (pip, npm, apt, go mod): directories of the store, `caches/NAME/`, that
/// steps mount read-write at a path and that persist across runs. A cache is never part of a
/// snapshot nor of a key: it may make a step faster, never change its result. `gc` leaves them
/// alone; `cache prune` and `cache rm` remove them.
///
/// Each cache has a lock file (`caches/NAME.lock`): a `locked` use holds it exclusively for the
/// step (steps that share the cache run one at a time on it, in this process or another), a
/// `shared` use holds it shared, and removal takes it exclusively, so a cache in use is never
/// removed under a step. A `private` use takes the cache when it is free and otherwise gets a
/// fresh empty directory of its own for the step, dropped afterwards (as BuildKit's `private`).
public struct DependencyCaches: Sendable {
    public enum Sharing: String, Sendable, CaseIterable, Codable {
        case locked, shared, `private`
    }

    public struct Summary: Sendable {
        public var name: String
        public var bytes: Int64
        public var files: Int
        /// Seconds since the epoch of the last step that used it (the stamp file's mtime).
        public var lastUsed: Double
    }

    /// A cache in use: the directory to mount; `release()` ends the use.
    public final class Use: @unchecked Sendable {
        public let name: String
        public let path: String
        private var lockFD: Int32
        private let scratch: Bool

        init(name: String, path: String, lockFD: Int32, scratch: Bool) {
            self.name = name
            self.path = path
            self.lockFD = lockFD
            self.scratch = scratch
        }

        /// Drops the lock (and a private scratch directory). Idempotent.
        public func release() {
            if scratch { try? FileSystem.removeTree(path) }
            if lockFD >= 0 { close(lockFD) }
            lockFD = -1
        }

        deinit { release() }
    }

    public let root: String

    public init(store: Store) { root = store.root + "/caches" }

    /// A cache name: letters, digits, `-`, `_` and `.`, starting with a letter or digit.
    public static func validate(_ name: String) throws {
        guard let first = name.first, first.isLetter || first.isNumber, name.count <= 128,
            name.allSatisfy({ ($0.isASCII && ($0.isLetter || $0.isNumber)) || "-_.".contains($0) })
        else {
            throw SandboxError(
                .invalidArgument,
                "'\(name)' is not a cache name: use letters, digits, '-', '_' and '.', starting with a letter or digit"
            )
        }
    }

    public func path(of name: String) -> String { root + "/" + name }

    /// Takes the cache for one step (waiting for a `locked` holder), creating it when new.
    /// Blocking: call from a BlockingPool job.
    /// - Parameter onWait: called once before waiting for another holder.
    public func use(_ name: String, sharing: Sharing, scratchID: String, onWait: () -> Void = {}) throws -> Use {
        try DependencyCaches.validate(name)
        try FileSystem.makeDirectory(root, mode: 0o755)
        let (fd, lockPath) = try openLock(name)
        var scratch = false
        do {
            switch sharing {
            case .locked, .shared:
                let operation = sharing == .locked ? LOCK_EX : LOCK_SH
                if flock(fd, operation | LOCK_NB) != 0 {
                    guard errno == EWOULDBLOCK else { throw SandboxError.system("flock(\(lockPath))") }
                    onWait()
                    try DependencyCaches.acquire(fd, operation, lockPath)
                }
            case .private:
                if flock(fd, LOCK_EX | LOCK_NB) != 0 {
                    guard errno == EWOULDBLOCK else { throw SandboxError.system("flock(\(lockPath))") }
                    scratch = true  // nobody else sees it: no lock to wait for
                }
            }
            let path = scratch ? root + "/" + name + ".private-" + scratchID : path(of: name)
            try FileSystem.makeDirectory(path, mode: 0o755)
            if !scratch { try touch(name) }
            return Use(name: name, path: path, lockFD: fd, scratch: scratch)
        } catch {
            close(fd)
            throw error
        }
    }

    /// The caches there are, by name.
    public func list() throws -> [Summary] {
        guard FileSystem.exists(root) else { return [] }
        return try FileSystem.list(root).filter { (try? DependencyCaches.validate($0)) != nil }
            .filter { !$0.hasSuffix(".lock") && !$0.hasSuffix(".used") && !$0.contains(".private-") }
            .sorted().compactMap { name in
                guard let st = try FileSystem.status(root + "/" + name), st.isDirectory else { return nil }
                var bytes: Int64 = 0
                var files = 0
                try TreeWalker.walk(try DirectoryHandle(path: root + "/" + name)) { entry in
                    if !entry.status.isDirectory {
                        bytes += Int64(entry.status.st_blocks) * 512
                        files += 1
                    }
                    return true
                }
                let stamp = try FileSystem.status(root + "/" + name + ".used") ?? st
                return Summary(
                    name: name, bytes: bytes, files: files,
                    lastUsed: Double(stamp.st_mtim.tv_sec) + Double(stamp.st_mtim.tv_nsec) / 1e9)
            }
    }

    /// Removes a cache; refuses while a step uses it.
    public func remove(_ name: String) throws {
        try DependencyCaches.validate(name)
        guard FileSystem.exists(path(of: name)) else {
            throw SandboxError(.notFound, "there is no cache '\(name)'; `contree-pipeline cache ls` lists them")
        }
        let fd = try openLock(name).fd
        defer { close(fd) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            throw SandboxError(.conflict, "the cache '\(name)' is in use by a running step; try again when it ends")
        }
        try FileSystem.removeTree(path(of: name))
        unlink(root + "/" + name + ".used")
    }

    /// Removes the caches no step used for `seconds`; returns their names. A cache in use stays.
    public func prune(olderThan seconds: Double, now: Double = Double(time(nil))) throws -> [String] {
        var removed: [String] = []
        for cache in try list() where now - cache.lastUsed > seconds {
            do {
                try remove(cache.name)
                removed.append(cache.name)
            } catch let error as SandboxError where error.code == .conflict {
                continue
            }
        }
        return removed
    }

    /// The cache as a root image of one layer (origin `cache:NAME`), for `run --cache-to`;
    /// nil when it is missing or empty. Taken under the cache's shared lock.
    public func snapshot(_ name: String, store: Store) throws -> ImageRecord? {
        try DependencyCaches.validate(name)
        let source = path(of: name)
        guard FileSystem.exists(source), !(try FileSystem.list(source)).isEmpty else { return nil }
        return try FileSystem.withLock(root + "/" + name + ".lock", exclusive: false) {
            let lease = try store.acquireLease(layers: [])
            defer { lease.release() }
            let copy = lease.workPath + "/cache"
            let copied = try ChildProcess.run(["cp", "-a", "--reflink=auto", source, copy])
            guard copied.succeeded else {
                throw SandboxError(.childProcess, "cannot copy the cache \(name): \(copied.stderrText)")
            }
            return try Snapshotter(store: store).commit(
                copy, base: nil, config: ImageConfig(), origin: "cache:\(name)", lease: lease
            ).image
        }
    }

    /// Fills a missing or empty cache from an image (`run --cache-from`); false when the cache
    /// has content already (a local cache is never replaced) or another step holds it.
    public func restore(_ name: String, from image: ImageRecord, store: Store) throws -> Bool {
        try DependencyCaches.validate(name)
        try FileSystem.makeDirectory(root, mode: 0o755)
        let fd = try openLock(name).fd
        defer { close(fd) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { return false }
        let target = path(of: name)
        if FileSystem.exists(target) {
            guard try FileSystem.list(target).isEmpty else { return false }
            try FileSystem.removeTree(target)
        }
        let fs = ImageFilesystem(layersTopFirst: image.layers.reversed().map(store.layerPath))
        let staging = root + "/" + name + ".restoring"
        try? FileSystem.removeTree(staging)
        try fs.copyTree(fs.root, to: RawPath(staging))
        guard rename(staging, target) == 0 else { throw SandboxError.system("rename(\(staging))") }
        try touch(name)
        return true
    }

    /// The cache's lock file, open (the caller closes it).
    private func openLock(_ name: String) throws -> (fd: Int32, path: String) {
        let path = root + "/" + name + ".lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        return (fd, path)
    }

    /// Marks the cache used now.
    func touch(_ name: String) throws {
        let stamp = root + "/" + name + ".used"
        let fd = open(stamp, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SandboxError.system("open(\(stamp))") }
        futimens(fd, nil)
        close(fd)
    }

    private static func acquire(_ fd: Int32, _ operation: Int32, _ path: String) throws {
        try BlockingPool.whileBlocked {
            while flock(fd, operation) != 0 {
                guard errno == EINTR else { throw SandboxError.system("flock(\(path))") }
            }
        }
    }
}
