import Foundation
import Sandbox

/// Where a node stands.
public enum NodeStatus: String, Sendable, Codable {
    case pending, running, passed, failed, skipped, cancelled

    public var isFinished: Bool { self != .pending && self != .running }
}

/// One variant as a fork's selection saw it.
public struct VariantOutcome: Sendable, Codable, Equatable {
    public var variant: String
    public var node: String
    public var status: NodeStatus
    public var score: Double?
    public var kept: Bool
    /// Why it was not kept (failed, no score, lower score).
    public var note: String?
}

/// An exported artifact.
public struct ArtifactRecord: Sendable, Codable, Equatable {
    public var node: String
    /// Path in the step's snapshot.
    public var path: String
    /// Path under the run's output directory.
    public var file: String
    public var sha256: String
    public var size: Int64
}

/// What `flaky-check` found for a step that failed: its reruns from the same parent snapshot.
public struct FlakeCheck: Sendable, Codable, Equatable {
    public enum Verdict: String, Sendable, Codable {
        /// Some reruns passed: the failure depends on something other than the inputs.
        case flaky
        /// Every rerun failed too.
        case deterministic
    }

    public struct Run: Sendable, Codable, Equatable {
        public var exitCode: Int32?
        public var signal: Int32?
        public var timedOut: Bool
        public var wallSeconds: Double
        public var snapshot: String?
        /// Relative to the run's output directory.
        public var log: String

        enum CodingKeys: String, CodingKey {
            case exitCode = "exit_code"
            case signal
            case timedOut = "timed_out"
            case wallSeconds = "wall_seconds"
            case snapshot, log
        }
    }

    public var verdict: Verdict
    public var reruns: Int
    public var passed: Int
    /// Flaky, and the step says `allow-flaky: true`: it passed.
    public var allowed: Bool
    public var runs: [Run]
}

/// What `run --verify` found when it ran a cached step again from the same parent.
public struct Verification: Sendable, Codable, Equatable {
    public enum Verdict: String, Sendable, Codable {
        /// The same layer, byte for byte.
        case identical
        /// The same files, modes and contents; only file times differ.
        case sameFiles = "same-files"
        /// Files differ (listed in `changes`).
        case differs
        /// The command failed when run again.
        case failed
    }

    public var cachedImage: String
    /// The snapshot of the run again, kept when it differs (for `image diff`).
    public var verifiedImage: String?
    public var verdict: Verdict
    /// `M /path`, `A /path`, `D /path`: at most `changeLimit`.
    public var changes: [String]?

    static let changeLimit = 50

    enum CodingKeys: String, CodingKey {
        case cachedImage = "cached_image"
        case verifiedImage = "verified_image"
        case verdict, changes
    }
}

/// One attempt of a step that ran more than once (`retries`).
public struct AttemptRecord: Sendable, Codable, Equatable {
    public var exitCode: Int32?
    public var signal: Int32?
    public var timedOut: Bool
    public var oomKilled: Bool
    public var started: Date
    public var wallSeconds: Double
    /// The snapshot the attempt left (each attempt starts from the same parent).
    public var snapshot: String?

    enum CodingKeys: String, CodingKey {
        case exitCode = "exit_code"
        case signal
        case timedOut = "timed_out"
        case oomKilled = "oom_killed"
        case started
        case wallSeconds = "wall_seconds"
        case snapshot
    }

    init(_ record: RunRecord) {
        exitCode = record.exitCode
        signal = record.signal
        timedOut = record.timedOut
        oomKilled = record.oomKilled
        started = record.startedAt
        wallSeconds = record.metrics.wallSeconds
        snapshot = record.resultImage
    }
}

/// How a node ended, with everything the reports show.
public struct NodeResult: Sendable, Codable {
    public var node: String
    public var step: String
    public var status: NodeStatus
    public var cached: Bool
    /// The shared cache a cached result came from (`--cache-from`), when not this store's.
    public var cachedFrom: String?
    /// Failed, but `continue-on-error` lets the pipeline pass and dependents run.
    public var toleratedFailure: Bool
    /// A fork variant that failed: its selection decides whether the pipeline fails, and
    /// nothing starts from its snapshot.
    public var containedFailure: Bool
    /// A failure nothing may excuse (`--fail-on-cache-miss`).
    public var strictFailure: Bool
    public var key: String?
    public var components: StepKeyComponents?
    public var parentImage: String?
    public var resultImage: String?
    public var exitCode: Int32?
    public var signal: Int32?
    public var timedOut: Bool
    public var attempts: Int
    public var started: Date?
    public var ended: Date?
    public var metrics: RunMetrics?
    public var outputs: [String: String]
    /// Relative to the run's output directory.
    public var log: String?
    public var artifacts: [ArtifactRecord]
    /// `artifacts:` patterns that matched nothing in the snapshot (nil: none).
    public var missingArtifacts: [String]?
    /// Why the node was skipped, failed before running, or was cancelled.
    public var reason: String?
    public var variants: [VariantOutcome]?
    public var matrix: [String: String]
    /// What ran the step when it was not this machine's engine (`slurm`), the machine it ran
    /// on, and the scheduler's job; nil for cache hits and local steps.
    public var executor: String?
    public var executorNode: String?
    public var slurmJobID: String?
    /// It could not run because the machinery around it failed (a node, the registry).
    public var infrastructureFailure: Bool?
    /// Every attempt, when there was more than one (`retries`).
    public var attemptRecords: [AttemptRecord]?
    /// What the step's JUnit files said (`reports: {junit: ...}`).
    public var tests: TestResults?
    /// What `flaky-check` found, when the step failed and has one.
    public var flakeCheck: FlakeCheck?
    /// What `run --verify` found, for a cached step it ran again.
    public var verification: Verification?

    /// Skipped by its own condition while what it depends on succeeded: like a skipped step of
    /// a GitHub Actions job, it leaves the workspace as it was, so it carries its parent's
    /// snapshot (and no outputs) to the steps after it.
    public var passedThrough: Bool { status == .skipped && resultImage != nil }

    /// Passed (or failed with `continue-on-error`, or passed its parent's snapshot through):
    /// dependents go on.
    public var succeeded: Bool { status == .passed || toleratedFailure || passedThrough }

    /// A failure that fails the pipeline.
    public var failsPipeline: Bool {
        status == .failed && (strictFailure || (!toleratedFailure && !containedFailure))
    }

    public var duration: Double? {
        guard let started, let ended else { return nil }
        return ended.timeIntervalSince(started)
    }

    enum CodingKeys: String, CodingKey {
        case node, step, status, cached
        case cachedFrom = "cached_from"
        case toleratedFailure = "continued_on_error"
        case containedFailure = "variant_failed"
        case strictFailure = "strict_failure"
        case key, components
        case parentImage = "parent_image"
        case resultImage = "result_image"
        case exitCode = "exit_code"
        case signal
        case timedOut = "timed_out"
        case attempts, started, ended, metrics, outputs, log, artifacts, reason, variants, matrix
        case missingArtifacts = "missing_artifacts"
        case executor
        case executorNode = "executor_node"
        case slurmJobID = "slurm_job_id"
        case infrastructureFailure = "infrastructure_failure"
        case attemptRecords = "attempt_records"
        case tests
        case flakeCheck = "flaky_check"
        case verification = "verify"
    }

    init(node: PlanNode, status: NodeStatus, reason: String? = nil) {
        self.node = node.id
        self.step = node.step
        self.status = status
        self.cached = false
        self.toleratedFailure = false
        self.containedFailure = false
        self.strictFailure = false
        self.timedOut = false
        self.attempts = 0
        self.outputs = [:]
        self.artifacts = []
        self.reason = reason
        self.matrix = node.matrix
    }
}
