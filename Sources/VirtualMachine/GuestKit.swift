import Foundation
import Glibc
import ImageFormats
import ImageStore
import Sandbox
import SystemSupport

/// What a contree VM boots: Debian's kernel, uncompressed (QEMU's microvm enters it through
/// PVH), and an initramfs holding the kernel modules the guest needs and the guest agent as
/// `/init`. The kernel package is downloaded with apt and unpacked into the store, never
/// installed on the host; everything is built once per store and reused.
public struct GuestKit: Sendable {
    /// The uncompressed kernel (ELF with a PVH entry note).
    public let kernel: String
    public let initramfs: String
    /// The kernel release, e.g. `6.1.0-56-amd64`.
    public let release: String

    /// Modules the agent needs (virtio-mmio transport, disks, the serial port, the file
    /// systems); their dependencies come from each module's `.modinfo`.
    static let wanted = [
        "crc32c_generic", "virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "erofs", "overlay", "ext4",
    ]

    /// The kit for `store`, building what is missing (the download needs Debian's mirror).
    public static func prepare(store: Store, progress: ProgressReporter? = nil) throws -> GuestKit {
        try prepare(storeRoot: store.root, progress: progress)
    }

    static func prepare(storeRoot: String, progress: ProgressReporter? = nil) throws -> GuestKit {
        try FileSystem.makeDirectories(storeRoot + "/vm")
        // The kit's paths are recorded (kit-*) and read by every store that shares this directory
        // through a symlink: they name it by its real path, never through one store's link.
        guard let resolved = realpath(storeRoot + "/vm", nil) else {
            throw SandboxError.system("realpath(\(storeRoot)/vm)")
        }
        let root = String(cString: resolved)
        free(resolved)
        // What an earlier run prepared with this agent: asking apt and walking the modules
        // costs most of a second, so the answer is kept.
        let agent = try agentProgram()
        let agentDigest = try OCI.sha256(file: agent).digest
        let remembered = root + "/kit-" + agentDigest.dropFirst(7).prefix(16)
        if let kit = recalled(remembered) { return kit }
        // One preparer at a time, across processes and threads (a flock per open).
        return try FileSystem.withLock(root + "/kit.lock", mode: 0o644) {
            if let kit = recalled(remembered) { return kit }  // made while this one waited
            let release = try kernelRelease()
            let kernelDirectory = root + "/kernel-" + release
            if !FileSystem.exists(kernelDirectory + "/vmlinux") {
                progress?.report("vm", "fetching Debian's kernel \(release)", elapsed: 0)
                try fetchKernel(release: release, into: kernelDirectory, scratch: root)
            }
            let modules = try moduleOrder(in: kernelDirectory + "/lib/modules/" + release)
            // Named by what goes in, so a new agent or module set makes a new initramfs.
            let name = Digest.sha256(agentDigest + modules.map(\.name).joined(separator: ",") + ",init3").hex
                .prefix(16)
            let initramfs = kernelDirectory + "/initramfs-\(name).cpio"
            if !FileSystem.exists(initramfs) {
                var archive = CPIOWriter()
                for directory in ["dev", "proc", "sys", "lib", "lib/modules"] { archive.directory(directory) }
                // The agent is a static C program (no Swift runtime: see agent.c) and /init itself.
                archive.file("init", bytes: try FileSystem.readFile(agent), mode: 0o755)
                for module in modules {
                    archive.file(
                        "lib/modules/\(module.name).ko", bytes: try FileSystem.readFile(module.path), mode: 0o644)
                }
                archive.file(
                    "lib/modules/order", bytes: Array(modules.map(\.name).joined(separator: "\n").utf8), mode: 0o644)
                try FileSystem.writeFile(initramfs + ".partial", archive.finish(), mode: 0o644)
                try FileSystem.rename(initramfs + ".partial", initramfs)
            }
            let kit = GuestKit(kernel: kernelDirectory + "/vmlinux", initramfs: initramfs, release: release)
            try FileSystem.writeFile(
                remembered, Array([release, kit.kernel, kit.initramfs].joined(separator: "\n").utf8), mode: 0o644)
            return kit
        }
    }

    /// A kit written down by `prepare`, if its files are still there.
    static func recalled(_ path: String) -> GuestKit? {
        guard let text = try? FileSystem.readFile(path) else { return nil }
        let lines = String(decoding: text, as: UTF8.self).split(separator: "\n").map(String.init)
        guard lines.count == 3, FileSystem.exists(lines[1]), FileSystem.exists(lines[2]) else { return nil }
        return GuestKit(kernel: lines[1], initramfs: lines[2], release: lines[0])
    }

    /// The release `linux-image-amd64` depends on in the host's apt lists.
    static func kernelRelease() throws -> String {
        let result = try ChildProcess.run(["apt-cache", "depends", "linux-image-amd64"])
        let text = String(decoding: result.stdout, as: UTF8.self)
        guard result.succeeded,
            let match = text.firstMatch(of: /Depends: linux-image-([0-9][^\s]*-amd64)/)
        else {
            throw SandboxError(
                .unsupported,
                "the VM backend needs Debian's kernel package, and apt knows no linux-image-amd64 (run scripts/setup, which runs apt-get update): \(result.stderrText)"
            )
        }
        return String(match.1)
    }

    /// Downloads `linux-image-RELEASE`, unpacks it, and decompresses its kernel.
    static func fetchKernel(release: String, into directory: String, scratch: String) throws {
        let work = scratch + "/download-\(getpid())"
        try? FileSystem.removeTree(work)
        try FileSystem.makeDirectories(work)
        defer { try? FileSystem.removeTree(work) }
        let download = try ChildProcess.run([
            "sh", "-c", "cd \"$1\" && apt-get -o APT::Sandbox::User=root download \"linux-image-$2\"", "sh", work,
            release,
        ])
        guard download.succeeded, let deb = try FileSystem.list(work).first(where: { $0.hasSuffix(".deb") }) else {
            throw SandboxError(
                .childProcess,
                "could not download Debian's kernel package linux-image-\(release) (is Debian's mirror reachable?): \(download.stderrText)"
            )
        }
        let unpacked = work + "/x"
        let extract = try ChildProcess.run(["dpkg-deb", "-x", work + "/" + deb, unpacked])
        guard extract.succeeded else { throw SandboxError(.childProcess, "dpkg-deb -x \(deb): \(extract.stderrText)") }
        let staging = directory + ".partial"
        try? FileSystem.removeTree(staging)
        try FileSystem.makeDirectories(staging + "/lib/modules")
        try FileSystem.rename(unpacked + "/lib/modules/" + release, staging + "/lib/modules/" + release)
        try decompressKernel(unpacked + "/boot/vmlinuz-" + release, to: staging + "/vmlinux")
        try FileSystem.rename(staging, directory)
    }

    /// A bzImage carries the kernel compressed after its setup code: find the stream by its
    /// magic and decompress it (xz, zstd or gzip, whichever Debian used).
    static func decompressKernel(_ bzImage: String, to output: String) throws {
        let bytes = try FileSystem.readFile(bzImage)
        let formats: [(magic: [UInt8], command: String)] = [
            ([0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00], "xz -dc --single-stream"),
            ([0x28, 0xB5, 0x2F, 0xFD], "zstd -dc"),
            ([0x1F, 0x8B, 0x08], "gzip -dc"),
        ]
        for format in formats {
            guard let offset = find(format.magic, in: bytes) else { continue }
            // Trailing bytes after the stream make the decompressors complain; the output counts.
            let result = try ChildProcess.run([
                "sh", "-c", "tail -c +\"$1\" \"$2\" | \(format.command) > \"$3\" 2>/dev/null; true", "sh",
                String(offset + 1), bzImage, output,
            ])
            if result.succeeded, let elf = try? FileSystem.readFile(output).prefix(4),
                elf.elementsEqual([0x7F, 0x45, 0x4C, 0x46])
            {
                return
            }
        }
        throw SandboxError(.unsupported, "\(bzImage): no compressed kernel found inside (xz, zstd or gzip)")
    }

    static func find(_ needle: [UInt8], in haystack: [UInt8]) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        for i in 0...(haystack.count - needle.count) where haystack[i] == needle[0] {
            if haystack[i..<(i + needle.count)].elementsEqual(needle) { return i }
        }
        return nil
    }

    /// The wanted modules and what they depend on, each after its dependencies.
    static func moduleOrder(in modules: String) throws -> [(name: String, path: String)] {
        var paths: [String: String] = [:]
        let enumerator = FileManager.default.enumerator(atPath: modules + "/kernel")
        while let relative = enumerator?.nextObject() as? String {
            guard relative.hasSuffix(".ko") else { continue }
            let name = String(relative.split(separator: "/").last!.dropLast(3)).replacingOccurrences(of: "-", with: "_")
            paths[name] = modules + "/kernel/" + relative
        }
        var ordered: [(name: String, path: String)] = []
        var visiting = Set<String>()
        func visit(_ raw: String) throws {
            let name = raw.replacingOccurrences(of: "-", with: "_")
            guard !ordered.contains(where: { $0.name == name }), !visiting.contains(name) else { return }
            guard let path = paths[name] else {
                // Built into the kernel (modules.builtin) or absent: nothing to load.
                return
            }
            visiting.insert(name)
            for dependency in try dependencies(of: path) { try visit(dependency) }
            ordered.append((name, path))
        }
        for name in wanted { try visit(name) }
        return ordered
    }

    /// `depends=a,b` from a module's `.modinfo` strings.
    static func dependencies(of module: String) throws -> [String] {
        let bytes = try FileSystem.readFile(module)
        guard let start = find(Array("depends=".utf8), in: bytes) else { return [] }
        let value = bytes[(start + 8)...].prefix { $0 != 0 }
        return String(decoding: value, as: UTF8.self).split(separator: ",").map(String.init)
    }

    /// The guest agent: `$CONTREE_AGENT`, or next to the running binary.
    static func agentProgram() throws -> String {
        try ContainerBackend.companionProgram("contree-agent", override: "CONTREE_AGENT")
    }
}

/// An initramfs archive: cpio in the "newc" format the kernel unpacks.
struct CPIOWriter {
    private var bytes: [UInt8] = []
    private var inode = 1

    mutating func directory(_ path: String) { entry(path, mode: 0o040755, data: []) }

    mutating func file(_ path: String, bytes data: [UInt8], mode: UInt32) {
        entry(path, mode: 0o100000 | mode, data: data)
    }

    private mutating func entry(_ name: String, mode: UInt32, data: [UInt8]) {
        func hex(_ value: Int) -> String {
            let digits = String(value, radix: 16)
            return String(repeating: "0", count: 8 - digits.count) + digits
        }
        let fields = [inode, Int(mode), 0, 0, 1, 0, data.count, 0, 0, 0, 0, name.utf8.count + 1, 0]
        inode += 1
        bytes += Array(("070701" + fields.map(hex).joined()).utf8) + Array(name.utf8) + [0]
        pad()
        bytes += data
        pad()
    }

    private mutating func pad() { while bytes.count % 4 != 0 { bytes.append(0) } }

    mutating func finish() -> [UInt8] {
        entry("TRAILER!!!", mode: 0, data: [])
        return bytes
    }
}
