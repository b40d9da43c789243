import Glibc

/// Checks what only the whole file can tell: ids, references, cycles, expressions.
struct PipelineValidator {
    let definition: PipelineDefinition
    var errors: [PipelineError] = []

    init(definition: PipelineDefinition) {
        self.definition = definition
    }

    /// The step each step starts from: its `from`, else the previous step, else nil (the image).
    static func parents(of steps: [StepDefinition]) -> [String: String?] {
        var result: [String: String?] = [:]
        for (i, step) in steps.enumerated() {
            // A step with `image:` starts a new root there.
            result[step.id.value] = step.image != nil ? nil : step.from?.value ?? (i > 0 ? steps[i - 1].id.value : nil)
        }
        return result
    }

    mutating func validate() -> [PipelineError] {
        let steps = definition.steps
        var seen: [String: SourceLocation] = [:]
        for step in steps {
            if let first = seen[step.id.value] {
                errors.append(
                    PipelineError(
                        .invalid,
                        "duplicate step id '\(step.id.value)' (first defined at \(first.file == step.id.location.file ? "" : first.file + ":")\(first.line):\(first.column)); ids must be unique",
                        at: step.id.location))
            } else {
                seen[step.id.value] = step.id.location
            }
        }
        let ids = Set(seen.keys)
        let secretNames = Set(definition.secrets.map(\.name.value))
        let cacheNames = Set(definition.caches.map(\.name.value))
        let serviceNames = Set(definition.services.map(\.name.value))
        for service in definition.services {
            if let from = service.from, !ids.contains(from.value) {
                var message = "service \(service.name.value) starts from '\(from.value)', which is not a step"
                if let s = Suggestion.closest(to: from.value, in: Array(ids)) { message += "; did you mean '\(s)'?" }
                errors.append(PipelineError(.invalid, message, at: from.location, problem: .unknownStep(from.value)))
            }
        }
        for step in steps {
            for name in step.services where !serviceNames.contains(name.value) {
                var message =
                    "step \(step.id.value) uses service '\(name.value)', which is not defined under `services:`"
                if let s = Suggestion.closest(to: name.value, in: Array(serviceNames)) {
                    message += "; did you mean '\(s)'?"
                }
                errors.append(PipelineError(.invalid, message, at: name.location))
            }
            for name in step.services {
                if let from = definition.services.first(where: { $0.name.value == name.value })?.from,
                    from.value == step.id.value
                {
                    errors.append(
                        PipelineError(
                            .invalid,
                            "step \(step.id.value) uses service \(name.value), which starts from this very step",
                            at: name.location))
                }
            }
            var usedCaches = Set<String>()
            for cache in step.caches {
                if !cacheNames.contains(cache.name.value) {
                    var message =
                        "step \(step.id.value) uses cache '\(cache.name.value)', which is not defined under `caches:`"
                    if let s = Suggestion.closest(to: cache.name.value, in: Array(cacheNames)) {
                        message += "; did you mean '\(s)'?"
                    }
                    errors.append(PipelineError(.invalid, message, at: cache.name.location))
                } else if !usedCaches.insert(cache.name.value).inserted {
                    errors.append(
                        PipelineError(
                            .invalid, "step \(step.id.value) lists cache '\(cache.name.value)' twice",
                            at: cache.name.location))
                }
            }
            for reference in [step.from].compactMap({ $0 }) + step.needs {
                if reference.value == step.id.value {
                    errors.append(
                        PipelineError(.invalid, "step \(step.id.value) cannot depend on itself", at: reference.location)
                    )
                } else if !ids.contains(reference.value) {
                    var message = "step \(step.id.value) refers to '\(reference.value)', which is not a step"
                    if let s = Suggestion.closest(to: reference.value, in: Array(ids)) {
                        message += "; did you mean '\(s)'?"
                    }
                    errors.append(
                        PipelineError(.invalid, message, at: reference.location, problem: .unknownStep(reference.value))
                    )
                }
            }
            if let image = step.image, step.from != nil {
                errors.append(
                    PipelineError(
                        .invalid,
                        "step \(step.id.value) has both `image:` and `from:`; a step starts from one of them: drop one",
                        at: image.location))
            }
            for copy in step.copies {
                if copy.step == step.id.value {
                    errors.append(
                        PipelineError(.invalid, "step \(step.id.value) cannot copy from itself", at: copy.from.location)
                    )
                } else if !ids.contains(copy.step) {
                    var message = "step \(step.id.value) copies from '\(copy.step)', which is not a step"
                    if let s = Suggestion.closest(to: copy.step, in: Array(ids)) { message += "; did you mean '\(s)'?" }
                    errors.append(
                        PipelineError(.invalid, message, at: copy.from.location, problem: .unknownStep(copy.step)))
                } else if let source = definition.step(copy.step), !copy.instance.isEmpty {
                    let axes = Set(source.matrix?.names ?? [])
                    for name in copy.instance.keys.sorted() where !axes.contains(name) {
                        errors.append(
                            PipelineError(
                                .invalid,
                                "step \(step.id.value) chooses \(name)=… of \(copy.step), which has no matrix axis '\(name)'",
                                at: copy.from.location))
                    }
                }
            }
            for secret in step.secrets where !secretNames.contains(secret.value) {
                var message =
                    "step \(step.id.value) uses secret '\(secret.value)', which is not defined under `secrets:`"
                if let s = Suggestion.closest(to: secret.value, in: Array(secretNames)) {
                    message += "; did you mean '\(s)'?"
                }
                errors.append(PipelineError(.invalid, message, at: secret.location))
            }
            if step.select != nil && step.fork.isEmpty {
                errors.append(
                    PipelineError(
                        .invalid, "step \(step.id.value) has `select:` but no `fork:` variants to select from",
                        at: step.select!.location))
            }
            if !step.fork.isEmpty && step.matrix != nil {
                errors.append(
                    PipelineError(
                        .invalid, "step \(step.id.value) has both `matrix:` and `fork:`; split them into two steps",
                        at: step.location))
            }
        }
        guard errors.isEmpty else { return errors }
        if let cycle = findCycle() {
            let location = definition.step(cycle[0])?.location
            errors.append(
                PipelineError(
                    .invalid,
                    "steps form a cycle: \(cycle.joined(separator: " -> ")); break it by changing `from` or `needs`",
                    at: location, problem: .cycle))
            return errors
        }
        checkSize()
        guard errors.isEmpty else { return errors }
        let ancestors = Ancestry(dependencies())
        let axes = matrixAxes()
        for step in steps {
            let id = step.id.value
            if let clash = axes[id]?.clash {
                errors.append(
                    PipelineError(
                        .invalid,
                        "step \(id) redefines matrix axis '\(clash)' that it inherits from the step it starts from",
                        at: step.matrix?.location ?? step.location))
            }
            var envNames = Set(definition.env.map(\.name))
            envNames.formUnion(step.env.map(\.name))
            var expressions: [(Expression, String)] = []
            var templates: [Template] = [step.run, step.settings.workdir, step.select?.score].compactMap { $0 }
            templates += step.env.map(\.value) + definition.env.map(\.value)
            for variant in step.fork {
                templates += [variant.run, variant.settings.workdir].compactMap { $0 }
                templates += variant.env.map(\.value)
                envNames.formUnion(variant.env.map(\.name))
            }
            for template in templates { expressions += template.expressions.map { ($0, "expression") } }
            if let condition = step.condition { expressions.append((condition, "if")) }
            for (expression, _) in expressions {
                for (path, location) in expression.references {
                    check(
                        path, at: location, step: id, isAncestor: { ancestors.reaches(id, $0) },
                        axes: axes[id]?.names ?? [],
                        env: envNames, allAxes: axes, openAxes: step.matrix?.includeExpression != nil)
                }
            }
            for input in step.inputs where input.pattern.value.contains("${{") {
                let names = input.matrixNames
                let rest = input.pattern.value.replacing(InputDefinition.matrixValue, with: "")
                if rest.contains("${{") || names.isEmpty {
                    errors.append(
                        PipelineError(
                            .invalid,
                            "an input pattern may name matrix values (${{ matrix.NAME }}) and nothing else: \(input.pattern.value)",
                            at: input.pattern.location))
                }
                for name in names where !(axes[id]?.names.contains(name) ?? false) {
                    errors.append(
                        PipelineError(
                            .invalid,
                            "input \(input.pattern.value) names matrix.\(name), which is not an axis of step \(id)'s matrix",
                            at: input.pattern.location))
                }
            }
            // A dynamic matrix reads what comes before the step, never its own axes.
            let inherited = (axes[id]?.names ?? []).filter { name in !(step.matrix?.names.contains(name) ?? false) }
            for (_, expression) in step.matrix?.expressions ?? [] {
                for (path, location) in expression.references {
                    check(
                        path, at: location, step: id, isAncestor: { ancestors.reaches(id, $0) }, axes: inherited,
                        env: envNames, allAxes: axes)
                }
            }
            for template in definition.env.map(\.value) {
                for expression in template.expressions where !expression.references.allSatisfy({ $0.0.first == "env" })
                {
                    errors.append(
                        PipelineError(
                            .invalid,
                            "the pipeline's env can only refer to env.*; move step-specific values to the step's env",
                            at: template.location))
                }
            }
        }
        return errors
    }

    /// The most combinations one step's matrix may have, and the most nodes a plan may have
    /// (`CONTREE_MAX_MATRIX`, `CONTREE_MAX_NODES`): a file must not cost gigabytes to plan.
    static var maxCombinations: Int { limit("CONTREE_MAX_MATRIX", 256) }
    static var maxNodes: Int { limit("CONTREE_MAX_NODES", 10_000) }

    private static func limit(_ variable: String, _ standard: Int) -> Int {
        guard let text = getenv(variable).map({ String(cString: $0) }), let value = Int(text), value > 0 else {
            return standard
        }
        return value
    }

    /// Counts, without expanding anything, the combinations of each matrix and the nodes of the
    /// plan (combinations multiply along `from` chains), and refuses a file past the limits.
    private mutating func checkSize() {
        let parents = PipelineValidator.parents(of: definition.steps)
        var exports: [String: Int] = [:]
        var nodes = 0
        for stepID in PipelinePlan.order(definition) {
            guard let step = definition.step(stepID) else { continue }
            var combos = 1
            if let matrix = step.matrix {
                // A dynamic axis counts once here; its size is checked when it expands.
                var product = matrix.axes.isEmpty ? 0 : 1
                for axis in matrix.axes where axis.expression == nil {
                    product = PipelineValidator.times(product, axis.values.count)
                }
                combos = PipelineValidator.plus(
                    product, matrix.include.count + (matrix.includeExpression == nil ? 0 : 1))
                guard combos <= PipelineValidator.maxCombinations else {
                    errors.append(
                        PipelineError(
                            .invalid,
                            "step \(stepID)'s matrix has \(combos == Int.max ? "too many" : String(combos)) combinations, more than \(PipelineValidator.maxCombinations); split it (or raise CONTREE_MAX_MATRIX)",
                            at: matrix.location))
                    return
                }
            }
            let starts = parents[stepID].flatMap { $0 }.flatMap { exports[$0] } ?? 1
            let runs = PipelineValidator.times(starts, combos)
            let variants = step.fork.count
            let keepAll = step.select == nil || step.select?.keep == .all
            let made = variants == 0 ? runs : PipelineValidator.times(runs, variants + (step.select == nil ? 0 : 1))
            exports[stepID] = variants == 0 || !keepAll ? runs : PipelineValidator.times(runs, variants)
            nodes = PipelineValidator.plus(nodes, made)
            guard nodes <= PipelineValidator.maxNodes else {
                errors.append(
                    PipelineError(
                        .invalid,
                        "the plan reaches more than \(PipelineValidator.maxNodes) nodes at step \(stepID) (matrices multiply along `from`); make it smaller (or raise CONTREE_MAX_NODES)",
                        at: step.matrix?.location ?? step.location))
                return
            }
        }
    }

    private static func times(_ a: Int, _ b: Int) -> Int {
        let (product, overflow) = a.multipliedReportingOverflow(by: b)
        return overflow ? Int.max : product
    }

    private static func plus(_ a: Int, _ b: Int) -> Int {
        let (sum, overflow) = a.addingReportingOverflow(b)
        return overflow ? Int.max : sum
    }

    /// Checks one reference: `matrix.NAME`, `steps.ID.outputs.KEY|outcome|image`, `env.NAME`.
    mutating func check(
        _ path: [String], at location: SourceLocation, step: String, isAncestor: (String) -> Bool, axes: [String],
        env: Set<String>, allAxes: [String: (names: [String], clash: String?)], openAxes: Bool = false
    ) {
        func fail(_ message: String) { errors.append(PipelineError(.invalid, message, at: location)) }
        switch path[0] {
        case "matrix":
            guard path.count == 2 else { return fail("use matrix.NAME") }
            // `include: ${{ }}` names its keys only when it expands.
            if !axes.contains(path[1]) && !openAxes {
                var message = "matrix.\(path[1]) is not an axis of step \(step)'s matrix"
                message += axes.isEmpty ? " (it has none)" : " (axes: \(axes.joined(separator: ", ")))"
                if let s = Suggestion.closest(to: path[1], in: axes) { message += "; did you mean 'matrix.\(s)'?" }
                fail(message)
            }
        case "steps":
            guard path.count >= 3 else { return fail("use steps.ID.outputs.NAME, steps.ID.outcome or steps.ID.image") }
            let target = path[1]
            guard definition.step(target) != nil else {
                var message = "steps.\(target) names no step"
                if let s = Suggestion.closest(to: target, in: definition.steps.map(\.id.value)) {
                    message += "; did you mean '\(s)'?"
                }
                return fail(message)
            }
            guard isAncestor(target) else {
                return fail(
                    "step \(step) reads steps.\(target), which is not one of the steps it comes after; add it to `needs`"
                )
            }
            // A step that runs once per matrix combination (or fork variant) can only be read
            // from the branch it runs in.
            let targetAxes = exportedAxes(target, allAxes)
            if let axis = targetAxes.first(where: { !axes.contains($0) }) {
                let what = axis.hasPrefix("fork:") ? "fork variant" : "value of matrix axis '\(axis)'"
                return fail(
                    "steps.\(target) is ambiguous in step \(step): \(target) runs once per \(what), and \(step) does not start from one of them; read it in a step that comes `from` \(target)"
                )
            }
            switch path[2] {
            case "outputs": if path.count != 4 { fail("use steps.\(target).outputs.NAME") }
            case "outcome", "image": if path.count != 3 { fail("steps.\(target).\(path[2]) has no fields") }
            default:
                fail("steps.\(target).\(path[2]) is unknown; use outputs.NAME, outcome or image")
            }
        case "env":
            guard path.count == 2 else { return fail("use env.NAME") }
            if !env.contains(path[1]) {
                var message = "env.\(path[1]) is not defined in the pipeline's or the step's env"
                if let s = Suggestion.closest(to: path[1], in: Array(env)) { message += "; did you mean 'env.\(s)'?" }
                fail(message)
            }
        case "secrets":
            fail(
                "secrets are not available in expressions (they would land in logs and step keys); list the secret under the step's `secrets:` and read it as $NAME"
            )
        case "pipeline":
            if path != ["pipeline", "name"] { fail("use pipeline.name") }
        default:
            var message = "unknown name '\(path[0])' in expression; use matrix, steps, env or pipeline"
            if let s = Suggestion.closest(to: path[0], in: ["matrix", "steps", "env", "pipeline"]) {
                message += "; did you mean '\(s)'?"
            }
            fail(message)
        }
    }

    /// Dependencies (from, implicit previous, needs) of every step.
    func dependencies() -> [String: [String]] {
        let parents = PipelineValidator.parents(of: definition.steps)
        var result: [String: [String]] = [:]
        for step in definition.steps {
            result[step.id.value] =
                ([parents[step.id.value] ?? nil].compactMap { $0 }) + step.needs.map(\.value) + step.copies.map(\.step)
                + step.services.compactMap { name in
                    definition.services.first { $0.name.value == name.value }?.from?.value
                }
        }
        return result
    }

    func findCycle() -> [String]? {
        let deps = dependencies()
        var state: [String: Int] = [:]  // 1 visiting, 2 done
        var stack: [String] = []
        func visit(_ id: String) -> [String]? {
            if state[id] == 2 { return nil }
            if state[id] == 1 {
                let start = stack.firstIndex(of: id) ?? 0
                return Array(stack[start...]) + [id]
            }
            state[id] = 1
            stack.append(id)
            for dep in deps[id] ?? [] {
                if let cycle = visit(dep) { return cycle }
            }
            stack.removeLast()
            state[id] = 2
            return nil
        }
        for step in definition.steps {
            if let cycle = visit(step.id.value) { return cycle }
        }
        return nil
    }

    /// Whether one step comes after another, asked only for the references expressions make:
    /// a search up the dependencies that stops where it finds the step (every step's full set
    /// of ancestors would be quadratic in a chain of thousands).
    struct Ancestry {
        let dependencies: [String: [String]]

        init(_ dependencies: [String: [String]]) { self.dependencies = dependencies }

        func reaches(_ step: String, _ ancestor: String) -> Bool {
            var seen: Set<String> = []
            var queue = dependencies[step] ?? []
            while let id = queue.popLast() {
                if id == ancestor { return true }
                guard seen.insert(id).inserted else { continue }
                queue += dependencies[id] ?? []
            }
            return false
        }
    }

    /// The matrix axes each step has: its own plus those of the step it starts from.
    static func keepsAllVariants(_ step: StepDefinition?) -> Bool {
        guard let step, !step.fork.isEmpty else { return false }
        return step.select == nil || step.select?.keep == .all
    }

    /// The axes along which a step's instances vary, as seen by the steps that read it.
    func exportedAxes(_ id: String, _ axes: [String: (names: [String], clash: String?)]) -> [String] {
        (axes[id]?.names ?? []) + (PipelineValidator.keepsAllVariants(definition.step(id)) ? ["fork:" + id] : [])
    }

    func matrixAxes() -> [String: (names: [String], clash: String?)] {
        let parents = PipelineValidator.parents(of: definition.steps)
        var memo: [String: (names: [String], clash: String?)] = [:]
        func compute(_ id: String) -> (names: [String], clash: String?) {
            if let known = memo[id] { return known }
            guard let step = definition.step(id) else { return ([], nil) }
            var inherited: [String] = []
            if let parent = parents[id] ?? nil {
                inherited = compute(parent).names
                // Below a fork that keeps every variant, each variant is a branch of its own.
                if PipelineValidator.keepsAllVariants(definition.step(parent)) { inherited.append("fork:" + parent) }
            }
            let own = step.matrix?.names ?? []
            let clash = own.first { inherited.contains($0) }
            let result = (inherited + own.filter { !inherited.contains($0) }, clash)
            memo[id] = result
            return result
        }
        for step in definition.steps { _ = compute(step.id.value) }
        return memo
    }
}
