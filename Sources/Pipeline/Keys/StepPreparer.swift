import ImageStore
import Sandbox

/// A step rendered for one node: the exact command, env, inputs and key it runs with.
struct PreparedStep: Sendable {
    var components: StepKeyComponents
    var command: [String]
    /// Everything but secrets.
    var env: [String: String]
    var secretEnv: [String: String]
    var workdir: String
    var inputs: [ResolvedInput]
    var isolation: IsolationKind
}

/// Renders a node's templates against what the steps before it produced and computes its
/// key. Shared by the runner and `explain`, so both see the same key.
struct StepPreparer {
    let plan: PipelinePlan

    /// The node's env (the pipeline's, then the step's), each entry rendered seeing those before it.
    func environment(_ node: PlanNode, results: ResultTable) -> [String: String] {
        var env: [String: String] = [:]
        for entry in plan.definition.env + node.env {
            let scope = NodeScope(
                node: node, plan: plan, results: results, env: env, pipelineName: plan.definition.name, cancelled: false
            )
            env[entry.name] = entry.value.render(in: scope)
        }
        return env
    }

    func prepare(
        _ node: PlanNode, parent: ImageRecord, results: ResultTable, secrets: [String: String],
        secretKey: [UInt8], copies: [String]? = nil, services: [String]? = nil, parentState: String? = nil
    ) throws -> PreparedStep {
        let definition = plan.definition
        var env = environment(node, results: results)
        func scope() -> NodeScope {
            NodeScope(
                node: node, plan: plan, results: results, env: env, pipelineName: definition.name, cancelled: false)
        }
        let script = node.run?.render(in: scope()) ?? ""
        let workdir = InputResolver.normalize(
            node.settings.workdir?.render(in: scope()) ?? PipelineRunner.defaultWorkdir)
        let command = (node.settings.shell ?? PipelineRunner.defaultShell) + ["-c", script]
        var inputs: [ResolvedInput] = []
        for input in node.inputs {
            inputs += try InputResolver.resolve(input, directory: definition.directory, workdir: workdir)
        }
        env["CONTREE_OUTPUT"] = PipelineRunner.outputPath
        env["CONTREE_STEP"] = node.id
        var secretEnv: [String: String] = [:]
        for name in node.secrets { secretEnv[name] = secrets[name] }
        let isolation = node.settings.isolation ?? .container
        let network = node.settings.network ?? .loopback
        let components = StepKeyComponents(
            format: StepKeyComponents.currentFormat, parentImage: StepKeyComponents.imageDigest(parent),
            command: command,
            env: env.map { "\($0.key)=\($0.value)" }.sorted(), workdir: workdir, user: parent.config.user ?? "0",
            inputs: inputs.map { "\($0.sandboxPath) \(String($0.mode, radix: 8)) \($0.sha256)" }.sorted(),
            secrets: node.secrets.sorted().map { name in
                "\(name)=" + (secrets[name].map { StepKeyComponents.fingerprint($0, key: secretKey) } ?? "unavailable")
            },
            isolation: isolation.rawValue, network: network.rawValue, copies: copies, services: services,
            persist: node.settings.persist == .memory ? "memory" : nil,
            resumes: isolation == .vm && copies == nil ? parentState : nil)
        return PreparedStep(
            components: components, command: command, env: env, secretEnv: secretEnv, workdir: workdir, inputs: inputs,
            isolation: isolation)
    }
}
