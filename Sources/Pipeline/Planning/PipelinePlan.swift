/// One unit of work of a planned pipeline: a step (or one matrix combination or fork variant
/// of it) that runs a command, or the selection among a fork's variants.
public struct PlanNode: Sendable {
    public enum Kind: Sendable, Equatable {
        case run
        case select
        /// A step whose matrix is known only when the steps it reads end (`fromJSON(...)`):
        /// it stands for the step's instances until then, and the scheduler replaces it (and
        /// what comes from it) by them.
        case dynamic
    }

    /// Where a node's sandbox starts.
    public enum Parent: Sendable, Equatable {
        /// The pipeline's base image.
        case image
        /// The snapshot another node produced (for a select node: the kept variant's).
        case node(String)
    }

    /// Unique in the plan: `build`, `build[cc=gcc]`, `solve.fast`, `next[solve=fast]`.
    public var id: String
    /// The step of the file this node comes from.
    public var step: String
    public var kind: Kind
    /// Matrix values (inherited first), plus `fork step = variant` for branches of a
    /// `keep: all` fork.
    public var values: [(name: String, value: String)]
    /// The fork variant a run node executes.
    public var variant: String?
    public var parent: Parent
    /// Every node that must end before this one starts (its parent included).
    public var dependencies: [String]
    /// For select nodes: the variant nodes, in file order.
    public var variantNodes: [String]
    public var run: Template?
    public var env: [EnvironmentEntry]
    public var settings: StepSettings
    public var inputs: [InputDefinition]
    public var artifacts: [ArtifactDefinition]
    public var condition: Expression?
    public var continueOnError: Bool
    /// Whether a cached result may stand in for running it: `cache:` as written, else true,
    /// except for steps that react to failures (notifiers, cleanup, reports), which exist for
    /// their side effects and run every time.
    public var cache: Bool
    public var secrets: [String]
    public var select: SelectDefinition?
    /// The step's own root image (`image:`), when its parent is `.image`; nil: the pipeline's.
    public var image: Located<String>? = nil
    /// What `copy:` brings in, with the nodes each copy reads (dependencies of this node).
    public var copies: [PlanCopy] = []
    /// The services started for it, each with the node its `from` names (a dependency).
    public var services: [PlanService] = []

    /// Whether its condition asks about other steps' status (`always()`, `failure()`,
    /// `cancelled()`): such steps still run after a failure and are not cancelled by it.
    public var reactsToFailure: Bool { PlanNode.reactsToFailure(condition) }

    static func reactsToFailure(_ condition: Expression?) -> Bool {
        condition?.calls.contains { ["always", "failure", "cancelled"].contains($0.0) } ?? false
    }

    public var matrix: [String: String] {
        Dictionary(values.map { ($0.name, $0.value) }, uniquingKeysWith: { $1 })
    }

    /// A file-name-safe form of the id (logs, artifacts).
    public var fileName: String {
        String(id.map { $0.isLetter || $0.isNumber || "-_.=,".contains($0) ? $0 : "_" })
    }
}

/// A service of a node: its definition and, for `from: STEP`, the node of that step it starts from.
public struct PlanService: Sendable {
    public var definition: ServiceDefinition
    public var source: String?
}

/// One `copy:` entry of a node and the nodes it copies from.
public struct PlanCopy: Sendable {
    public var definition: CopyDefinition
    public var sources: [String]
}

/// A pipeline expanded into nodes (matrix combinations, fork variants, selections) in an order
/// where every node comes after its dependencies.
public struct PipelinePlan: Sendable {
    public let definition: PipelineDefinition
    public private(set) var nodes: [PlanNode] = []
    private var index: [String: Int] = [:]
    /// The dynamic matrices known so far: a dynamic node's id -> its matrix with every value.
    public private(set) var expansions: [String: MatrixDefinition] = [:]
    /// What `restricted(to:)` kept, applied again after each expansion.
    public private(set) var targets: [String] = []

    /// Whether some nodes stand for matrices not expanded yet.
    public var isDynamic: Bool { nodes.contains { $0.kind == .dynamic } }

    /// The id of the node that stands for a dynamic matrix's instances in one branch:
    /// `test[*]`, `test[os=linux,*]`.
    static func dynamicID(_ step: String, _ values: [(name: String, value: String)]) -> String {
        step + "[" + (values.map { "\($0.name)=\($0.value)" } + ["*"]).joined(separator: ",") + "]"
    }

    public func node(_ id: String) -> PlanNode? { index[id].map { nodes[$0] } }

    /// The nodes a step expanded into.
    public func nodes(of step: String) -> [PlanNode] { nodes.filter { $0.step == step } }

    /// Nodes that depend, directly or not, on any of `roots` (roots included).
    public func dependents(of roots: Set<String>) -> Set<String> {
        var result = roots
        for node in nodes where !result.contains(node.id) && node.dependencies.contains(where: result.contains) {
            result.insert(node.id)
        }
        return result
    }

    /// What dependents of a step start from: its run nodes, its select node, or (for a fork
    /// that keeps all variants) each variant.
    struct Export {
        var node: String
        var values: [(name: String, value: String)]
    }

    /// Expands a validated definition; a dynamic matrix expands as `expansions` says, or
    /// stays one `.dynamic` node.
    public init(_ definition: PipelineDefinition, expansions: [String: MatrixDefinition] = [:]) {
        self.definition = definition
        self.expansions = expansions
        let parents = PipelineValidator.parents(of: definition.steps)
        let order = PipelinePlan.order(definition)
        var exports: [String: [Export]] = [:]
        var dynamicNodes = Set<String>()
        for stepID in order {
            guard let step = definition.step(stepID) else { continue }
            let settings = step.settings.over(definition.defaults)
            let starts: [Export]
            if let parent = parents[stepID] ?? nil {
                starts = exports[parent] ?? []
            } else {
                starts = [Export(node: "", values: [])]
            }
            let needed = step.needs.flatMap { exports[$0.value]?.map(\.node) ?? [] }
            var mine: [Export] = []
            for start in starts {
                var matrix = step.matrix
                var combos = matrix?.combinations ?? [[:]]
                var dynamicID: String?
                if let dynamic = matrix, dynamic.isDynamic {
                    let id = PipelinePlan.dynamicID(stepID, start.values)
                    matrix = expansions[id]
                    combos = expansions[id]?.combinations ?? [[:]]
                    if matrix == nil { dynamicID = id }
                }
                for combo in combos {
                    var values = start.values
                    for axis in matrix?.axes.map(\.name) ?? [] where combo[axis] != nil {
                        values.append((axis, combo[axis]!))
                    }
                    // Keys only an include added, in a stable order.
                    for key in combo.keys.sorted() where !values.contains(where: { $0.name == key }) {
                        values.append((key, combo[key]!))
                    }
                    let suffix =
                        values.isEmpty ? "" : "[" + values.map { "\($0.name)=\($0.value)" }.joined(separator: ",") + "]"
                    let parent: PlanNode.Parent = start.node.isEmpty ? .image : .node(start.node)
                    let parentDeps = start.node.isEmpty ? [] : [start.node]
                    let copies = step.copies.map { copy in
                        PlanCopy(
                            definition: copy,
                            sources: (exports[copy.step] ?? []).filter { source in
                                // A matrix not expanded yet: wait for it (the plan is made
                                // again when it expands, with its instances).
                                if dynamicNodes.contains(source.node) { return true }
                                if !copy.instance.isEmpty {
                                    return copy.instance.allSatisfy { chosen in
                                        source.values.contains { $0.name == chosen.key && $0.value == chosen.value }
                                    }
                                }
                                // Within a branch of the source, its own instance; elsewhere, all.
                                return source.values.allSatisfy { value in
                                    values.allSatisfy { $0.name != value.name || $0.value == value.value }
                                }
                            }.map(\.node))
                    }
                    var base = PlanNode(
                        id: stepID + suffix, step: stepID, kind: .run, values: values, variant: nil, parent: parent,
                        dependencies: parentDeps + needed, variantNodes: [], run: step.run, env: step.env,
                        settings: settings,
                        inputs: step.inputs.map { $0.rendered(Dictionary(values, uniquingKeysWith: { $1 })) },
                        artifacts: step.artifacts, condition: step.condition,
                        continueOnError: step.continueOnError,
                        cache: step.cache ?? !PlanNode.reactsToFailure(step.condition),
                        secrets: step.secrets.map(\.value),
                        select: nil)
                    base.image = step.image
                    base.copies = copies
                    base.services = step.services.compactMap { name in
                        definition.services.first { $0.name.value == name.value }
                    }.map { service in
                        // `from`: the instance of this node's branch (or the first).
                        let candidates = service.from.map { exports[$0.value] ?? [] } ?? []
                        let mine = candidates.first { source in
                            source.values.allSatisfy { value in
                                values.allSatisfy { $0.name != value.name || $0.value == value.value }
                            }
                        }
                        return PlanService(definition: service, source: (mine ?? candidates.first)?.node)
                    }
                    base.dependencies += base.services.compactMap(\.source).filter { !base.dependencies.contains($0) }
                    base.dependencies += copies.flatMap(\.sources).filter { !base.dependencies.contains($0) }
                    if let dynamicID {
                        base.id = dynamicID
                        base.kind = .dynamic
                        dynamicNodes.insert(dynamicID)
                        add(base)
                        mine.append(Export(node: base.id, values: values))
                        continue
                    }
                    if step.fork.isEmpty {
                        add(base)
                        mine.append(Export(node: base.id, values: values))
                        continue
                    }
                    var variantIDs: [String] = []
                    for variant in step.fork {
                        var node = base
                        node.id = stepID + "." + variant.name.value + suffix
                        node.variant = variant.name.value
                        node.run = variant.run ?? step.run
                        node.env = step.env + variant.env
                        node.settings = variant.settings.over(settings)
                        add(node)
                        variantIDs.append(node.id)
                    }
                    let keepAll = step.select == nil || step.select?.keep == .all
                    if let select = step.select {
                        var node = base
                        node.kind = .select
                        node.variantNodes = variantIDs
                        node.dependencies = variantIDs
                        node.select = select
                        node.run = nil
                        node.inputs = []
                        node.condition = nil
                        add(node)
                        if !keepAll { mine.append(Export(node: node.id, values: values)) }
                    }
                    if keepAll {
                        for (variant, id) in zip(step.fork, variantIDs) {
                            mine.append(Export(node: id, values: values + [(stepID, variant.name.value)]))
                        }
                    }
                }
            }
            exports[stepID] = mine
        }
    }

    /// Only `targets` and what they depend on (through `from`, `needs`, `copy` and services'
    /// `from`). A target names a step (all its nodes) or one node (`build[os=debian]`).
    /// - Throws: `PipelineError` naming a target that is neither.
    public func restricted(to targets: [String]) throws -> PipelinePlan {
        guard !targets.isEmpty else { return self }
        var wanted: [String] = []
        // Nodes that stand for instances not known yet: dynamic nodes and what comes from them.
        let unexpanded = dependents(of: Set(nodes.filter { $0.kind == .dynamic }.map(\.id)))
        for target in targets {
            let step = String(target.prefix { $0 != "[" })
            let dynamic = nodes(of: step).filter { unexpanded.contains($0.id) }
            if let node = node(target) {
                wanted.append(node.id)
            } else if definition.step(target) != nil {
                wanted += nodes(of: target).map(\.id)
            } else if !dynamic.isEmpty {
                // An instance of a matrix not expanded yet: kept until it is, then chosen.
                wanted += dynamic.map(\.id)
            } else {
                let step = String(target.prefix { $0 != "[" })
                var message = "no step or node '\(target)' in \(definition.file)"
                if definition.step(step) != nil {
                    message += "; the nodes of \(step): " + nodes(of: step).map(\.id).joined(separator: ", ")
                } else if let s = Suggestion.closest(to: target, in: definition.steps.map(\.id.value)) {
                    message += "; did you mean '\(s)'?"
                }
                throw PipelineError(.invalid, message)
            }
        }
        var keep = Set<String>()
        while let id = wanted.popLast() {
            guard keep.insert(id).inserted, let node = node(id) else { continue }
            wanted += node.dependencies + node.variantNodes
        }
        var result = self
        result.targets = targets
        result.nodes = nodes.filter { keep.contains($0.id) }
        result.index = Dictionary(uniqueKeysWithValues: result.nodes.enumerated().map { ($1.id, $0) })
        return result
    }

    private mutating func add(_ node: PlanNode) {
        index[node.id] = nodes.count
        nodes.append(node)
    }

    /// Steps ordered so that each comes after what it depends on (file order among equals).
    static func order(_ definition: PipelineDefinition) -> [String] {
        let deps = PipelineValidator(definition: definition).dependencies()
        var done = Set<String>()
        var result: [String] = []
        while result.count < definition.steps.count {
            var progressed = false
            for step in definition.steps where !done.contains(step.id.value) {
                if (deps[step.id.value] ?? []).allSatisfy(done.contains) {
                    done.insert(step.id.value)
                    result.append(step.id.value)
                    progressed = true
                }
            }
            if !progressed { break }  // a cycle: the validator reports it
        }
        return result
    }
}
