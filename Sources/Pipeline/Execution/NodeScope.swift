/// What a node's expressions see: its matrix values, the steps it comes after, the env.
struct NodeScope: ExpressionScope {
    let node: PlanNode
    let plan: PipelinePlan
    let results: ResultTable
    let env: [String: String]
    let pipelineName: String
    let cancelled: Bool

    /// Every node this one depends on, directly or not.
    var ancestors: [PlanNode] {
        var seen = Set<String>()
        var queue = node.dependencies
        var result: [PlanNode] = []
        while let id = queue.popLast() {
            guard seen.insert(id).inserted, let n = plan.node(id) else { continue }
            result.append(n)
            queue += n.dependencies
        }
        return result
    }

    /// The node of `step` this node sees: the one among its ancestors whose matrix values
    /// agree with its own.
    func visible(_ step: String) -> NodeResult? {
        // The selection when it is one of the ancestors (keep: best, first-success); otherwise
        // the variant or matrix instance this node comes from.
        let all = ancestors.filter { $0.step == step }
        let selections = all.filter { $0.kind == .select }
        let candidates = selections.isEmpty ? all : selections
        let mine = node.matrix
        let best =
            candidates.first { candidate in
                candidate.matrix.allSatisfy { mine[$0.key] == nil || mine[$0.key] == $0.value }
            } ?? candidates.first
        return best.flatMap { results[$0.id] }
    }

    func resolve(_ path: [String]) -> ExpressionValue {
        switch path.first {
        case "matrix": return node.matrix[path[1]].map { .string($0) } ?? .null
        case "env": return env[path[1]].map { .string($0) } ?? .null
        case "pipeline": return .string(pipelineName)
        case "steps":
            guard let result = visible(path[1]) else { return .null }
            switch path[2] {
            case "outputs": return result.outputs[path[3]].map { .string($0) } ?? .null
            case "outcome": return .string(NodeScope.outcome(result))
            case "image": return result.resultImage.map { .string($0) } ?? .null
            default: return .null
            }
        default: return .null
        }
    }

    static func outcome(_ result: NodeResult) -> String {
        switch result.status {
        case .passed: return "success"
        case .failed: return "failure"
        case .cancelled: return "cancelled"
        default: return "skipped"
        }
    }

    func status(_ function: String) -> Bool {
        switch function {
        case "always": return true
        case "cancelled": return cancelled
        case "failure": return ancestors.contains { results[$0.id]?.failsPipeline == true }
        default:  // success
            return !cancelled && node.dependencies.allSatisfy { results[$0]?.succeeded == true }
        }
    }
}
