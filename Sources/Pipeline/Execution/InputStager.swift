import Glibc
import ImageStore
import SystemSupport

/// A step's input files as an image of their own (one layer, no parent), so that they can
/// travel to another machine through a registry: each file at its path in the sandbox, with
/// its mode, owned by root, every time the epoch (the same files give the same layer). The
/// machine that runs the step maps the files in from that layer as this one maps them from
/// the pipeline's directory, so the step's snapshot is the same either way.
extension StepRequest {
    /// The inputs' image; nil when the step has none.
    public func stageInputs(store: Store) throws -> ImageRecord? {
        guard !inputs.isEmpty else { return nil }
        let lease = try store.acquireLease(layers: [])
        defer { lease.release() }
        let directory = lease.workPath + "/inputs"
        try FileSystem.makeDirectories(directory)
        var made: [String] = []
        for input in inputs {
            let target = directory + input.sandboxPath
            var parent = directory
            for part in input.sandboxPath.split(separator: "/").dropLast() {
                parent += "/" + part
                if try FileSystem.status(parent) == nil {
                    try FileSystem.makeDirectory(parent, mode: 0o755)
                    made.append(parent)
                }
            }
            let fd = try HostPaths.beneath(inputRoot).open(input.hostPath, what: "input \(input.hostPath)")
            defer { close(fd) }
            let bytes = try FileSystem.readAll(fd: fd, path: input.hostPath)
            try FileSystem.writeFile(target, bytes, mode: mode_t(input.mode & 0o7777))
            chmod(target, mode_t(input.mode & 0o7777))
            made.append(target)
        }
        for path in made.reversed() {
            var times = [timespec(tv_sec: 0, tv_nsec: 0), timespec(tv_sec: 0, tv_nsec: 0)]
            _ = utimensat(AT_FDCWD, path, &times, AT_SYMLINK_NOFOLLOW)
        }
        return try Snapshotter(store: store).commit(
            directory, base: nil, config: ImageConfig(), origin: "inputs:\(node)", lease: lease
        ).image
    }

    /// This request with its inputs mapped from an image `stageInputs` made, unpacked at
    /// `root` (the layer's directory on this machine).
    public func mappingInputs(from root: String) -> StepRequest {
        var request = self
        request.inputs = inputs.map {
            var input = $0
            input.hostPath = String($0.sandboxPath.drop { $0 == "/" })
            return input
        }
        request.inputRoot = root
        return request
    }
}
