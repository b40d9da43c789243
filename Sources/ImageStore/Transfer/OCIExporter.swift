import Glibc
import ImageFormats
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Writes an image as a standard image other tools run: an OCI image layout (`oci:DIR[:TAG]`),
/// an OCI archive (`oci-archive:FILE[:TAG]`) or `docker load` input
/// (`docker-archive:FILE[:NAME:TAG]`). Each layer is the store's canonical tar stream, whose
/// sha256 is the layer's name: blob digest and diff_id are the same, and a layer already in
/// the destination is not written again.
public struct OCIExporter: Sendable {
    public let store: Store

    public init(store: Store) {
        self.store = store
    }

    /// Exports `image` to `destination`; returns the manifest's digest.
    @discardableResult
    public func export(_ image: ImageRecord, to destination: String) throws -> String {
        if destination.hasPrefix("oci:") {
            let (path, tag) = OCIImporter.splitTag(String(destination.dropFirst(4)))
            return try writeLayout(image, into: path, tag: tag ?? "latest")
        }
        let lease = try store.acquireLease(layers: image.layers, image: image.uuid)
        defer { lease.release() }
        let staging = lease.workPath + "/export"
        let file: String
        let digest: String
        if destination.hasPrefix("oci-archive:") {
            let (path, tag) = OCIImporter.splitTag(String(destination.dropFirst("oci-archive:".count)))
            file = path
            digest = try writeLayout(image, into: staging, tag: tag ?? "latest")
        } else if destination.hasPrefix("docker-archive:") {
            let rest = String(destination.dropFirst("docker-archive:".count))
            // FILE[:NAME:TAG]: the file is what comes before the first ':' that is followed by a name.
            let parts = rest.split(separator: ":", maxSplits: 1).map(String.init)
            file = parts[0]
            let reference = parts.count == 2 ? parts[1] : "contree/\(image.uuid.prefix(12)):latest"
            digest = try writeDockerArchive(image, into: staging, reference: reference)
        } else {
            throw SandboxError(
                .invalidArgument,
                "'\(destination)' is not an export destination: use oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:NAME:TAG]"
            )
        }
        try OCIExporter.tarDirectory(staging, to: file)
        return digest
    }

    /// The config document of an image.
    public func configuration(_ image: ImageRecord) -> OCI.ImageConfiguration {
        OCI.ImageConfiguration(
            architecture: "amd64", os: "linux", created: rfc3339(image.created),
            config: OCI.ImageConfiguration.RunConfig(
                env: image.config.env, workingDir: image.config.workingDir, user: image.config.user, cmd: ["/bin/sh"],
                entrypoint: nil),
            rootfs: OCI.ImageConfiguration.RootFS(type: "layers", diffIDs: image.layers))
    }

    /// Writes one layer's tar stream into `path` unless it is there, checking its digest;
    /// returns its size.
    public func writeLayer(_ digest: String, to path: String) throws -> Int64 {
        if let st = try FileSystem.status(path), st.isRegular { return Int64(st.st_size) }
        let temporary = path + ".partial"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SandboxError.system("open(\(temporary))") }
        var size: Int64 = 0
        do {
            defer { close(fd) }
            let summary = try LayerArchiver.archive(directory: store.layerPath(digest)) { chunk in
                try FileSystem.writeAll(fd: fd, chunk, path: temporary)
                size += Int64(chunk.count)
            }
            guard summary.digest == digest else {
                throw SandboxError(
                    .corrupt, "layer \(digest) archives to \(summary.digest): the store is damaged; run `fsck`")
            }
        } catch {
            unlink(temporary)
            throw error
        }
        try FileSystem.rename(temporary, path)
        return size
    }

    private func writeBlob(_ bytes: [UInt8], root: String) throws -> OCI.Descriptor {
        let digest = Digest.sha256(bytes).description
        let path = root + "/blobs/sha256/" + digest.dropFirst(7)
        if !FileSystem.exists(path) { try FileSystem.writeFile(path, bytes, mode: 0o644) }
        return OCI.Descriptor(mediaType: nil, digest: digest, size: Int64(bytes.count))
    }

    /// An OCI image layout in `root` (added to what is there); returns the manifest digest.
    private func writeLayout(_ image: ImageRecord, into root: String, tag: String) throws -> String {
        try FileSystem.makeDirectories(root + "/blobs/sha256")
        if FileSystem.exists(root + "/index.json") && !FileSystem.exists(root + "/oci-layout") {
            throw SandboxError(
                .invalidArgument, "\(root) holds an index.json but is not an OCI layout; pick another directory")
        }
        var layers: [OCI.Descriptor] = []
        for digest in image.layers {
            let size = try writeLayer(digest, to: root + "/blobs/sha256/" + digest.dropFirst(7))
            layers.append(OCI.Descriptor(mediaType: OCI.layerTar, digest: digest, size: size))
        }
        var config = try writeBlob(try OCI.encode(configuration(image)), root: root)
        config.mediaType = OCI.configType
        let manifest = OCI.Document(
            schemaVersion: 2, mediaType: OCI.manifestType, manifests: nil, config: config, layers: layers,
            annotations: nil)
        var manifestDescriptor = try writeBlob(try OCI.encode(manifest), root: root)
        manifestDescriptor.mediaType = OCI.manifestType
        manifestDescriptor.annotations = [OCI.refName: tag]
        var index = OCI.Document(
            schemaVersion: 2, mediaType: OCI.indexType, manifests: [], config: nil, layers: nil, annotations: nil)
        if FileSystem.exists(root + "/index.json") {
            index = try OCI.decode(
                OCI.Document.self, try FileSystem.readFile(root + "/index.json"), what: "\(root)/index.json")
        }
        index.manifests = (index.manifests ?? []).filter { $0.annotations?[OCI.refName] != tag } + [manifestDescriptor]
        try FileSystem.writeFile(root + "/index.json", try OCI.encode(index), mode: 0o644)
        try FileSystem.writeFile(root + "/oci-layout", Array(#"{"imageLayoutVersion":"1.0.0"}"#.utf8), mode: 0o644)
        return manifestDescriptor.digest
    }

    /// `docker save`'s layout: manifest.json, the config, and one `HEX/layer.tar` per layer.
    private func writeDockerArchive(_ image: ImageRecord, into root: String, reference: String) throws -> String {
        try FileSystem.makeDirectories(root)
        var layerPaths: [String] = []
        for digest in image.layers {
            let directory = String(digest.dropFirst(7))
            try FileSystem.makeDirectories(root + "/" + directory)
            _ = try writeLayer(digest, to: root + "/" + directory + "/layer.tar")
            layerPaths.append(directory + "/layer.tar")
        }
        let configBytes = try OCI.encode(configuration(image))
        let configName = Digest.sha256(configBytes).hex + ".json"
        try FileSystem.writeFile(root + "/" + configName, configBytes, mode: 0o644)
        let repoTag = reference.contains(":") ? reference : reference + ":latest"
        let manifest = try OCI.encode([
            OCI.DockerArchiveEntry(config: configName, repoTags: [repoTag], layers: layerPaths)
        ])
        try FileSystem.writeFile(root + "/manifest.json", manifest, mode: 0o644)
        return Digest.sha256(manifest).description
    }

    /// A tar of `directory`'s contents (GNU tar), written atomically.
    static func tarDirectory(_ directory: String, to file: String) throws {
        let temporary = file + ".partial"
        let result = try ChildProcess.run(
            ["tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-C", directory, "-cf", temporary, "."])
        guard result.succeeded else {
            unlink(temporary)
            throw SandboxError(.childProcess, "writing \(file) failed: \(result.stderrText)")
        }
        try FileSystem.rename(temporary, file)
    }
}

/// RFC 3339 in UTC, as image configs write `created`.
func rfc3339(_ date: Date) -> String {
    var seconds = time_t(date.timeIntervalSince1970)
    var parts = tm()
    gmtime_r(&seconds, &parts)
    func pad(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
    return
        "\(parts.tm_year + 1900)-\(pad(parts.tm_mon + 1))-\(pad(parts.tm_mday))T\(pad(parts.tm_hour)):\(pad(parts.tm_min)):\(pad(parts.tm_sec))Z"
}
