import Glibc
import SystemSupport

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// The OCI image format's documents (image-spec v1) and Docker schema 2's equivalents, as far
/// as import and export need them.
public enum OCI {
    public static let indexType = "application/vnd.oci.image.index.v1+json"
    public static let manifestType = "application/vnd.oci.image.manifest.v1+json"
    public static let configType = "application/vnd.oci.image.config.v1+json"
    public static let layerTar = "application/vnd.oci.image.layer.v1.tar"
    public static let layerGzip = "application/vnd.oci.image.layer.v1.tar+gzip"
    public static let layerZstd = "application/vnd.oci.image.layer.v1.tar+zstd"
    public static let dockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
    public static let dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
    public static let dockerLayerGzip = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    public static let dockerConfig = "application/vnd.docker.container.image.v1+json"
    public static let refName = "org.opencontainers.image.ref.name"

    public struct Platform: Codable, Sendable, Equatable {
        public var architecture: String
        public var os: String
        public var variant: String?

        public init(architecture: String, os: String, variant: String? = nil) {
            self.architecture = architecture
            self.os = os
            self.variant = variant
        }

        /// `linux/amd64`, `linux/arm64/v8`.
        public init(parsing text: String) throws {
            let parts = text.split(separator: "/").map(String.init)
            guard parts.count == 2 || parts.count == 3 else {
                throw SandboxError(.invalidArgument, "platform '\(text)' must be OS/ARCH[/VARIANT], e.g. linux/amd64")
            }
            self.init(architecture: parts[1], os: parts[0], variant: parts.count == 3 ? parts[2] : nil)
        }

        public var description: String { "\(os)/\(architecture)" + (variant.map { "/" + $0 } ?? "") }
    }

    public struct Descriptor: Codable, Sendable {
        public var mediaType: String?
        public var digest: String
        public var size: Int64
        public var annotations: [String: String]?
        public var platform: Platform?

        public init(mediaType: String?, digest: String, size: Int64, annotations: [String: String]? = nil) {
            self.mediaType = mediaType
            self.digest = digest
            self.size = size
            self.annotations = annotations
        }
    }

    /// An image index or a manifest (they are told apart by `mediaType` or by which list is set).
    public struct Document: Codable, Sendable {
        public var schemaVersion: Int?
        public var mediaType: String?
        public var manifests: [Descriptor]?
        public var config: Descriptor?
        public var layers: [Descriptor]?
        public var annotations: [String: String]?

        public init(
            schemaVersion: Int? = 2, mediaType: String?, manifests: [Descriptor]? = nil, config: Descriptor? = nil,
            layers: [Descriptor]? = nil, annotations: [String: String]? = nil
        ) {
            self.schemaVersion = schemaVersion
            self.mediaType = mediaType
            self.manifests = manifests
            self.config = config
            self.layers = layers
            self.annotations = annotations
        }
    }

    /// The image configuration: what runs, and the layers' diff_ids.
    public struct ImageConfiguration: Codable, Sendable {
        public struct RunConfig: Codable, Sendable {
            public var env: [String]?
            public var workingDir: String?
            public var user: String?
            public var cmd: [String]?
            public var entrypoint: [String]?

            public init(env: [String]?, workingDir: String?, user: String?, cmd: [String]?, entrypoint: [String]?) {
                self.env = env
                self.workingDir = workingDir
                self.user = user
                self.cmd = cmd
                self.entrypoint = entrypoint
            }

            enum CodingKeys: String, CodingKey {
                case env = "Env", workingDir = "WorkingDir", user = "User", cmd = "Cmd", entrypoint = "Entrypoint"
            }
        }
        public struct RootFS: Codable, Sendable {
            public var type: String
            public var diffIDs: [String]

            public init(type: String, diffIDs: [String]) {
                self.type = type
                self.diffIDs = diffIDs
            }

            enum CodingKeys: String, CodingKey {
                case type
                case diffIDs = "diff_ids"
            }
        }
        public var architecture: String?
        public var os: String?
        public var created: String?
        public var config: RunConfig?
        public var rootfs: RootFS

        public init(architecture: String?, os: String?, created: String?, config: RunConfig?, rootfs: RootFS) {
            self.architecture = architecture
            self.os = os
            self.created = created
            self.config = config
            self.rootfs = rootfs
        }
    }

    /// `docker save`'s manifest.json entry.
    public struct DockerArchiveEntry: Codable, Sendable {
        public var config: String
        public var repoTags: [String]?
        public var layers: [String]

        public init(config: String, repoTags: [String]?, layers: [String]) {
            self.config = config
            self.repoTags = repoTags
            self.layers = layers
        }

        enum CodingKeys: String, CodingKey {
            case config = "Config", repoTags = "RepoTags", layers = "Layers"
        }
    }

    /// The manifest an image index offers for `platform`. - Throws: `notFound` naming what it offers.
    public static func choose(_ platform: Platform, from index: Document, name: String) throws -> Descriptor {
        let choices = index.manifests ?? []
        guard
            let chosen = choices.first(where: {
                $0.platform?.os == platform.os && $0.platform?.architecture == platform.architecture
                    && (platform.variant == nil || $0.platform?.variant == platform.variant)
            })
        else {
            let offered = choices.compactMap { $0.platform?.description }.joined(separator: ", ")
            throw SandboxError(
                .notFound,
                "\(name) has no image for \(platform.description) (it has: \(offered)); pick one with --platform")
        }
        return chosen
    }

    /// A digest as the spec writes it: `sha256:` and 64 lower-case hex digits.
    public static func checkDigest(_ digest: String, what: String) throws -> String {
        let hex = digest.hasPrefix("sha256:") ? String(digest.dropFirst(7)) : ""
        guard hex.count == 64, hex.allSatisfy({ $0.isHexDigit && !$0.isUppercase }) else {
            throw SandboxError(
                .invalidArgument, "\(what) has the digest '\(digest)'; only sha256:<64 hex digits> is supported")
        }
        return hex
    }

    /// sha256 of a file, streamed.
    public static func sha256(file path: String) throws -> (digest: String, size: Int64) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SandboxError.system("open(\(path))") }
        defer { close(fd) }
        var hasher = Digest.Hasher()
        var size: Int64 = 0
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SandboxError.system("read(\(path))") }
            if n == 0 { break }
            buffer.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            size += Int64(n)
        }
        return (hasher.finalize().description, size)
    }

    package static func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8], what: String) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(bytes))
        } catch {
            throw SandboxError(.invalidArgument, "\(what) is not a valid document: \(error)")
        }
    }

    public static func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try encoder.encode(value))
    }
}
