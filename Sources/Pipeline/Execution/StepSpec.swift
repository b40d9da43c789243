import Foundation
import ImageStore
import Sandbox
import SystemSupport

/// A step rendered for another machine (`contree-pipeline step --spec -`): everything the node
/// needs, by value or by registry digest. It travels on the job's stdin only, because Slurm
/// shows a job's arguments and exported variables to anyone who runs `scontrol show job`, and
/// it carries the step's secrets.
public struct StepSpec: Codable, Sendable {
    /// The coordinator's contree-pipeline version: a node of another version refuses the step.
    public var version: String
    public var node: String
    public var key: String
    /// The snapshot to start from, `docker://HOST[:PORT]/REPO@sha256:…` (copies are a layer of it).
    public var parent: String
    /// The input files as an image of their own (`StepRequest.stageInputs`), and the files.
    public var inputs: String?
    public var inputFiles: [ResolvedInput]
    public var command: [String]
    public var environment: [String: String]
    public var secrets: [String: String]
    public var workdir: String
    public var timeout: Double?
    public var limits: ResourceLimits
    public var network: NetworkMode
    public var isolation: IsolationKind
    public var attempts: Int
    /// Which failures are tried again and the backoff (absent: every failure).
    public var retry: RetryPolicy?
    public var outputPath: String
    public var caches: [StepRequest.Cache]
    /// The registry repository results go to (`docker://HOST[:PORT]/REPO`), and how to reach it.
    public var registry: String
    public var allowHTTP: Bool
    public var registryUser: String?
    public var registryPassword: String?

    enum CodingKeys: String, CodingKey {
        case version, node, key, parent, command, environment, secrets, workdir, timeout, limits, network
        case isolation, attempts, caches, registry, inputs, retry
        case inputFiles = "input_files"
        case outputPath = "output_path"
        case allowHTTP = "allow_http"
        case registryUser = "registry_user"
        case registryPassword = "registry_password"
    }

    /// `request` as a spec, starting from `parent`, its inputs in `inputs` (registry references).
    public init(
        _ request: StepRequest, parent: String, inputs: String?, version: String, registry: String, allowHTTP: Bool,
        credentials: (user: String, password: String)?
    ) {
        self.inputs = inputs
        inputFiles = request.inputs
        self.version = version
        node = request.node
        key = request.key
        self.parent = parent
        command = request.command
        environment = request.environment
        secrets = request.secrets
        workdir = request.workdir
        timeout = request.timeout
        limits = request.limits
        network = request.network
        isolation = request.isolation
        attempts = request.attempts
        retry = request.retry
        outputPath = request.outputPath
        caches = request.caches
        self.registry = registry
        self.allowHTTP = allowHTTP
        registryUser = credentials?.user
        registryPassword = credentials?.password
    }

    /// The request this node runs: from `image`, the parent imported into its store, with the
    /// input files mapped from `inputRoot` (the inputs' layer unpacked in this store).
    public func request(parent image: String, inputRoot: String?) -> StepRequest {
        var request = StepRequest(
            node: node, key: key, parent: image, command: command, environment: environment, secrets: secrets,
            workdir: workdir, inputs: inputFiles, inputRoot: "/", timeout: timeout, limits: limits, network: network,
            isolation: isolation, attempts: attempts, outputPath: outputPath, caches: caches)
        request.retry = retry ?? RetryPolicy(max: max(0, attempts - 1))
        return inputRoot.map(request.mappingInputs(from:)) ?? request
    }

    /// What the step wrote to `$CONTREE_OUTPUT`, as the outputs a cache entry keeps; nil when
    /// one holds a secret (such a step is no cache entry: the coordinator fails it, and its
    /// snapshot goes where failed steps' go, `failed-<key>`, for `shell`).
    public func publishableOutputs(_ bytes: [UInt8]) -> [String: String]? {
        let log = StepLog(path: "/dev/null", secrets: [:])
        defer { log.close() }
        let outputs = PipelineRunner.parseOutputs(bytes, log: log)
        let mask = SecretMask(secrets)
        return outputs.values.contains { mask.secret(in: $0) != nil } ? nil : outputs
    }
}

/// What `step --spec -` tells the coordinator on its stdout, one JSON object per line (the
/// step's own output goes to stderr): where it started, then how it ended.
public struct StepFrame: Codable, Sendable {
    public enum Event: String, Codable, Sendable { case started, finished }

    public var event: Event
    /// The machine (`$SLURMD_NODENAME`) and the scheduler's job.
    public var host: String?
    public var job: String?
    public var record: RunRecord?
    /// What the step wrote to `$CONTREE_OUTPUT`.
    public var output: String?
    public var attempts: Int?
    /// The snapshot it left, `docker://…@sha256:…` (a passed step's `step-<key>` entry, or a
    /// failed one's snapshot for `shell`).
    public var result: String?
    /// Why there is no record (the step could not start there).
    public var message: String?
    /// The step command was stopped (SIGTERM: a scancel, Slurm's time limit, a preemption).
    public var cancelled: Bool?
    /// Every attempt's record when there was more than one.
    public var history: [RunRecord]?

    public init(
        event: Event, host: String? = nil, job: String? = nil, record: RunRecord? = nil, output: String? = nil,
        attempts: Int? = nil, result: String? = nil, message: String? = nil, cancelled: Bool? = nil,
        history: [RunRecord]? = nil
    ) {
        self.history = history
        self.message = message
        self.cancelled = cancelled
        self.event = event
        self.host = host
        self.job = job
        self.record = record
        self.output = output
        self.attempts = attempts
        self.result = result
    }

    public static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }()

    public static let decoder: JSONDecoder = {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }()

    /// The frame as one line.
    public var line: String { String(decoding: (try? StepFrame.encoder.encode(self)) ?? Data(), as: UTF8.self) + "\n" }
}
