import Foundation
import ImageStore
import SystemSupport

/// One step as two runs saw it (`diff-runs`).
public struct StepComparison: Sendable, Codable {
    public var node: String
    /// Nil where the run has no such node.
    public var statusA: String?
    public var statusB: String?
    public var keyA: String?
    public var keyB: String?
    /// What differs between the two keys' components (`explain`'s words); empty when equal.
    public var keyChanges: [String]
    public var snapshotA: String?
    public var snapshotB: String?
    /// Paths that differ between the two snapshots (`M /path`, `A /path`, `D /path`), when both
    /// exist and differ; at most `RunComparison.fileLimit`.
    public var files: [String]?
    /// How many paths differ in all.
    public var changedFiles: Int?
    public var note: String?

    /// The two snapshots hold the same files (the same image, the same layers, or only file
    /// times differ).
    public var sameFiles = true

    public var sameKey: Bool { keyA == keyB }
    /// What the runs made of it went apart: other files, a status, a node only one run has.
    public var diverged: Bool { !sameFiles || statusA != statusB || statusA == nil || statusB == nil }

    enum CodingKeys: String, CodingKey {
        case node
        case statusA = "status_a"
        case statusB = "status_b"
        case keyA = "key_a"
        case keyB = "key_b"
        case keyChanges = "key_changes"
        case snapshotA = "snapshot_a"
        case snapshotB = "snapshot_b"
        case files
        case changedFiles = "changed_files"
        case sameFiles = "same_files"
        case note
    }
}

/// Where two runs of a pipeline went apart: per step, what changed in its key and which files
/// differ between its two snapshots, and the first step (in the order the runs ended them,
/// which follows the DAG) whose snapshot diverged.
public struct RunComparison: Sendable, Codable {
    public var runA: PipelineRunSummary
    public var runB: PipelineRunSummary
    public var steps: [StepComparison]
    /// The first node whose snapshot (or whose presence) differs; nil when none does.
    public var firstDivergence: String?

    static let fileLimit = 100

    enum CodingKeys: String, CodingKey {
        case runA = "run_a"
        case runB = "run_b"
        case steps
        case firstDivergence = "first_divergence"
    }

    /// Compares runs `a` and `b` (ids or unique prefixes) of this store.
    /// - Throws: `SandboxError.notFound` naming a run that does not exist.
    public init(_ a: String, _ b: String, cache: StepCache, store: Store) throws {
        func find(_ id: String) throws -> PipelineRunSummary {
            guard let run = try cache.run(id) else {
                throw SandboxError(.notFound, "no run \(id); `contree-pipeline runs` lists them")
            }
            return run
        }
        runA = try find(a)
        runB = try find(b)
        let rowsA = try cache.steps(of: runA.id)
        let rowsB = try cache.steps(of: runB.id)
        let byNodeB = Dictionary(rowsB.map { ($0.node, $0) }, uniquingKeysWith: { $1 })
        let byNodeA = Dictionary(rowsA.map { ($0.node, $0) }, uniquingKeysWith: { $1 })
        let nodes = rowsA.map(\.node) + rowsB.map(\.node).filter { byNodeA[$0] == nil }
        steps = try nodes.map { node in
            try RunComparison.compare(node, byNodeA[node], byNodeB[node], store: store)
        }
        firstDivergence = steps.first(where: \.diverged)?.node
    }

    private static func compare(
        _ node: String, _ a: PipelineStepRow?, _ b: PipelineStepRow?, store: Store
    ) throws -> StepComparison {
        var result = StepComparison(
            node: node, statusA: a?.status, statusB: b?.status, keyA: a?.key, keyB: b?.key, keyChanges: [],
            snapshotA: a?.resultImage, snapshotB: b?.resultImage)
        guard let a, let b else {
            result.note = "only in run \(a == nil ? "B" : "A")"
            return result
        }
        if let ca = a.components, let cb = b.components, a.key != b.key {
            result.keyChanges = cb.differences(from: ca)
        }
        guard let left = a.resultImage, let right = b.resultImage, left != right else {
            if (a.resultImage == nil) != (b.resultImage == nil) {
                result.sameFiles = false
                result.note = "only run \(a.resultImage == nil ? "B" : "A") left a snapshot"
            }
            return result
        }
        guard let imageA = try store.image(left), let imageB = try store.image(right) else {
            result.note = "a snapshot is gone (removed by gc or image rm): the files cannot be compared"
            return result
        }
        guard imageA.layers != imageB.layers || imageA.config != imageB.config else { return result }
        let changes = try ImageDiff.changes(from: imageA, to: imageB, store: store)
        result.changedFiles = changes.count
        result.files = changes.prefix(fileLimit).map { "\($0.kind.rawValue) \($0.path.text)" }
        result.sameFiles = changes.isEmpty
        if changes.isEmpty {
            result.note =
                imageA.config != imageB.config
                ? "the same files; the image config differs" : "the same files; only file times differ"
        }
        return result
    }
}
