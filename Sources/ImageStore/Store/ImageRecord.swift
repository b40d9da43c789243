#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// How a sandbox starts by default in an image.
public struct ImageConfig: Codable, Sendable, Equatable {
    /// `KEY=VALUE` pairs.
    public var env: [String]
    /// The working directory.
    public var workingDir: String
    /// `uid[:gid]` inside the sandbox; nil for root.
    public var user: String?

    public init(env: [String] = ImageConfig.defaultEnv, workingDir: String = "/", user: String? = nil) {
        self.env = env
        self.workingDir = workingDir
        self.user = user
    }

    public static let defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    public static let defaultEnv = ["PATH=\(defaultPath)", "HOME=/root"]

    enum CodingKeys: String, CodingKey {
        case env
        case workingDir = "working_dir"
        case user
    }
}

/// An immutable image: an ordered chain of layers plus config, a parent and tags.
public struct ImageRecord: Codable, Sendable, Equatable {
    public var uuid: String
    /// The image this one was made from (by a run, or by flattening), if any.
    public var parent: String?
    /// Layer digests, bottom-most first.
    public var layers: [String]
    public var config: ImageConfig
    /// Bytes of regular file content over all layers.
    public var size: Int64
    public var created: Date
    /// What made the image: `builtin:busybox`, `import:/path`, `run:<id>`.
    public var origin: String
    public var tags: [String]

    enum CodingKeys: String, CodingKey {
        case uuid, parent, layers, config, size, created, origin, tags
    }
}
