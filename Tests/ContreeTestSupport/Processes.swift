import SystemSupport

/// How many processes run with this command line (arguments each followed by a NUL, as
/// /proc/PID/cmdline holds them): a sandbox's command, seen from the host.
public func processCount(commandLine: [String]) throws -> Int {
    let wanted = commandLine.map { $0 + "\u{0}" }.joined()
    return try FileSystem.list("/proc").filter { $0.allSatisfy(\.isNumber) }.filter { pid in
        let cmdline = (try? FileSystem.readFile("/proc/\(pid)/cmdline")) ?? []
        return String(decoding: cmdline, as: UTF8.self) == wanted
    }.count
}
