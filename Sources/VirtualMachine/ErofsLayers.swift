import Foundation
import Sandbox

/// The VM's view of a layer: a read-only erofs image of its directory (overlay whiteouts and
/// opaque markers included, so the guest's overlayfs reads it as the host's does), built with
/// Debian's mkfs.erofs on first use and kept in the store next to the layers.
public enum ErofsLayers {
    /// The erofs image of `layer` (a `sha256:` digest), built if missing.
    public static func image(of layer: String, store: Store) throws -> String {
        let directory = store.root + "/vm/erofs"
        try FileSystem.makeDirectories(directory)
        let path = directory + "/" + layer.replacingOccurrences(of: "sha256:", with: "") + ".erofs"
        if FileSystem.exists(path) { return path }
        let partial = path + ".\(getpid()).partial"
        let result = try ChildProcess.run(["mkfs.erofs", "-T0", partial, store.layerPath(layer)])
        guard result.succeeded else {
            unlink(partial)
            throw SandboxError(.childProcess, "mkfs.erofs for layer \(layer): \(result.stderrText)")
        }
        try FileSystem.rename(partial, path)
        return path
    }
}
