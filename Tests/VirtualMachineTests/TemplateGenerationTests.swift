import Foundation
import SystemSupport
import Testing

@testable import VirtualMachine

/// Templates shared by processes: each is made into a generation of its own, and dropping one
/// removes only the generation that failed. (Without QEMU: the files are stand-ins.)
@Suite("VM templates: generations shared by processes")
struct TemplateGenerationTests {
    @Test("a template dropped by a process whose restore failed leaves the one another process made since")
    func forgetOnlyTheFailedGeneration() throws {
        let root = "/tmp/contree-templates-" + UUID().uuidString.lowercased().prefix(12)
        defer { try? FileSystem.removeTree(root) }
        let backend = VMBackend()
        let vm = MicroVM(
            kit: GuestKit(kernel: "/nonexistent/vmlinux", initramfs: "/nonexistent/initramfs", release: "test"))
        func generation(_ name: String) throws -> MicroVM.Template {
            let directory = root + "/vm/templates/" + backend.guestIdentity(vm) + "/" + name
            try FileSystem.makeDirectories(directory)
            for file in ["ram", "state"] { try FileSystem.writeFile(directory + "/" + file, [1], mode: 0o644) }
            return MicroVM.Template(ram: directory + "/ram", state: directory + "/state", layerSlots: 1)
        }
        let keyDirectory = root + "/vm/templates/" + backend.guestIdentity(vm)
        let old = try generation("g-old")
        let new = try generation("g-new")
        try FileSystem.writeFile(keyDirectory + "/current", Array("g-new".utf8), mode: 0o644)

        // A process that held the old generation finds it would not restore: the new one stays.
        backend.forgetTemplate(old, for: vm, root: root)
        #expect(!FileSystem.exists(old.state))
        #expect(new.isWhole)
        #expect(VMBackend.currentGeneration(keyDirectory) == "g-new")
        let current = try backend.template(for: vm, root: root)
        #expect(current.state == new.state, "the template in use is the current generation, not made again")

        // The current generation failing drops it and names none: the next run makes one.
        backend.forgetTemplate(new, for: vm, root: root)
        #expect(!FileSystem.exists(new.state))
        #expect(VMBackend.currentGeneration(keyDirectory) == nil)
        #expect(FileSystem.exists(keyDirectory + "/lock"), "the lock file stays: it is what processes wait on")
    }
}
