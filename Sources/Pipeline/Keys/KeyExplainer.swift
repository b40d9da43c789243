import Foundation
import ImageStore
import Sandbox

/// Why a step would (or would not) be reused.
public struct StepExplanation: Sendable {
    public var node: String
    public var components: StepKeyComponents?
    public var key: String?
    /// The cached result this key would reuse.
    public var hit: CachedStep?
    /// The components of the latest run of this node that passed.
    public var previous: StepKeyComponents?
    public var previousRun: String?
    /// The latest attempt, when it failed after the last pass (or with none): its run and what
    /// changed since.
    public var failedRun: String?
    public var changesSinceFailure: [String] = []
    /// What changed between `previous` and `components`.
    public var differences: [String]
    /// Why the key cannot be computed yet, if it cannot.
    public var note: String?
    /// Where a hit comes from: `local`, or the shared cache's location (`plan --cache-from`).
    public var hitSource: String?
}

/// Computes a step's key without running anything: the steps before it must be cached (their
/// snapshots are part of the key), and compares it with the last run that passed.
public struct KeyExplainer {
    public let plan: PipelinePlan
    public let engine: SandboxEngine
    public let environment: [String: String]
    /// As `run --allow-host-paths`: secret files and local images may be anywhere on the host.
    public let allowHostPaths: Bool
    /// Shared caches a local miss is looked up in (`plan --cache-from`); a hit there is
    /// imported, so that the keys after it can be computed.
    public var sharedCaches: [any SharedStepCache] = []

    public init(
        plan: PipelinePlan, engine: SandboxEngine, environment: [String: String] = ProcessInfo.processInfo.environment,
        allowHostPaths: Bool = false
    ) {
        self.plan = plan
        self.engine = engine
        self.environment = environment
        self.allowHostPaths = allowHostPaths
    }

    /// Explains every node of `step`, or the one node `step` names (`test[opt=-O2]`).
    public func explain(step: String) throws -> [StepExplanation] {
        let target = plan.node(step)
        guard plan.definition.step(step) != nil || target != nil else {
            var message = "no step '\(step)' in \(plan.definition.file)"
            if let s = Suggestion.closest(to: step, in: plan.definition.steps.map(\.id.value)) {
                message += "; did you mean '\(s)'?"
            }
            if plan.definition.step(String(step.prefix { $0 != "[" })) != nil {
                message =
                    "no node '\(step)' in \(plan.definition.file); its nodes: "
                    + plan.nodes(of: String(step.prefix { $0 != "[" })).map(\.id).joined(separator: ", ")
            }
            throw PipelineError(.invalid, message)
        }
        let stepID = target?.step ?? step
        let last =
            target.flatMap { t in plan.nodes.firstIndex { $0.id == t.id } } ?? plan.nodes.lastIndex {
                $0.step == stepID
            } ?? 0
        return try walk(upTo: last) { node in target.map { $0.id == node.id } ?? (node.step == stepID) }
    }

    /// Explains every node of the plan, in order.
    public func explainAll() throws -> [StepExplanation] {
        guard !plan.nodes.isEmpty else { return [] }
        return try walk(upTo: plan.nodes.count - 1) { _ in true }
    }

    /// Computes the keys of the nodes up to `last` (each needs those before it), explaining the
    /// ones `include` picks.
    private func walk(upTo last: Int, include: (PlanNode) -> Bool) throws -> [StepExplanation] {
        let cache = try StepCache(store: engine.store)
        let hostPaths = plan.definition.hostPaths(allowingAnywhere: allowHostPaths)
        let base = try engine.baseImages.resolve(try plan.definition.imageReference(hostPaths: hostPaths))
        let secrets = SecretLoader.load(
            plan.definition.secrets, directory: plan.definition.directory, hostPaths: hostPaths,
            environment: environment
        )
        .values
        let secretKey = secrets.isEmpty ? [] : try engine.store.secretKey()
        let preparer = StepPreparer(plan: plan)
        let known = ResultTable()
        var unknown: [String: String] = [:]  // node -> why its snapshot is not known
        var explanations: [StepExplanation] = []
        var images: [String: ImageRecord] = [:]
        func resolve(_ reference: Located<String>) throws -> ImageRecord {
            if let known = images[reference.value] { return known }
            let image = try engine.baseImages.resolve(
                try plan.definition.imageReference(reference, hostPaths: hostPaths))
            images[reference.value] = image
            return image
        }
        for node in plan.nodes[...last] {
            var explanation = StepExplanation(
                node: node.id, components: nil, key: nil, hit: nil, previous: nil, previousRun: nil, differences: [],
                note: nil)
            if node.kind == .dynamic {
                let reads =
                    plan.definition.step(node.step)?.matrix?.expressions.flatMap { $0.expression.references }
                    .compactMap { $0.0.first == "steps" && $0.0.count > 1 ? $0.0[1] : nil } ?? []
                explanation.note =
                    "a dynamic matrix: its instances are known when \(Array(Set(reads)).sorted().joined(separator: ", ")) \(Set(reads).count == 1 ? "ends" : "end") in a run"
                unknown[node.id] = "\(node.id) is a dynamic matrix, expanded only in a run"
                if include(node) { explanations.append(explanation) }
                continue
            }
            if node.kind == .select {
                // The kept variant (and its outputs) is known from the latest run that passed
                // this selection.
                if let row = try cache.lastPassedRow(
                    pipeline: plan.definition.name, file: plan.definition.absolutePath, node: node.id),
                    let image = row.resultImage
                {
                    var result = NodeResult(node: node, status: .passed)
                    result.resultImage = image
                    result.outputs = row.outputs
                    known.set(result)
                } else {
                    unknown[node.id] = "the selection \(node.id) has not passed yet"
                }
                continue
            }
            // A step it waits for (`needs`) may feed it outputs: unknown there, unknown here.
            let parentID: String? = { if case .node(let p) = node.parent { return p } else { return nil } }()
            if let blocked = node.dependencies.first(where: { unknown[$0] != nil && $0 != parentID }) {
                explanation.note = "it comes after \(blocked), whose result is not known: \(unknown[blocked]!)"
            }
            let parent: ImageRecord?
            switch node.parent {
            case .image: parent = try node.image.map(resolve) ?? base
            case .node(let id):
                if let why = unknown[id] {
                    parent = nil
                    explanation.note = "its key depends on the snapshot of \(id), which is not known: \(why)"
                } else {
                    parent = try known[id]?.resultImage.flatMap { try engine.store.image($0) }
                    if parent == nil { explanation.note = "the snapshot of \(id) is gone" }
                }
            }
            let reads = node.copies.flatMap(\.sources) + node.services.compactMap(\.source)
            if let blocked = reads.first(where: { known[$0]?.resultImage == nil }), explanation.note == nil {
                explanation.note = "it copies or starts a service from \(blocked), whose snapshot is not known"
            }
            if let parent, explanation.note == nil {
                let staged = try CopyStager(store: engine.store, plan: plan).stage(node, results: known)
                defer { staged?.lease.release() }
                let serviceImages = try PipelineRunner.serviceImages(
                    node, results: known, base: base, store: engine.store, resolve: resolve)
                let prepared = try preparer.prepare(
                    node, parent: parent, results: known, secrets: secrets, secretKey: secretKey,
                    copies: staged?.keyComponent, services: PipelineRunner.serviceKey(node, images: serviceImages),
                    parentState: try engine.store.state(of: parent.uuid)?.digest)
                explanation.components = prepared.components
                explanation.key = prepared.components.key
                explanation.hit = try cache.lookup(prepared.components.key)
                if explanation.hit != nil { explanation.hitSource = "local" }
                for shared in sharedCaches where explanation.hit == nil && node.cache {
                    if let step = try shared.fetchStep(key: prepared.components.key) {
                        explanation.hit = CachedStep(
                            key: prepared.components.key, resultImage: step.image.uuid, outputs: step.outputs,
                            record: step.record)
                        explanation.hitSource = shared.location
                    }
                }
            }
            if let previous = try cache.lastPassed(
                pipeline: plan.definition.name, file: plan.definition.absolutePath, node: node.id)
            {
                explanation.previous = previous.components
                explanation.previousRun = previous.runID
                if let components = explanation.components {
                    explanation.differences = components.differences(from: previous.components)
                }
            }
            if let latest = try cache.lastRecorded(
                pipeline: plan.definition.name, file: plan.definition.absolutePath, node: node.id),
                latest.status == "failed", latest.runID != explanation.previousRun
            {
                explanation.failedRun = latest.runID
                if let components = explanation.components {
                    explanation.changesSinceFailure = components.differences(from: latest.components)
                }
            }
            if let hit = explanation.hit, node.cache {
                var result = NodeResult(node: node, status: .passed)
                result.resultImage = hit.resultImage
                result.outputs = hit.outputs
                known.set(result)
            } else {
                unknown[node.id] =
                    explanation.note ?? (node.cache ? "\(node.id) is not cached" : "\(node.id) has cache: false")
            }
            if include(node) { explanations.append(explanation) }
        }
        return explanations
    }
}
