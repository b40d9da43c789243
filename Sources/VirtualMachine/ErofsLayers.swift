import Foundation
import ImageStore
import SystemSupport

/// The VM's view of a layer: a read-only erofs image of its directory (overlay whiteouts and
/// opaque markers included, so the guest's overlayfs reads it as the host's does), built with
/// Debian's mkfs.erofs on first use and kept in the store next to the layers.
public enum ErofsLayers {
    /// What gc removes with the layers: `vm/erofs/<layer hex>.erofs` and partial builds of it.
    public struct Files: DerivedLayerFiles {
        public init() {}
        public var directory: String { "vm/erofs" }
        public func layer(ofFile name: String) -> String? {
            name.hasSuffix(".erofs") || name.hasSuffix(".partial") ? String(name.prefix { $0 != "." }) : nil
        }
    }

    /// The erofs image of `layer` (a `sha256:` digest), built if missing.
    public static func image(of layer: String, store: Store) throws -> String {
        try image(ofDirectory: store.layerPath(layer), storeRoot: store.root)
    }

    /// The erofs image of a layer directory of the store at `storeRoot`, built if missing.
    static func image(ofDirectory layerDirectory: String, storeRoot: String) throws -> String {
        let directory = storeRoot + "/" + Files().directory
        try FileSystem.makeDirectories(directory)
        let layer = String(layerDirectory.split(separator: "/").last ?? "")
        let path = directory + "/" + layer.replacingOccurrences(of: "sha256:", with: "") + ".erofs"
        if FileSystem.exists(path) { return path }
        // Unique per builder: concurrent runs in one process may build the same layer.
        let partial = path + ".\(getpid()).\(UUID().uuidString.prefix(8)).partial"
        let result = try ChildProcess.run(["mkfs.erofs", partial, layerDirectory])
        guard result.succeeded else {
            unlink(partial)
            throw SandboxError(.childProcess, "mkfs.erofs for layer \(layer): \(result.stderrText)")
        }
        try FileSystem.rename(partial, path)
        return path
    }
}
