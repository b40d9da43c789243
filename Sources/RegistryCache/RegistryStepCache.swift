import Foundation
import ImageStore
import Pipeline
import Registry
import Sandbox
import SystemSupport

/// A pipeline step cache kept in a registry repository, so that a fleet of machines shares
/// one cache through infrastructure it already runs. Each step is an ordinary image tagged
/// `step-<key hex>`: its layer chain (blobs the registry holds once, whoever pushed them) and
/// annotations carrying the step key, its outputs and its run record. A score is an image of
/// no layers tagged `score-<sha256 of the score key>`. Entries are written once and never
/// changed, so machines pushing at the same time cannot spoil each other's entries.
public final class RegistryStepCache: SharedStepCache {
    public let repository: RegistryRepository
    public var location: String { repository.location }

    static let keyAnnotation = "org.contree.step.key"
    static let outputsAnnotation = "org.contree.step.outputs"
    static let recordAnnotation = "org.contree.step.record"
    static let scoreAnnotation = "org.contree.score"

    public init(repository: RegistryRepository) {
        self.repository = repository
    }

    /// `docker://HOST[:PORT]/REPO` over `store`.
    public convenience init(
        _ location: String, store: Store, credentials: RegistryCredentials? = nil, allowHTTP: Bool = false,
        pushing: Bool = false
    ) throws {
        self.init(
            repository: try RegistryRepository(
                location, store: store, credentials: credentials, allowHTTP: allowHTTP, pushing: pushing))
    }

    /// `sha256:<hex>` → `step-<hex>` (a tag: at most 128 of [A-Za-z0-9_.-]).
    public static func stepTag(_ key: String) -> String { "step-" + key.replacingOccurrences(of: "sha256:", with: "") }

    static func scoreTag(_ key: String) -> String { "score-" + Digest.sha256(key).hex }

    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        e.dateEncodingStrategy = .iso8601
        return e
    }()

    public func fetchStep(key: String) throws -> SharedStep? {
        guard let imported = try repository.importImage(tag: RegistryStepCache.stepTag(key)) else { return nil }
        let annotations = imported.annotations
        // A tag that does not carry the key it is named after was not written by a cache push.
        guard annotations[RegistryStepCache.keyAnnotation] == key else {
            throw SandboxError(
                .corrupt,
                "\(location):\(RegistryStepCache.stepTag(key)) is not a step cache entry for \(key) (its key annotation is '\(annotations[RegistryStepCache.keyAnnotation] ?? "missing")')"
            )
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let outputs = try annotations[RegistryStepCache.outputsAnnotation].map {
            try decoder.decode([String: String].self, from: Data($0.utf8))
        }
        let record = annotations[RegistryStepCache.recordAnnotation].flatMap {
            try? decoder.decode(RunRecord.self, from: Data($0.utf8))
        }
        return SharedStep(image: imported.image, outputs: outputs ?? [:], record: record)
    }

    public func containsStep(key: String) throws -> Bool {
        try repository.annotations(tag: RegistryStepCache.stepTag(key))?[RegistryStepCache.keyAnnotation] == key
    }

    public func publishStep(key: String, image: ImageRecord, outputs: [String: String], record: RunRecord?) throws {
        try pushStep(key: key, image: image, outputs: outputs, record: record, tag: RegistryStepCache.stepTag(key))
    }

    /// A failed step's snapshot, for `shell` on another machine: `failed-<key hex>` (moved by
    /// each failure of that key; never served as a hit).
    public static func failedTag(_ key: String) -> String {
        "failed-" + key.replacingOccurrences(of: "sha256:", with: "")
    }

    /// Pushes a step's snapshot with its key, outputs and record under `tag` (by digest alone
    /// when nil); returns the manifest's digest.
    @discardableResult
    public func pushStep(
        key: String, image: ImageRecord, outputs: [String: String], record: RunRecord?, tag: String?
    ) throws -> String {
        var annotations = [
            RegistryStepCache.keyAnnotation: key,
            RegistryStepCache.outputsAnnotation: String(
                decoding: try RegistryStepCache.encoder.encode(outputs), as: UTF8.self),
        ]
        if let record {
            annotations[RegistryStepCache.recordAnnotation] = String(
                decoding: try RegistryStepCache.encoder.encode(record), as: UTF8.self)
        }
        return try repository.push(image, tag: tag, annotations: annotations)
    }

    /// A dependency cache's tag: `cache-NAME` (moved by every push; the newest wins).
    static func cacheTag(_ name: String) -> String { "cache-" + name }

    public func fetchDependencyCache(name: String) throws -> ImageRecord? {
        try repository.importImage(tag: RegistryStepCache.cacheTag(name))?.image
    }

    public func publishDependencyCache(name: String, image: ImageRecord) throws {
        _ = try repository.push(
            image, tag: RegistryStepCache.cacheTag(name), annotations: ["org.contree.cache.name": name])
    }

    public func fetchScore(key: String) throws -> String? {
        guard let annotations = try repository.annotations(tag: RegistryStepCache.scoreTag(key)),
            annotations[RegistryStepCache.keyAnnotation] == key
        else { return nil }
        return annotations[RegistryStepCache.scoreAnnotation]
    }

    public func publishScore(key: String, score: String) throws {
        try repository.push(
            nil, tag: RegistryStepCache.scoreTag(key),
            annotations: [RegistryStepCache.keyAnnotation: key, RegistryStepCache.scoreAnnotation: score])
    }
}
