// contree-bench vm: in one run, a bare `qemu-system-x86_64` cold boot of the guest kernel and
// initramfs that only powers off (the floor); `exec --isolation vm -- true` by cold boot
// (CONTREE_VM_COLD=1); the same restored from a template; and a 10-step pipeline with
// `isolation: vm`. The accelerator is printed: on this machine kind KVM cannot run Debian's
// kernel, so every figure is under TCG emulation.
import Foundation
import Glibc
import ImageStore
import Sandbox
import SystemSupport
import VirtualMachine

struct VMBench {
    let home: String
    let rounds: Int
    let cli: String

    func measure() async throws {
        let store = try Store(root: home)
        let kit = try GuestKit.prepare(store: store, progress: ProgressReporter())
        _ = try BaseImages(store: store).resolve("busybox")
        let env =
            ProcessInfo.processInfo.environment.filter { $0.key != "CONTREE_HOME" }.map { "\($0.key)=\($0.value)" }
            + ["CONTREE_HOME=\(home)"]
        // The first VM run probes the accelerator and saves the template: not measured.
        _ = try timed([cli, "exec", "--isolation", "vm", "--disposable", "--", "true"], env: env)
        let accelerator =
            (try? FileSystem.readFile(home + "/vm/accelerator-" + kit.release))
            .map { String(decoding: $0, as: UTF8.self) } ?? "?"
        var floor: [Double] = []
        var cold: [Double] = []
        var restored: [Double] = []
        for _ in 0..<rounds {
            floor.append(
                try timed([
                    "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off", "-accel",
                    accelerator, "-cpu", "max", "-m", "256",
                    "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-kernel", kit.kernel,
                    "-initrd", kit.initramfs, "-append",
                    "quiet panic=-1 reboot=t tsc_early_khz=2000000 lpj=8000000 no_timer_check rdinit=/bin/busybox -- poweroff -f",
                ]))
            cold.append(
                try timed(
                    [cli, "exec", "--isolation", "vm", "--disposable", "--", "true"], env: env + ["CONTREE_VM_COLD=1"]))
            restored.append(try timed([cli, "exec", "--isolation", "vm", "--disposable", "--", "true"], env: env))
        }
        var yaml =
            "name: bench-vm\nimage: busybox\nenv: {SALT: \(UUID().uuidString.prefix(8))}\ndefaults:\n  isolation: vm\nsteps:\n"
        for i in 1...10 { yaml += "  - id: s\(i)\n    run: echo \(i) > f\(i)\n" }
        let file = home + "/vm-bench.yaml"
        try yaml.write(toFile: file, atomically: true, encoding: .utf8)
        let pipeline = try timed([cli, "run", file, "--out", home + "/vm-bench-out", "--json"], env: env)

        print("VM backend, accelerator: \(accelerator) (kernel \(kit.release)), medians of \(rounds)")
        print(pad("bare qemu boot to power-off (floor)", 44) + ms(median(floor)))
        print(pad("exec --isolation vm -- true, cold boot", 44) + ms(median(cold)))
        print(pad("exec --isolation vm -- true, from template", 44) + ms(median(restored)))
        print(pad("10-step pipeline, isolation: vm", 44) + ms(pipeline))
        print(String(format: "cold run / floor: %.2f (target <= 1.3)", median(cold) / median(floor)))
        print(String(format: "template run / cold run: %.2f (target <= 0.2)", median(restored) / median(cold)))
        print(
            String(
                format: "10-step pipeline / one cold run: %.2f (target <= 1: at most one cold boot)",
                pipeline / median(cold)))
    }
}
