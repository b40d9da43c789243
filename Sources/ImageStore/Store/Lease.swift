import Glibc
import Synchronization
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A claim on layers and a work directory (`tmp/<id>/`) that lasts while its owner lives.
///
/// The owner holds an exclusive flock on `leases/<id>.lock`; when the process dies, the kernel
/// drops the lock and the next command (or `gc`) sees the lease is abandoned and removes its
/// work directory and row. `gc` never removes a layer a live lease names.
public final class Lease: Sendable {
    public let id: String
    public let store: Store
    /// Layers protected from `gc` while the lease lives.
    public let layers: [String]
    // The locked file descriptor; -1 once released. Guarded by the mutex.
    private let fd: Mutex<Int32>

    /// `tmp/<id>`: the lease's private work directory.
    public var workPath: String { store.tmpPath + "/" + id }

    init(id: String, store: Store, layers: [String], fd: Int32) {
        self.id = id
        self.store = store
        self.layers = layers
        self.fd = Mutex(fd)
    }

    deinit { release() }

    /// Removes the work directory and the lease. Safe to call more than once.
    public func release() {
        let owned = fd.withLock { fd -> Int32 in
            let old = fd
            fd = -1
            return old
        }
        guard owned >= 0 else { return }
        try? FileSystem.removeTree(workPath)
        _ = try? store.database.query("DELETE FROM leases WHERE id = ?", [.text(id)])
        unlink(store.leasesPath + "/" + id + ".lock")
        close(owned)
    }
}

extension Store {
    /// Takes a lease on `layers`, atomically checking that `image` (if given) still exists, and
    /// creates its work directory.
    public func acquireLease(layers: [String], image: String? = nil) throws -> Lease {
        let id = UUID().uuidString.lowercased()
        // Lock under a temporary name, then rename: a lease file is never visible unlocked.
        let temporary = leasesPath + "/." + id + ".new"
        let fd = open(temporary, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SandboxError.system("open(\(temporary))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let e = errno
            close(fd)
            unlink(temporary)
            throw SandboxError.system("flock(\(temporary))", e)
        }
        do {
            try FileSystem.rename(temporary, leasesPath + "/" + id + ".lock")
            let encoded = String(decoding: try JSONEncoder().encode(layers), as: UTF8.self)
            try database.transaction { tx in
                if let image, try tx.query("SELECT 1 FROM images WHERE uuid = ?", [.text(image)]).isEmpty {
                    throw SandboxError(.notFound, "image \(image) was removed; pick another image (`image ls`)")
                }
                try tx.query(
                    "INSERT INTO leases(id, pid, layers, created) VALUES(?, ?, ?, ?)",
                    [.text(id), .integer(Int64(getpid())), .text(encoded), .real(Store.now)])
            }
            try FileSystem.makeDirectory(tmpPath + "/" + id, mode: 0o700)
        } catch {
            unlink(temporary)
            unlink(leasesPath + "/" + id + ".lock")
            close(fd)
            throw error
        }
        return Lease(id: id, store: self, layers: layers, fd: fd)
    }

    /// Whether the lease `id` is held by a live process.
    func isLeaseAlive(_ id: String) -> Bool {
        let path = leasesPath + "/" + id + ".lock"
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        if flock(fd, LOCK_EX | LOCK_NB) == 0 {
            flock(fd, LOCK_UN)
            return false
        }
        return true
    }

    /// Ends what a dead run left running detached in its work directory: a process whose pid
    /// is in a `*.pid` file one level down (the VM backend's `-daemonize`d QEMU) and whose
    /// command line names that directory (a pid since reused by another process is left alone).
    static func stopDaemons(in work: String) {
        for child in (try? FileSystem.list(work)) ?? [] {
            let directory = work + "/" + child
            for name in (try? FileSystem.list(directory)) ?? [] where name.hasSuffix(".pid") {
                guard let text = try? FileSystem.readFile(directory + "/" + name),
                    let pid = Int32(String(decoding: text, as: UTF8.self).prefix { $0.isNumber }), pid > 1,
                    let command = try? FileSystem.readFile("/proc/\(pid)/cmdline"),
                    String(decoding: command, as: UTF8.self).contains(directory)
                else { continue }
                kill(pid, SIGKILL)
            }
        }
    }

    /// Removes leases, work directories and cgroups that dead processes left behind. It
    /// carries on past what it cannot remove and reports it.
    /// - Parameter scanningCgroups: look for this store's abandoned cgroups even when no dead
    ///   work was found (gc); otherwise only then, or when an earlier recovery left one.
    /// - Returns: the ids of the abandoned leases that were cleaned up, and what failed.
    @discardableResult
    public func recoverAbandonedWork(
        scanningCgroups: Bool = false
    ) throws -> (removed: [String], failures: [String]) {
        var removed: [String] = []
        var failures: [String] = []
        func removeWork(_ id: String) {
            Store.stopDaemons(in: tmpPath + "/" + id)
            do {
                try FileSystem.removeTree(tmpPath + "/" + id)
            } catch {
                failures.append("abandoned work tmp/\(id) could not be removed: \(error)")
            }
        }
        // Work dirs first: one whose lease file is gone or unlocked is abandoned.
        for name in (try? FileSystem.list(tmpPath)) ?? [] where !isLeaseAlive(name) {
            removeWork(name)
            removed.append(name)
        }
        for name in (try? FileSystem.list(leasesPath)) ?? [] {
            if name.hasSuffix(".lock") {
                let id = String(name.dropLast(5))
                if !isLeaseAlive(id) {
                    removeWork(id)
                    _ = try database.query("DELETE FROM leases WHERE id = ?", [.text(id)])
                    unlink(leasesPath + "/" + name)
                    if !removed.contains(id) { removed.append(id) }
                }
            } else if name.hasSuffix(".new") {
                // A lease that died between its creation and its rename. A young one may be
                // between its open and its flock in another process: leave it.
                guard let st = try? FileSystem.status(leasesPath + "/" + name),
                    Double(st.st_mtim.tv_sec) < Store.now - 60
                else { continue }
                let fd = open(leasesPath + "/" + name, O_RDWR | O_CLOEXEC)
                if fd >= 0 {
                    if flock(fd, LOCK_EX | LOCK_NB) == 0 { unlink(leasesPath + "/" + name) }
                    close(fd)
                }
            }
        }
        // Rows without a lock file at all (their process died after deleting it).
        for row in try database.query("SELECT id FROM leases") {
            guard let id = row["id"].string, !isLeaseAlive(id) else { continue }
            _ = try database.query("DELETE FROM leases WHERE id = ?", [.text(id)])
        }
        // A run's cgroup lives inside its lease's lifetime: only a dead lease can leave one. A
        // sandbox slow to die may keep it past the recovery that removed the lease: a marker
        // brings the next recovery back, so that starting a command with no dead work reads
        // no cgroup directory.
        let marker = leasesPath + "/cgroups-left"
        if scanningCgroups || !removed.isEmpty || FileSystem.exists(marker) {
            if Cgroup.removeAbandoned(storeRoot: root, isAlive: { self.isLeaseAlive($0) }) {
                unlink(marker)
            } else {
                try? FileSystem.writeFile(marker, [], mode: 0o600)
            }
        }
        return (removed, failures)
    }
}
