import Foundation
import Glibc
import Sandbox
import Synchronization
import Testing

@testable import VirtualMachine

/// A store kept between test runs: the guest kernel is downloaded and unpacked once.
private func vmStore() throws -> Store { try Store(root: "/var/tmp/contree-vm-tests") }

@Suite(
    "VM backend: one command in a QEMU microvm (TCG here: each boot costs seconds)", .serialized,
    .enabled(if: geteuid() == 0, "needs root"),
    .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64"), "needs qemu-system-x86"))
struct MicroVMTests {
    @Test("the kit: Debian's kernel decompressed to an ELF, modules after their dependencies")
    func kit() async throws {
        let store = try vmStore()
        let kit = try await DedicatedThread.run { try GuestKit.prepare(store: store) }
        #expect(try FileSystem.readFile(kit.kernel).prefix(4).elementsEqual([0x7F, 0x45, 0x4C, 0x46]))
        let order = try GuestKit.moduleOrder(in: store.root + "/vm/kernel-\(kit.release)/lib/modules/\(kit.release)")
            .map(\.name)
        for (module, dependency) in [("ext4", "jbd2"), ("virtio_blk", "virtio_ring"), ("erofs", "libcrc32c")] {
            let a = try #require(order.firstIndex(of: module))
            let b = try #require(order.firstIndex(of: dependency))
            #expect(b < a, "\(dependency) loads before \(module)")
        }
    }

    @Test("a command runs over the image's layers: stdout and stderr apart, stdin in, the exit status out")
    func command() async throws {
        let store = try vmStore()
        let kit = try await DedicatedThread.run { try GuestKit.prepare(store: store) }
        let busybox = try BaseImages(store: store).resolve("busybox")
        let layers = try busybox.layers.map { try ErofsLayers.image(of: $0, store: store) }
        let out = Mutex<[UInt8]>([])
        let err = Mutex<[UInt8]>([])
        let outcome = try await DedicatedThread.run {
            try MicroVM(kit: kit).run(
                .init(
                    argv: ["sh", "-c", "echo hello from $(uname -r); echo oops >&2; cat; cd /tmp && pwd; exit 3"],
                    env: ["GREETING=hi"], layers: layers),
                stdin: Array("piped in\n".utf8), timeout: 120,
                onStdout: { bytes in out.withLock { $0 += bytes } }, onStderr: { bytes in err.withLock { $0 += bytes } })
        }
        #expect(outcome.exitCode == 3, "\(outcome.console ?? "")")
        #expect(String(decoding: out.withLock { $0 }, as: UTF8.self) == "hello from \(kit.release)\npiped in\n/tmp\n")
        #expect(String(decoding: err.withLock { $0 }, as: UTF8.self) == "oops\n")
        #expect(outcome.bootSeconds > 0 && outcome.wallSeconds >= outcome.bootSeconds)
    }
}
