import ImageStore
import Sandbox
import SystemSupport

/// A pipeline file as written: parsed and checked, not yet expanded into runs.
public struct PipelineDefinition: Sendable {
    /// The file as given on the command line.
    public var file: String
    /// The file's absolute path: with the name, what the run history is kept by (two files
    /// that share a name are two histories).
    public var absolutePath: String { directory + "/" + (file.split(separator: "/").last.map(String.init) ?? file) }
    /// Absolute directory of the file: input paths are relative to it.
    public var directory: String
    public var name: String
    public var image: Located<String>
    public var env: [EnvironmentEntry]
    public var defaults: StepSettings
    public var secrets: [SecretDefinition]
    /// `caches:`: dependency caches steps may mount (see `DependencyCaches`).
    public var caches: [CacheDefinition] = []
    /// `services:`: sidecars steps may start (see `ServiceDefinition`).
    public var services: [ServiceDefinition] = []
    public var steps: [StepDefinition] { didSet { stepIndex = PipelineDefinition.index(steps) } }
    /// Position of each step by id (the first of a repeated id): lookups stay constant in
    /// pipelines of thousands of steps.
    var stepIndex: [String: Int]

    init(
        file: String, directory: String, name: String, image: Located<String>, env: [EnvironmentEntry],
        defaults: StepSettings, secrets: [SecretDefinition], caches: [CacheDefinition] = [],
        services: [ServiceDefinition] = [], steps: [StepDefinition]
    ) {
        self.file = file
        self.directory = directory
        self.name = name
        self.image = image
        self.env = env
        self.defaults = defaults
        self.secrets = secrets
        self.caches = caches
        self.services = services
        self.steps = steps
        self.stepIndex = PipelineDefinition.index(steps)
    }

    private static func index(_ steps: [StepDefinition]) -> [String: Int] {
        var index: [String: Int] = [:]
        for (position, step) in steps.enumerated() where index[step.id.value] == nil { index[step.id.value] = position }
        return index
    }

    public func step(_ id: String) -> StepDefinition? { stepIndex[id].map { steps[$0] } }
}

/// `NAME: value`, the value possibly holding `${{ }}` expressions.
public struct EnvironmentEntry: Sendable {
    public var name: String
    public var value: Template
}

/// A secret: read on the host when a step that names it runs; enters the sandbox as an
/// environment variable, the step key only as a keyed fingerprint, and logs never.
public struct SecretDefinition: Sendable {
    public enum Source: Sendable, Equatable {
        case environment(String)
        case file(String)
    }

    public var name: Located<String>
    public var source: Source
}

/// A dependency cache: a directory of the store, `caches/NAME/`, mounted read-write at `path`
/// in the steps that list it. It never enters a snapshot or a key.
public struct CacheDefinition: Sendable {
    public var name: Located<String>
    /// Absolute path in the sandbox.
    public var path: String
}

/// A service (sidecar): a disposable sandbox that shares a step's network namespace, so the
/// step reaches it on 127.0.0.1. It starts before the step, must pass `ready`, and is killed with
/// its whole tree when the step ends.
public struct ServiceDefinition: Sendable {
    public var name: Located<String>
    /// Any image reference; nil with `from`, or the pipeline's image when neither is given.
    public var image: Located<String>?
    /// A step whose snapshot the service starts from.
    public var from: Located<String>?
    /// The command (run as `sh -c`).
    public var run: String
    public var env: [(name: String, value: String)]
    /// Run in the service's sandbox until it exits 0.
    public var ready: String?
    /// Seconds `ready` may take in all (default 30).
    public var readyTimeout: Double
    public var location: SourceLocation
}

/// A step's use of a cache.
public struct CacheUse: Sendable, Equatable {
    public var name: Located<String>
    public var sharing: DependencyCaches.Sharing

    public static func == (a: CacheUse, b: CacheUse) -> Bool { a.name.value == b.name.value && a.sharing == b.sharing }
}

/// Resource limits of a step.
public struct LimitsDefinition: Sendable, Equatable {
    public var memoryBytes: Int64?
    public var cpus: Double?
    public var pids: Int?

    public init(memoryBytes: Int64? = nil, cpus: Double? = nil, pids: Int? = nil) {
        self.memoryBytes = memoryBytes
        self.cpus = cpus
        self.pids = pids
    }

    /// These limits where set, `fallback`'s otherwise.
    func over(_ fallback: LimitsDefinition) -> LimitsDefinition {
        LimitsDefinition(
            memoryBytes: memoryBytes ?? fallback.memoryBytes, cpus: cpus ?? fallback.cpus, pids: pids ?? fallback.pids)
    }
}

/// When a failed step runs again: `retries: 2`, or `retries: {max: 3, when: [exit:1, exit:137,
/// timeout, oom], backoff: 2s}`. Each attempt starts from the same parent snapshot.
public struct RetryPolicy: Sendable, Equatable, Codable {
    /// A failure worth another attempt.
    public enum Condition: Sendable, Equatable, Codable, CustomStringConvertible {
        case exit(Int32)
        case timeout
        case oom

        public var description: String {
            switch self {
            case .exit(let code): "exit:\(code)"
            case .timeout: "timeout"
            case .oom: "oom"
            }
        }

        /// `exit:N`, `timeout`, `oom`.
        public init?(_ text: String) {
            switch text {
            case "timeout": self = .timeout
            case "oom": self = .oom
            default:
                guard text.hasPrefix("exit:"), let code = Int32(text.dropFirst(5)), (0...255).contains(code) else {
                    return nil
                }
                self = .exit(code)
            }
        }
    }

    /// Attempts after the first.
    public var max: Int
    /// The failures that are tried again; nil: every failure (a killed or cancelled run never).
    public var when: [Condition]?
    /// Seconds before the second attempt, doubling for each after it; 0: none.
    public var backoff: Double

    public init(max: Int, when: [Condition]? = nil, backoff: Double = 0) {
        self.max = max
        self.when = when
        self.backoff = backoff
    }

    /// Whether a failed attempt's record is one to try again.
    public func retries(_ record: RunRecord) -> Bool {
        guard let when else { return true }
        return when.contains { condition in
            switch condition {
            case .exit(let code): !record.timedOut && !record.oomKilled && record.exitCode == code
            case .timeout: record.timedOut
            case .oom: record.oomKilled
            }
        }
    }

    /// The wait before attempt `attempt` (2 or more).
    public func delay(before attempt: Int) -> Double {
        backoff <= 0 || attempt < 2 ? 0 : backoff * Double(1 << Swift.min(attempt - 2, 10))
    }
}

/// What a step sets and `defaults` presets.
public struct StepSettings: Sendable {
    /// The interpreter, split in words; the script goes after `-c`. Default `sh -e`.
    public var shell: [String]?
    public var workdir: Template?
    /// Seconds.
    public var timeout: Double?
    public var retries: RetryPolicy?
    public var limits = LimitsDefinition()
    public var network: NetworkMode?
    /// Where `network` was written (for errors about it).
    public var networkLocation: SourceLocation?
    public var isolation: IsolationKind?
    /// `persist: memory`: the processes the step leaves running are kept in its snapshot, and
    /// VM steps from it resume them. A step's own key (never in `defaults`).
    public var persist: PersistMode?
    public var persistLocation: SourceLocation?

    public init() {}

    public enum PersistMode: String, Sendable, CaseIterable {
        /// The default: the step's files; what it left running ends with it.
        case files
        /// Its files, memory and running processes (isolation vm).
        case memory
    }

    /// These settings where set, `fallback`'s otherwise.
    func over(_ fallback: StepSettings) -> StepSettings {
        var merged = fallback
        if let shell { merged.shell = shell }
        if let workdir { merged.workdir = workdir }
        if let timeout { merged.timeout = timeout }
        if let retries { merged.retries = retries }
        merged.limits = limits.over(fallback.limits)
        if let network {
            merged.network = network
            merged.networkLocation = networkLocation
        }
        if let isolation { merged.isolation = isolation }
        if let persist {
            merged.persist = persist
            merged.persistLocation = persistLocation
        }
        return merged
    }
}

/// Host files copied into the sandbox before a step runs, hashed by content.
public struct InputDefinition: Sendable {
    /// A path or glob (`*`, `?`, `**`) relative to the pipeline's directory. It may name a
    /// matrix value (`packages/${{ matrix.pkg }}/**`): each instance reads its own files.
    public var pattern: Located<String>
    /// Absolute directory in the sandbox; nil keeps each file's relative path under the
    /// step's working directory.
    public var destination: String?

    /// `${{ matrix.NAME }}` in a pattern, with NAME.
    static var matrixValue: Regex<(Substring, Substring)> { #/\$\{\{\s*matrix\.([A-Za-z][A-Za-z0-9_-]*)\s*\}\}/# }

    /// The matrix values the pattern names.
    var matrixNames: [String] { pattern.value.matches(of: InputDefinition.matrixValue).map { String($0.1) } }

    /// The pattern with one instance's matrix values in place.
    func rendered(_ values: [String: String]) -> InputDefinition {
        guard pattern.value.contains("${{") else { return self }
        var result = self
        result.pattern.value = pattern.value.replacing(InputDefinition.matrixValue) { match in
            values[String(match.1)] ?? ""
        }
        return result
    }
}

/// When an artifact is collected.
public enum ArtifactCondition: String, Sendable, Codable, CaseIterable {
    case success, failure, always
}

/// A path or glob in a step's snapshot, exported after the step ends.
public struct ArtifactDefinition: Sendable {
    public var pattern: Located<String>
    public var when: ArtifactCondition
}

/// One axis of a matrix: its values, or (a dynamic axis) the expression that gives them once
/// the steps it reads have ended (`${{ fromJSON(steps.discover.outputs.pkgs) }}`).
public struct MatrixAxis: Sendable {
    public var name: String
    public var values: [String]
    public var expression: Expression? = nil
}

/// `matrix:`: axes of values, with combinations added (`include`) or removed (`exclude`).
public struct MatrixDefinition: Sendable {
    public var axes: [MatrixAxis]
    public var include: [[String: String]]
    public var exclude: [[String: String]]
    public var location: SourceLocation
    /// `include: ${{ ... }}`: a list of combinations (JSON objects) known once the steps it reads end.
    public var includeExpression: Expression? = nil

    /// Whether some values are known only while the pipeline runs.
    public var isDynamic: Bool { includeExpression != nil || axes.contains { $0.expression != nil } }

    /// The expressions of a dynamic matrix, with what each gives.
    public var expressions: [(what: String, expression: Expression)] {
        axes.compactMap { axis in axis.expression.map { ("matrix axis '\(axis.name)'", $0) } }
            + (includeExpression.map { [("matrix include", $0)] } ?? [])
    }

    /// The names `matrix.NAME` may read: the axes, then keys only an `include` adds (empty in
    /// the combinations that lack them).
    public var names: [String] {
        let axisNames = axes.map(\.name)
        return axisNames + Set(include.flatMap(\.keys)).subtracting(axisNames).sorted()
    }

    /// Every combination, in axis order: the product, minus the excluded, plus the included.
    public var combinations: [[String: String]] {
        var result: [[String: String]] = [[:]]
        for axis in axes {
            result = result.flatMap { combo in
                axis.values.map { value in
                    var next = combo
                    next[axis.name] = value
                    return next
                }
            }
        }
        if axes.isEmpty { result = [] }
        result.removeAll { combo in exclude.contains { ex in ex.allSatisfy { combo[$0.key] == $0.value } } }
        let axisNames = Set(axes.map(\.name))
        for extra in include {
            // An include that matches a combination on every axis it names extends it;
            // otherwise it is a combination of its own.
            let onAxes = extra.filter { axisNames.contains($0.key) }
            var extended = false
            if !onAxes.isEmpty && onAxes.count == axisNames.count {
                for i in result.indices where onAxes.allSatisfy({ result[i][$0.key] == $0.value }) {
                    result[i].merge(extra) { $1 }
                    extended = true
                }
            }
            if !extended { result.append(extra) }
        }
        return result
    }
}

/// One variant of a `fork:` step: what it changes from the step.
public struct ForkVariant: Sendable {
    public var name: Located<String>
    public var run: Template?
    public var env: [EnvironmentEntry]
    public var settings: StepSettings
}

/// How a fork's variants are compared and which go on.
public struct SelectDefinition: Sendable {
    public enum Keep: String, Sendable, Codable {
        /// The variant with the best score.
        case best
        /// Every variant that succeeded.
        case all
        /// The first variant, in file order, that succeeded.
        case firstSuccess = "first-success"
    }

    /// Run in each variant's snapshot; its stdout is the score. Nil for `keep: all` or
    /// `first-success` without scoring.
    public var score: Template?
    public var keep: Keep
    /// Whether a higher score is better (default) or a lower one.
    public var higherIsBetter: Bool
    public var location: SourceLocation
}

/// One entry of `steps:`.
public struct StepDefinition: Sendable {
    public var id: Located<String>
    public var location: SourceLocation
    public var run: Template?
    public var env: [EnvironmentEntry]
    public var settings: StepSettings
    /// The step whose snapshot this one starts from; nil means the previous step in the file
    /// (or the pipeline's image for the first step).
    public var from: Located<String>?
    public var needs: [Located<String>]
    public var inputs: [InputDefinition]
    public var artifacts: [ArtifactDefinition]
    public var matrix: MatrixDefinition?
    public var fork: [ForkVariant]
    public var select: SelectDefinition?
    /// `if:`, parsed.
    public var condition: Expression?
    public var conditionText: String?
    public var continueOnError: Bool
    /// `cache:` as written; nil when it is not (see `PlanNode.cache` for the default).
    public var cache: Bool?
    public var secrets: [Located<String>]
    /// `caches:`: dependency caches mounted while the step runs.
    public var caches: [CacheUse] = []
    /// `image:`: a new root (any image reference) instead of the previous step's snapshot.
    public var image: Located<String>?
    /// `copy:`: paths copied out of other steps' snapshots before `run`.
    public var copies: [CopyDefinition] = []
    /// `services:`: names of services started for the step.
    public var services: [Located<String>] = []
    /// `reports: {junit: ...}`: paths or globs of JUnit XML files in the step's snapshot
    /// (relative to its working directory, or absolute), read when it ends, passed or failed.
    public var junitReports: [Located<String>] = []
    /// `flaky-check: N`: when the step fails, run it N more times from the same parent
    /// snapshot, at once, and call it flaky (some passed) or deterministic (none did).
    public var flakyCheck: Int?
    /// `allow-flaky: true`: a step found flaky passes, going on from a run that passed.
    public var allowFlaky = false
}

/// `copy: [{from: STEP[k=v,...], path: /ABS, to: /ABS[/]}]`: `path` from the snapshot of
/// `from` (every instance of a matrix step unless one is chosen, or the one of this node's
/// branch) lands at `to` (inside it when `to` ends with `/`) before the step runs.
public struct CopyDefinition: Sendable {
    /// The step id, as written.
    public var from: Located<String>
    /// The step id without an instance.
    public var step: String
    /// A chosen instance's values (`build[os=debian]`), empty when none is chosen.
    public var instance: [String: String]
    public var path: String
    /// Rendered in the scope of each source node (`${{ matrix.os }}` names its instance).
    public var to: Template
    public var location: SourceLocation
}

extension PipelineDefinition {
    /// Where the host files this pipeline names may be read: beneath its directory, or
    /// anywhere (`--allow-host-paths`).
    func hostPaths(allowingAnywhere: Bool) -> HostPaths {
        allowingAnywhere ? .anywhere : .beneath(directory)
    }

    /// The pipeline's `image:`, with a local path (`oci:DIR`, `oci-archive:FILE`,
    /// `docker-archive:FILE`) taken from the pipeline's directory and checked under `hostPaths`.
    /// - Throws: `PipelineValidationError` naming the `image:` line when the path may not be read.
    func imageReference(hostPaths: HostPaths) throws -> String {
        try imageReference(image, hostPaths: hostPaths)
    }

    /// The same for any image reference of the file (a step's `image:`).
    func imageReference(_ image: Located<String>, hostPaths: HostPaths) throws -> String {
        guard let (path, rebuild) = OCIImporter.localPath(image.value) else { return image.value }
        let absolute = path.hasPrefix("/") ? path : directory + "/" + path
        do {
            return rebuild(try hostPaths.check(absolute, what: "image \(image.value)"))
        } catch let error as SandboxError {
            throw PipelineValidationError([PipelineError(.invalid, error.description, at: image.location)])
        }
    }
}
