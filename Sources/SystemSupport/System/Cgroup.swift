import Glibc
import Synchronization

/// Resource limits of one run.
public struct ResourceLimits: Sendable, Equatable, Codable {
    /// Memory limit in bytes (RAM plus swap where the host accounts it).
    public var memoryBytes: Int64?
    /// CPU quota in cores (0.5 = half a core).
    public var cpus: Double?
    /// Maximum number of tasks (processes and threads) at once.
    public var pids: Int?
    /// The most bytes the run's change may hold: no file grows past it while the run goes
    /// (RLIMIT_FSIZE), and a change that sums to more is not kept (nothing of it is hashed
    /// beyond the limit, and its upper is removed).
    public var layerBytes: Int64?

    public init(memoryBytes: Int64? = nil, cpus: Double? = nil, pids: Int? = 4096, layerBytes: Int64? = nil) {
        self.memoryBytes = memoryBytes
        self.cpus = cpus
        self.pids = pids
        self.layerBytes = layerBytes
    }

    enum CodingKeys: String, CodingKey {
        case memoryBytes = "memory_bytes"
        case layerBytes = "layer_bytes"
        case cpus, pids
    }
}

/// What the cgroup measured.
package struct CgroupMetrics {
    package var peakMemoryBytes: Int64?
    package var oomKills: Int64 = 0
    package var peakTasks: Int64?
    package var cpuUserMicros: Int64?
    package var cpuSystemMicros: Int64?
    package var bytesRead: Int64?
    package var bytesWritten: Int64?
}

/// A cgroup per run, under the cgroup of the process that starts it: cgroup v2 where its
/// controllers are available, v1 otherwise (hybrid hosts have v2 mounted with few controllers).
package struct Cgroup {
    enum Layout: Sendable {
        /// One v2 directory under which runs get children.
        case v2(parent: String)
        /// v1: the parent directory per controller hierarchy (cpu and cpuacct may coincide).
        case v1(parents: [String: String])
        case unavailable(reason: String)
    }

    static let prefix = "contree-"
    let name: String
    let layout: Layout
    /// Directories of this cgroup (one in v2, one per hierarchy in v1).
    package let directories: [String: String]

    private static let detected = Mutex<Layout?>(nil)

    static var layout: Layout {
        detected.withLock { cached in
            if let cached { return cached }
            let layout = detect()
            cached = layout
            return layout
        }
    }

    static func v2MountPoint() -> String? {
        for line in (read("/proc/self/mounts") ?? "").split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count >= 3 && f[2] == "cgroup2" { return String(f[1]) }
        }
        return nil
    }

    private static func detect() -> Layout {
        guard let mounts = try? String(decoding: FileSystem.readFile("/proc/self/mounts"), as: UTF8.self),
            let own = try? String(decoding: FileSystem.readFile("/proc/self/cgroup"), as: UTF8.self)
        else { return .unavailable(reason: "cannot read /proc/self/mounts or /proc/self/cgroup") }
        var v2Mount: String?
        var v1Mounts: [String: String] = [:]
        for line in mounts.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count >= 4 else { continue }
            if f[2] == "cgroup2" { v2Mount = String(f[1]) }
            if f[2] == "cgroup" {
                for option in f[3].split(separator: ",")
                where ["memory", "pids", "cpu", "cpuacct", "blkio"].contains(option) {
                    v1Mounts[String(option)] = String(f[1])
                }
            }
        }
        var ownV1: [String: String] = [:]
        var ownV2 = "/"
        for line in own.split(separator: "\n") {
            let f = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard f.count == 3 else { continue }
            if f[0] == "0" && f[1].isEmpty { ownV2 = String(f[2]) }
            for controller in f[1].split(separator: ",") { ownV1[String(controller)] = String(f[2]) }
        }
        if let v2Mount {
            var parent = v2Mount + (ownV2 == "/" ? "" : ownV2)
            // A process started from a supervisor leaf (below) shares its parent.
            if let slash = parent.lastIndex(of: "/"),
                parent[parent.index(after: slash)...].hasPrefix(prefix + "supervisor-")
            {
                parent = String(parent[..<slash])
            }
            // What this cgroup may hand to its children.
            if let controllers = try? FileSystem.readFile(parent + "/cgroup.controllers") {
                let names = String(decoding: controllers, as: UTF8.self).split(whereSeparator: \.isWhitespace)
                if names.contains("memory") && names.contains("pids"),
                    let prepared = prepareV2(parent: parent, controllers: names.map(String.init))
                {
                    return .v2(parent: prepared)
                }
            }
        }
        guard v1Mounts["memory"] != nil || v1Mounts["pids"] != nil else {
            return .unavailable(
                reason: "no cgroup v2 with memory and pids controllers and no cgroup v1 memory/pids hierarchy")
        }
        var parents: [String: String] = [:]
        for (controller, mount) in v1Mounts {
            let path = ownV1[controller] ?? "/"
            parents[controller] = mount + (path == "/" ? "" : path)
        }
        return .v1(parents: parents)
    }

    /// cgroup v2's "no internal processes" rule: to give runs children with controllers, the
    /// starting process moves into a leaf of its own first.
    private static func prepareV2(parent: String, controllers: [String]) -> String? {
        let wanted = ["memory", "pids", "cpu", "io"].filter(controllers.contains)
        let enable = wanted.map { "+" + $0 }.joined(separator: " ")
        // Leaves of processes that are gone are empty: rmdir fails on the others.
        for name in (try? FileSystem.list(parent)) ?? [] where name.hasPrefix(prefix + "supervisor-") {
            rmdir(parent + "/" + name)
        }
        if write(parent + "/cgroup.subtree_control", enable) { return parent }
        let leaf = parent + "/" + prefix + "supervisor-" + String(getpid())
        mkdir(leaf, 0o755)
        guard write(leaf + "/cgroup.procs", String(getpid())) else { return nil }
        return write(parent + "/cgroup.subtree_control", enable) ? parent : nil
    }

    @discardableResult
    static func write(_ path: String, _ value: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return (try? FileSystem.writeAll(fd: fd, Array(value.utf8), path: path)) != nil
    }

    static func read(_ path: String) -> String? {
        (try? FileSystem.readFile(path)).map { String(decoding: $0, as: UTF8.self) }
    }

    /// Starts, on a thread of its own, a no-op cgroup migration (this process into the cgroup
    /// it is already in). Moving a process between cgroups takes a global lock whose first
    /// writer after an idle spell waits for an RCU grace period (5-17 ms measured on this machine
    /// kind); paying it here, while the caller opens the store and prepares the run, makes the
    /// sandbox's own attach fast. Harmless when the host is tuned (cgroup2 `favordynmods`).
    /// Not on v1, where sandboxes join their cgroups themselves without that lock
    /// (`selfJoinDescriptors`): there a priming write would only hold the cgroup mutex the
    /// run's mkdir needs.
    package static func prime() {
        let target: String?
        switch layout {
        case .v2(let parent):
            // Where this process is now (it may have moved into a leaf of `parent`).
            let own = (read("/proc/self/cgroup") ?? "").split(separator: "\n").first { $0.hasPrefix("0::") }
            let mount = v2MountPoint()
            target =
                own.flatMap { line in mount.map { $0 + line.dropFirst(3) + "/cgroup.procs" } }
                ?? parent + "/cgroup.procs"
        case .v1: target = nil
        case .unavailable: target = nil
        }
        guard let target, geteuid() == 0 else { return }
        var thread = pthread_t()
        let path = strdup(target)
        let rc = pthread_create(
            &thread, nil,
            { raw in
                let path = raw!.assumingMemoryBound(to: CChar.self)
                _ = Cgroup.write(String(cString: path), String(getpid()))
                free(path)
                return nil
            }, path)
        if rc == 0 { pthread_detach(thread) } else { free(path) }
    }

    /// Run cgroups are named `contree-<scope>-<lease id>`; the scope ties them to one store, so
    /// that a store only ever cleans up its own.
    static func scope(storeRoot: String) -> String {
        String(Digest.sha256(storeRoot).hex.prefix(10))
    }

    /// Creates the run's cgroup and applies the limits.
    package static func create(storeRoot: String, id: String, limits: ResourceLimits) throws -> Cgroup {
        let name = prefix + scope(storeRoot: storeRoot) + "-" + id
        switch layout {
        case .unavailable(let reason):
            throw SandboxError(.unsupported, "cgroups are unavailable: \(reason); run as root on a host with cgroups")
        case .v2(let parent):
            let dir = parent + "/" + name
            if mkdir(dir, 0o755) != 0 && errno != EEXIST { throw SandboxError.system("mkdir(\(dir))") }
            let group = Cgroup(name: name, layout: layout, directories: ["unified": dir])
            if let memory = limits.memoryBytes {
                try group.set(dir + "/memory.max", String(memory))
                _ = write(dir + "/memory.swap.max", "0")
            }
            if let pids = limits.pids { try group.set(dir + "/pids.max", String(pids)) }
            if let cpus = limits.cpus { try group.set(dir + "/cpu.max", "\(Int(cpus * 100_000)) 100000") }
            return group
        case .v1(let parents):
            var dirs: [String: String] = [:]
            // Only the hierarchies that limit or measure something: every attach is a write
            // under a global lock. CPU time comes from wait4 (pid 1 reaps the whole tree).
            let wanted = ["memory", "pids"] + (limits.cpus == nil ? [] : ["cpu"])
            for (controller, parent) in parents where wanted.contains(controller) {
                let dir = parent + "/" + name
                if mkdir(dir, 0o755) != 0 && errno != EEXIST {
                    let group = Cgroup(name: name, layout: layout, directories: dirs)
                    group.remove()
                    throw SandboxError.system("mkdir(\(dir))")
                }
                dirs[controller] = dir
            }
            let group = Cgroup(name: name, layout: layout, directories: dirs)
            if let memory = limits.memoryBytes, let dir = dirs["memory"] {
                try group.set(dir + "/memory.limit_in_bytes", String(memory))
                _ = write(dir + "/memory.memsw.limit_in_bytes", String(memory))
            }
            if let pids = limits.pids, let dir = dirs["pids"] { try group.set(dir + "/pids.max", String(pids)) }
            if let cpus = limits.cpus, let dir = dirs["cpu"] {
                try group.set(dir + "/cpu.cfs_period_us", "100000")
                try group.set(dir + "/cpu.cfs_quota_us", String(Int(cpus * 100_000)))
            }
            return group
        }
    }

    private func set(_ path: String, _ value: String) throws {
        guard Cgroup.write(path, value) else {
            let e = errno
            remove()
            throw SandboxError(.sandboxSetup, "cannot set the limit \(path) to \(value)", errno: e)
        }
    }

    /// Descriptors of this cgroup's v1 `tasks` files (close-on-exec), for the sandbox's first
    /// process to join itself before it execs: a task writing "0" there moves itself without
    /// the global lock a migration by pid takes, so no RCU grace period is waited for. Nil on
    /// v2 (a thread may not leave its process's domain that way), or when a file cannot be
    /// opened: then `attach` moves the process by pid.
    package func selfJoinDescriptors() -> [Int32]? {
        guard case .v1 = layout else { return nil }
        var fds: [Int32] = []
        for (_, dir) in directories.sorted(by: { $0.key < $1.key }) {
            let fd = open(dir + "/tasks", O_WRONLY | O_CLOEXEC)
            guard fd >= 0 else {
                fds.forEach { close($0) }
                return nil
            }
            fds.append(fd)
        }
        return fds
    }

    /// Moves a process into the cgroup (in every hierarchy).
    package func attach(_ pid: pid_t) throws {
        for (_, dir) in directories.sorted(by: { $0.key < $1.key }) {
            guard Cgroup.write(dir + "/cgroup.procs", String(pid)) else {
                throw SandboxError(.sandboxSetup, "cannot move the sandbox into the cgroup \(dir)", errno: errno)
            }
        }
    }

    package func metrics() -> CgroupMetrics {
        var m = CgroupMetrics()
        func number(_ path: String) -> Int64? {
            Cgroup.read(path).flatMap { $0.split(whereSeparator: \.isWhitespace).first.flatMap { Int64($0) } }
        }
        func keyed(_ path: String) -> [String: Int64] {
            var out: [String: Int64] = [:]
            for line in (Cgroup.read(path) ?? "").split(separator: "\n") {
                let f = line.split(separator: " ")
                if f.count == 2, let v = Int64(f[1]) { out[String(f[0])] = v }
            }
            return out
        }
        switch layout {
        case .v2:
            guard let dir = directories["unified"] else { return m }
            m.peakMemoryBytes = number(dir + "/memory.peak")
            m.oomKills = keyed(dir + "/memory.events")["oom_kill"] ?? 0
            m.peakTasks = number(dir + "/pids.peak")
            let cpu = keyed(dir + "/cpu.stat")
            m.cpuUserMicros = cpu["user_usec"]
            m.cpuSystemMicros = cpu["system_usec"]
            var read: Int64 = 0
            var written: Int64 = 0
            for line in (Cgroup.read(dir + "/io.stat") ?? "").split(separator: "\n") {
                for field in line.split(separator: " ") {
                    if field.hasPrefix("rbytes=") { read += Int64(field.dropFirst(7)) ?? 0 }
                    if field.hasPrefix("wbytes=") { written += Int64(field.dropFirst(7)) ?? 0 }
                }
            }
            m.bytesRead = read
            m.bytesWritten = written
        case .v1:
            if let dir = directories["memory"] {
                m.peakMemoryBytes = number(dir + "/memory.max_usage_in_bytes")
                m.oomKills = keyed(dir + "/memory.oom_control")["oom_kill"] ?? 0
            }
            if let dir = directories["pids"] { m.peakTasks = number(dir + "/pids.peak") }
        case .unavailable:
            break
        }
        return m
    }

    /// Removes the cgroup directories; the processes in them must be gone.
    package func remove() {
        for (_, dir) in directories {
            // The last task leaves the cgroup a moment after it is reaped.
            for attempt in 0..<50 {
                if rmdir(dir) == 0 || errno == ENOENT { break }
                if errno != EBUSY || attempt == 49 { break }
                usleep(2000)
            }
        }
    }

    /// Removes this store's run cgroups whose lease is dead (their owner was killed).
    /// - Returns: whether none is left (false: one would not go within a second).
    @discardableResult
    package static func removeAbandoned(storeRoot: String, isAlive: (String) -> Bool) -> Bool {
        let mine = prefix + scope(storeRoot: storeRoot) + "-"
        let parents: [String]
        switch layout {
        case .v2(let parent): parents = [parent]
        case .v1(let p): parents = Array(Set(p.values))
        case .unavailable: return true
        }
        var allGone = true
        for parent in parents {
            for name in (try? FileSystem.list(parent)) ?? [] where name.hasPrefix(mine) {
                let id = String(name.dropFirst(mine.count))
                guard !isAlive(id) else { continue }
                // Its owner is dead; a sandbox still dying in it (pdeathsig is asynchronous)
                // is an orphan: finish it.
                let dir = parent + "/" + name
                // A killed process writing to disk may take a moment to go: up to a second.
                var gone = false
                for attempt in 0..<500 {
                    if rmdir(dir) == 0 || errno != EBUSY {
                        gone = true
                        break
                    }
                    for pid in (read(dir + "/cgroup.procs") ?? "").split(separator: "\n").compactMap({ Int32($0) }) {
                        kill(pid, SIGKILL)
                    }
                    if attempt < 499 { usleep(2000) }
                }
                allGone = allGone && gone
            }
        }
        return allGone
    }
}

extension Cgroup {
    /// The cgroup whose directories are `directories` (one that another process made).
    package init(existing directories: [String: String]) {
        self.init(name: "", layout: Cgroup.layout, directories: directories)
    }
}
