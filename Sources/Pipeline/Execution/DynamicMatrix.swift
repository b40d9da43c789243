extension MatrixDefinition {
    /// The matrix with its expressions evaluated in `scope` (what the steps before it wrote):
    /// a static matrix whose combinations are the node's instances.
    /// - Throws: `ExpressionFailure` naming the axis when an expression does not give a list
    ///   of values (or, for `include`, of mappings), or reads text that is not JSON.
    /// - Parameter inherited: the names the node already has a value for (the axes of the step
    ///   it starts from, a fork that keeps every variant): an include may not set them again.
    func resolved(in scope: ExpressionScope, inherited: Set<String> = []) throws -> MatrixDefinition {
        var result = self
        result.includeExpression = nil
        for (index, axis) in axes.enumerated() {
            guard let expression = axis.expression else { continue }
            let what = "matrix axis '\(axis.name)'"
            let items = try MatrixDefinition.list(expression, what: what, in: scope)
            var values: [String] = []
            for (position, item) in items.enumerated() {
                guard let text = MatrixDefinition.scalar(item) else {
                    throw ExpressionFailure(
                        message:
                            "\(what): item \(position + 1) is \(MatrixDefinition.describe(item)); an axis takes strings, numbers or booleans"
                    )
                }
                try MatrixDefinition.checkNameable(text, what: "\(what): item \(position + 1)")
                // The same value twice would be the same instance twice.
                if !values.contains(text) { values.append(text) }
            }
            result.axes[index] = MatrixAxis(name: axis.name, values: values)
        }
        if let expression = includeExpression {
            let items = try MatrixDefinition.list(expression, what: "matrix include", in: scope)
            for (position, item) in items.enumerated() {
                guard case .object(let fields) = item else {
                    throw ExpressionFailure(
                        message:
                            "matrix include: item \(position + 1) is \(MatrixDefinition.describe(item)); include takes mappings such as {\"os\": \"debian\"}"
                    )
                }
                var combination: [String: String] = [:]
                for (key, value) in fields {
                    guard Identifiers.isStepID(key), let text = MatrixDefinition.scalar(value) else {
                        throw ExpressionFailure(
                            message:
                                "matrix include: item \(position + 1) has '\(key)': \(MatrixDefinition.describe(value)); keys are names (letters, digits, _ and -) and values strings, numbers or booleans"
                        )
                    }
                    if inherited.contains(key) || axes.contains(where: { $0.name == key && $0.expression != nil }) {
                        throw ExpressionFailure(
                            message:
                                "matrix include: item \(position + 1) sets '\(key)', which \(inherited.contains(key) ? "this step inherits from the step it starts from" : "is a dynamic axis of this matrix"); give the key another name"
                        )
                    }
                    try MatrixDefinition.checkNameable(text, what: "matrix include: item \(position + 1), '\(key)'")
                    combination[key] = text
                }
                if !result.include.contains(combination) { result.include.append(combination) }
            }
        }
        // A dynamic axis that came back empty leaves the product empty: only includes remain.
        if result.axes.contains(where: { $0.values.isEmpty }) {
            result.axes = []
        }
        return result
    }

    private static func list(
        _ expression: Expression, what: String, in scope: ExpressionScope
    ) throws
        -> [ExpressionValue]
    {
        let value: ExpressionValue
        do {
            value = try expression.evaluate(in: scope, strict: true)
        } catch let failure as ExpressionFailure {
            throw ExpressionFailure(message: "\(what): \(failure.message)")
        }
        guard case .array(let items) = value else {
            throw ExpressionFailure(
                message:
                    "\(what) must be a list, and its expression gave \(describe(value)); write the list as JSON and read it with fromJSON(...)"
            )
        }
        return items
    }

    /// A value names its instance (`test[pkg=VALUE]`): characters that would make two instances
    /// read alike are refused.
    private static func checkNameable(_ text: String, what: String) throws {
        if let bad = text.first(where: { "[],=".contains($0) || $0.isNewline }) {
            throw ExpressionFailure(
                message:
                    "\(what) is \(text.prefix(60).debugDescription), which holds \(String(bad).debugDescription); a matrix value names its instance (step[name=value,...]), so it may not hold [ ] , = or a line break"
            )
        }
    }

    private static func scalar(_ value: ExpressionValue) -> String? {
        switch value {
        case .string, .number, .bool: return value.text
        default: return nil
        }
    }

    private static func describe(_ value: ExpressionValue) -> String {
        switch value {
        case .string(let s): return "the text \(s.prefix(60).debugDescription)"
        case .number, .bool: return value.text
        case .null: return "null (empty)"
        case .array: return "a list"
        case .object: return "an object"
        }
    }
}

extension Schedule {
    /// Replaces a dynamic node, now that what it reads has ended, by the instances its matrix
    /// gives (and what comes after it by what comes after them), re-planning the whole file
    /// with one more expansion. Nodes that ran keep their ids, so their results stand.
    /// - Returns: nil when the plan grew, or the node's failure (an expression that gives no
    ///   list, text that is not JSON, too many instances), which fails the run as a step does.
    mutating func expand(_ node: PlanNode) -> NodeResult? {
        guard let matrix = plan.definition.step(node.step)?.matrix else { return nil }
        let scope = NodeScope(
            node: node, plan: plan, results: table, env: preparer.environment(node, results: table),
            pipelineName: plan.definition.name, cancelled: false)
        func failure(_ message: String) -> NodeResult {
            var result = NodeResult(node: node, status: .failed, reason: "step \(node.step): \(message)")
            if node.continueOnError { result.toleratedFailure = true }
            return result
        }
        let resolved: MatrixDefinition
        do {
            resolved = try matrix.resolved(in: scope, inherited: Set(node.values.map(\.name)))
        } catch let error as ExpressionFailure {
            return failure(error.message)
        } catch {
            return failure("\(error)")
        }
        let count = resolved.combinations.count
        guard count <= PipelineValidator.maxCombinations else {
            return failure(
                "its matrix expanded to \(count) instances, more than \(PipelineValidator.maxCombinations); split it (or raise CONTREE_MAX_MATRIX)"
            )
        }
        var expansions = plan.expansions
        expansions[node.id] = resolved
        let next: PipelinePlan
        do {
            next = try PipelinePlan(plan.definition, expansions: expansions).restricted(to: plan.targets)
        } catch let error as PipelineError {
            return failure("its matrix expanded, and then \(error.message)")
        } catch {
            return failure("\(error)")
        }
        if let twice = Dictionary(grouping: next.nodes, by: \.id).first(where: { $0.value.count > 1 })?.key {
            return failure("its matrix expanded to two instances named \(twice); make the values tell them apart")
        }
        guard next.nodes.count <= PipelineValidator.maxNodes else {
            return failure(
                "with its matrix expanded the plan has \(next.nodes.count) nodes, more than \(PipelineValidator.maxNodes); make it smaller (or raise CONTREE_MAX_NODES)"
            )
        }
        adopt(next)
        return nil
    }
}
