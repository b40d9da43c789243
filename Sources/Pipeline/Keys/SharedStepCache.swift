import Foundation
import ImageStore
import Sandbox

/// A step brought from a shared cache: its snapshot, now in this store, and what the step
/// reported when it ran elsewhere.
public struct SharedStep: Sendable {
    public var image: ImageRecord
    public var outputs: [String: String]
    public var record: RunRecord?

    public init(image: ImageRecord, outputs: [String: String], record: RunRecord?) {
        self.image = image
        self.outputs = outputs
        self.record = record
    }
}

/// A step cache that several stores (machines) share through something they all reach, such
/// as a registry (`run --cache-from` / `--cache-to`). Entries are addressed by the same step
/// keys as the store's own cache, so a hit there is as exact as a local one.
public protocol SharedStepCache: Sendable {
    /// Where it is, for messages.
    var location: String { get }
    /// The step stored under `key`, its snapshot imported into the store; nil when absent.
    func fetchStep(key: String) throws -> SharedStep?
    /// Whether a step is stored under `key` (nothing is imported).
    func containsStep(key: String) throws -> Bool
    func publishStep(key: String, image: ImageRecord, outputs: [String: String], record: RunRecord?) throws
    /// The score text stored under a score key; nil when absent.
    func fetchScore(key: String) throws -> String?
    func publishScore(key: String, score: String) throws
    /// The latest snapshot of a dependency cache (`caches:`), imported; nil when absent.
    func fetchDependencyCache(name: String) throws -> ImageRecord?
    /// Replaces the stored snapshot of a dependency cache (the tag `cache-NAME` moves).
    func publishDependencyCache(name: String, image: ImageRecord) throws
}

extension SharedStepCache {
    public func fetchDependencyCache(name: String) throws -> ImageRecord? { nil }
    public func publishDependencyCache(name: String, image: ImageRecord) throws {}
}

/// What `--cache-to` did at the end of a run.
public struct CacheExport: Sendable, Codable {
    public var destination: String
    /// Step snapshots and scores written.
    public var pushed: Int
    /// Entries the shared cache already held.
    public var present: Int
    public var seconds: Double
    /// Why the export stopped, if it did (the run's own status is not changed by it).
    public var error: String?
    /// Steps that had nothing to push, with why (failed, stopped by fail-fast, skipped).
    public var notPushed: [String: String]?
    /// Dependency caches pushed (as `cache-NAME`).
    public var caches: [String]?

    enum CodingKeys: String, CodingKey {
        case destination, pushed, present, seconds, error
        case notPushed = "not_pushed"
        case caches
    }

    public init(
        destination: String, pushed: Int = 0, present: Int = 0, seconds: Double = 0, error: String? = nil,
        notPushed: [String: String]? = nil
    ) {
        self.destination = destination
        self.pushed = pushed
        self.present = present
        self.seconds = seconds
        self.error = error
        self.notPushed = notPushed
    }
}
