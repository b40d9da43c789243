import Foundation
import ImageStore
import Sandbox
import Yams

extension PipelineParser {
    // MARK: The pipeline

    mutating func readPipeline(_ root: Node, directory: String) -> PipelineDefinition? {
        var name: String?
        var image: Located<String>?
        var env: [EnvironmentEntry] = []
        var defaults = StepSettings()
        var secrets: [SecretDefinition] = []
        var caches: [CacheDefinition] = []
        var services: [ServiceDefinition] = []
        var steps: [StepDefinition] = []
        var sawSteps = false
        // Templates first: steps anywhere in the file extend them.
        readTemplates(root)
        // Top-level keys that begin with `x-` are the file's own (a place for anchors, as in
        // Compose files): not read.
        for (key, _, value) in entries(root, allowed: PipelineParser.topKeys, what: "the pipeline", extensions: true) {
            switch key {
            case "name": name = text(value, what: "name")?.value
            case "image": image = text(value, what: "image")
            case "env": env = environment(value, what: "env")
            case "defaults":
                for (k, _, v) in entries(value, allowed: PipelineParser.defaultsKeys, what: "defaults") {
                    _ = setting(k, v, into: &defaults)
                }
            case "secrets": secrets = readSecrets(value)
            case "caches": caches = readCaches(value)
            case "services": services = readServices(value)
            case "templates": break  // read above
            default:
                sawSteps = true
                guard case .sequence(let sequence) = value else {
                    fail(
                        "steps must be a list of steps (each starting with '- id: ...'), not \(describe(value))",
                        at: value)
                    continue
                }
                for (index, stepNode) in sequence.enumerated() {
                    let resolved = extending(stepNode, what: "step \(index + 1)")
                    if let step = readStep(resolved, index: index) { steps.append(step) }
                }
            }
        }
        // A misspelt `steps:` was reported as an unknown key with the suggestion already.
        if !sawSteps && !errors.contains(where: { $0.problem == .unknownKey(suggestion: "steps") }) {
            fail("the pipeline has no `steps:`; add at least one step", at: root)
        } else if steps.isEmpty && errors.isEmpty {
            fail("`steps:` is empty; add at least one step", at: root)
        }
        let fileName = URL(fileURLWithPath: file).deletingPathExtension().lastPathComponent
        return PipelineDefinition(
            file: file, directory: directory, name: name ?? fileName,
            image: image ?? Located(BaseImages.defaultImage, at: at(root)), env: env, defaults: defaults,
            secrets: secrets, caches: caches, services: services, steps: steps)
    }

    /// Reads top-level `templates:` (a mapping of step keys by name, no `id`) into `templates`.
    mutating func readTemplates(_ root: Node) {
        for (key, value) in merged(root, what: "the pipeline") where key.string == "templates" {
            for (name, nameNode, template) in entries(value, allowed: nil, what: "templates") {
                guard Identifiers.isStepID(name) else {
                    fail(
                        "template name '\(name)' must start with a letter and use letters, digits, _ and -",
                        at: nameNode)
                    continue
                }
                guard case .mapping = template else {
                    fail("template \(name) must be a mapping of step keys, not \(describe(template))", at: template)
                    continue
                }
                if let id = merged(template, what: "template \(name)").first(where: { $0.0.string == "id" }) {
                    fail("template \(name) sets id; each step names itself", at: id.0)
                    continue
                }
                templates[name] = template
            }
        }
    }

    /// A step with its `extends:` applied, as GitLab applies it: each template named (in order;
    /// a template may extend others) is deep-merged under the step (mappings merge key by key,
    /// lists and single values replace), the step's own keys last. Values keep where they were
    /// written, so an error in a template's value names the template's line.
    mutating func extending(_ node: Node, what: String, chain: [String] = []) -> Node {
        guard case .mapping(let mapping) = node else { return node }
        let pairs = merged(node, what: what)
        // Merge keys applied first, so that `extends` deep-merges what they brought too.
        let own = Node.mapping(
            Node.Mapping(pairs.filter { $0.0.string != "extends" }, mapping.tag, mapping.style, mapping.mark))
        guard let extends = pairs.first(where: { $0.0.string == "extends" }) else { return own }
        let names = oneOrMore(extends.1, what: "extends")
        var base: Node?
        for name in names {
            if let cycle = chain.firstIndex(of: name.value) {
                fail(
                    PipelineError(
                        .invalid,
                        "templates extend each other in a cycle: \((chain[cycle...] + [name.value]).joined(separator: " → "))",
                        at: name.location))
                continue
            }
            guard let template = templates[name.value] else {
                let known = templates.keys.sorted()
                fail(
                    PipelineError(
                        .invalid,
                        "extends: no template \(name.value)"
                            + (known.isEmpty
                                ? "; define it under `templates:`" : " (templates: \(known.joined(separator: ", ")))"),
                        at: name.location))
                continue
            }
            let resolved = extending(template, what: "template \(name.value)", chain: chain + [name.value])
            base = base.map { PipelineParser.deepMerge($0, resolved) } ?? resolved
        }
        guard let base, case .mapping(let result) = PipelineParser.deepMerge(base, own) else { return own }
        // The step's id first, as it was written (the templates' keys come before its own).
        let ordered = result.filter { $0.key.string == "id" } + result.filter { $0.key.string != "id" }
        return .mapping(Node.Mapping(ordered.map { ($0.key, $0.value) }, result.tag, result.style, result.mark))
    }

    /// `over` laid on `base`: mappings merge key by key (recursively), anything else replaces.
    static func deepMerge(_ base: Node, _ over: Node) -> Node {
        guard case .mapping(let a) = base, case .mapping(let b) = over else { return over }
        var pairs: [(Node, Node)] = []
        var overridden = Set<String>()
        for (key, value) in a {
            if let name = key.string, let replacement = b.first(where: { $0.key.string == name }) {
                pairs.append((replacement.key, deepMerge(value, replacement.value)))
                overridden.insert(name)
            } else {
                pairs.append((key, value))
            }
        }
        for (key, value) in b where !(key.string.map(overridden.contains) ?? false) { pairs.append((key, value)) }
        return .mapping(Node.Mapping(pairs, b.tag, b.style, b.mark))
    }

    /// Top-level `services: {NAME: {image | from, run, ready: {run, timeout}, env}}`.
    mutating func readServices(_ node: Node) -> [ServiceDefinition] {
        var result: [ServiceDefinition] = []
        for (key, keyNode, value) in entries(node, allowed: nil, what: "services") {
            guard Identifiers.isStepID(key) else {
                fail("service name '\(key)' must start with a letter and use letters, digits, _ and -", at: keyNode)
                continue
            }
            let errorsBefore = errors.count
            var service = ServiceDefinition(
                name: Located(key, at: at(keyNode)), image: nil, from: nil, run: "", env: [], ready: nil,
                readyTimeout: 30, location: at(value))
            var sawRun = false
            for (field, _, fieldValue) in entries(
                value, allowed: ["image", "from", "run", "ready", "env"], what: "service \(key)")
            {
                switch field {
                case "image": service.image = text(fieldValue, what: "image")
                case "from": service.from = string(fieldValue, what: "from")
                case "run":
                    sawRun = true
                    service.run = text(fieldValue, what: "run")?.value ?? ""
                case "env":
                    for (name, nameNode, v) in entries(fieldValue, allowed: nil, what: "env of service \(key)") {
                        guard Identifiers.isEnvironmentName(name) else {
                            fail("'\(name)' is not a valid environment variable name", at: nameNode)
                            continue
                        }
                        if let t = text(v, what: name, allowingBoolean: true) { service.env.append((name, t.value)) }
                    }
                default:
                    if case .mapping = fieldValue {
                        for (r, _, rv) in entries(fieldValue, allowed: ["run", "timeout"], what: "ready") {
                            if r == "run" {
                                service.ready = text(rv, what: "ready.run")?.value
                            } else if let seconds = duration(rv, what: "ready.timeout") {
                                service.readyTimeout = seconds
                            }
                        }
                    } else {
                        service.ready = text(fieldValue, what: "ready")?.value
                    }
                }
            }
            if !sawRun && errors.count == errorsBefore {
                fail("service \(key) needs `run:` (the command that serves)", at: value)
            }
            if let image = service.image, service.from != nil {
                fail(
                    PipelineError(
                        .invalid, "service \(key) has both `image:` and `from:`; drop one", at: image.location))
            }
            if errors.count == errorsBefore { result.append(service) }
        }
        return result
    }

    /// Top-level `caches: {NAME: {path: /ABSOLUTE}}`.
    mutating func readCaches(_ node: Node) -> [CacheDefinition] {
        var result: [CacheDefinition] = []
        for (key, keyNode, value) in entries(node, allowed: nil, what: "caches") {
            if (try? DependencyCaches.validate(key)) == nil {
                fail(
                    "cache name '\(key)' may only hold letters, digits, '-', '_' and '.', starting with a letter or digit",
                    at: keyNode)
                continue
            }
            var path: String?
            for (field, _, fieldValue) in entries(value, allowed: ["path"], what: "cache \(key)") where field == "path"
            {
                guard let text = string(fieldValue, what: "path") else { continue }
                if !text.value.hasPrefix("/") || text.value == "/" || text.value.split(separator: "/").contains("..") {
                    fail(
                        "the path of cache \(key) must be an absolute directory in the sandbox, not '\(text.value)'",
                        at: fieldValue)
                } else {
                    path = text.value
                }
            }
            guard let path else {
                if case .mapping = value, !errors.contains(where: { $0.location?.line == value.mark?.line }) {
                    fail("cache \(key) needs `path: /DIRECTORY` (where steps see it)", at: value)
                }
                continue
            }
            result.append(CacheDefinition(name: Located(key, at: at(keyNode)), path: path))
        }
        return result
    }

    /// A step's `copy: [{from: STEP, path: /ABS, to: /ABS}]`.
    mutating func readCopies(_ node: Node) -> [CopyDefinition] {
        guard case .sequence(let sequence) = node else {
            fail("copy must be a list of {from: STEP, path: /PATH, to: /PATH}, not \(describe(node))", at: node)
            return []
        }
        var result: [CopyDefinition] = []
        for entry in sequence {
            var from: Located<String>?
            var path: String?
            var to: Template?
            for (key, _, value) in entries(entry, allowed: ["from", "path", "to"], what: "a copy") {
                switch key {
                case "from": from = string(value, what: "from")
                case "path":
                    if let text = string(value, what: "path") {
                        if text.value.hasPrefix("/") && !text.value.split(separator: "/").contains("..") {
                            path = text.value
                        } else {
                            fail(
                                "the path of a copy must be absolute in the source snapshot, not '\(text.value)'",
                                at: value)
                        }
                    }
                default:
                    if let t = template(value, what: "to", textOnly: true) {
                        if let literal = t.literal,
                            !literal.hasPrefix("/") || literal.split(separator: "/").contains("..")
                        {
                            fail("`to` must be an absolute path in the sandbox, not '\(literal)'", at: value)
                        } else {
                            to = t
                        }
                    }
                }
            }
            guard case .mapping = entry else { continue }
            guard let from, let path, let to else {
                if from == nil || path == nil || to == nil, errors.last?.location?.line != entry.mark?.line {
                    fail("a copy needs `from: STEP`, `path: /PATH` and `to: /PATH`", at: entry)
                }
                continue
            }
            // `build[os=debian,cc=gcc]` chooses one instance of a matrix step.
            var step = from.value
            var instance: [String: String] = [:]
            if let open = from.value.firstIndex(of: "["), from.value.hasSuffix("]") {
                step = String(from.value[..<open])
                let inner = from.value[from.value.index(after: open)..<from.value.index(before: from.value.endIndex)]
                for pair in inner.split(separator: ",") {
                    let parts = pair.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
                    guard parts.count == 2, !parts[0].isEmpty else {
                        fail("`from: \(from.value)` chooses an instance as STEP[NAME=VALUE,...]", at: entry)
                        continue
                    }
                    instance[parts[0]] = parts[1]
                }
            }
            result.append(
                CopyDefinition(from: from, step: step, instance: instance, path: path, to: to, location: at(entry)))
        }
        return result
    }

    /// A step's `caches: [NAME, {name: NAME, sharing: locked|shared|private}]`.
    mutating func readCacheUses(_ node: Node) -> [CacheUse] {
        guard case .sequence(let sequence) = node else {
            fail(
                "caches must be a list of cache names (or {name: NAME, sharing: locked|shared|private}), not \(describe(node))",
                at: node)
            return []
        }
        var result: [CacheUse] = []
        for entry in sequence {
            if case .mapping = entry {
                var name: Located<String>?
                var sharing = DependencyCaches.Sharing.locked
                for (key, _, value) in entries(entry, allowed: ["name", "sharing"], what: "a cache") {
                    if key == "name" {
                        name = string(value, what: "name")
                    } else if let chosen = enumeration(value, what: "sharing", as: DependencyCaches.Sharing.self) {
                        sharing = chosen
                    }
                }
                guard let name else {
                    fail("a cache entry needs `name: NAME`", at: entry)
                    continue
                }
                result.append(CacheUse(name: name, sharing: sharing))
            } else if let name = string(entry, what: "a cache") {
                result.append(CacheUse(name: name, sharing: .locked))
            }
        }
        return result
    }

    mutating func readSecrets(_ node: Node) -> [SecretDefinition] {
        var result: [SecretDefinition] = []
        for (key, keyNode, value) in entries(node, allowed: nil, what: "secrets") {
            guard Identifiers.isEnvironmentName(key) else {
                fail("secret name '\(key)' must be a valid environment variable name", at: keyNode)
                continue
            }
            let fields = entries(value, allowed: ["env", "file"], what: "secret \(key)")
            guard fields.count == 1, let field = fields.first, let text = string(field.value, what: field.key) else {
                if fields.count != 1 {
                    fail("secret \(key) needs exactly one source: `env: HOST_VARIABLE` or `file: PATH`", at: value)
                }
                continue
            }
            result.append(
                SecretDefinition(
                    name: Located(key, at: at(keyNode)),
                    source: field.key == "env" ? .environment(text.value) : .file(text.value)))
        }
        return result
    }

    mutating func readStep(_ node: Node, index: Int) -> StepDefinition? {
        let errorsBefore = errors.count
        let fields = entries(node, allowed: PipelineParser.stepKeys, what: "step \(index + 1)")
        guard case .mapping = node else { return nil }
        guard let idField = fields.first(where: { $0.key == "id" }), let id = string(idField.value, what: "id") else {
            if !fields.contains(where: { $0.key == "id" }) {
                fail("step \(index + 1) has no id; give it `id: NAME`", at: node)
            }
            return nil
        }
        guard Identifiers.isStepID(id.value) else {
            fail("step id '\(id.value)' must start with a letter and use letters, digits, _ and -", at: idField.value)
            return nil
        }
        var step = StepDefinition(
            id: id, location: at(node), run: nil, env: [], settings: StepSettings(), from: nil, needs: [], inputs: [],
            artifacts: [], matrix: nil, fork: [], select: nil, condition: nil, conditionText: nil,
            continueOnError: false,
            cache: nil, secrets: [])
        for (key, _, value) in fields where key != "id" {
            if setting(key, value, into: &step.settings) { continue }
            switch key {
            case "run": step.run = script(value)
            case "env": step.env = environment(value, what: "env of step \(id.value)")
            case "from": step.from = text(value, what: "from")
            case "needs": step.needs = stringList(value, what: "needs")
            case "inputs": step.inputs = readInputs(value)
            case "artifacts": step.artifacts = readArtifacts(value)
            case "matrix": step.matrix = readMatrix(value)
            case "fork": step.fork = readFork(value)
            case "select": step.select = readSelect(value)
            case "if":
                if let text = text(value, what: "if", allowingBoolean: true) {
                    var expression = text.value.trimmingWhitespace
                    var shift = 0
                    if expression.hasPrefix("${{") && expression.hasSuffix("}}") {
                        expression = String(expression.dropFirst(3).dropLast(2))
                        shift = 3
                    }
                    let locate = locator(for: value)
                    do {
                        step.condition = try ExpressionParser.parse(expression) { locate($0 + shift) }
                        step.conditionText = text.value
                    } catch let error as PipelineError {
                        fail(error)
                    } catch {}
                }
            case "continue-on-error": step.continueOnError = bool(value, what: "continue-on-error") ?? false
            case "cache": step.cache = bool(value, what: "cache")
            case "secrets": step.secrets = stringList(value, what: "secrets")
            case "caches": step.caches = readCacheUses(value)
            case "image": step.image = text(value, what: "image")
            case "copy": step.copies = readCopies(value)
            case "services": step.services = stringList(value, what: "services")
            case "flaky-check":
                if let count = integer(value, what: "flaky-check", minimum: 1) {
                    if count > PipelineParser.flakyCheckLimit {
                        fail(
                            "flaky-check runs a failed step again at most \(PipelineParser.flakyCheckLimit) times at once, not \(count)",
                            at: value)
                    } else {
                        step.flakyCheck = count
                    }
                }
            case "allow-flaky": step.allowFlaky = bool(value, what: "allow-flaky") ?? false
            case "reports":
                for (key, _, files) in entries(value, allowed: PipelineParser.reportsKeys, what: "reports")
                where key == "junit" {
                    step.junitReports = oneOrMore(files, what: "reports.junit")
                }
            default: break
            }
        }
        if step.allowFlaky && step.flakyCheck == nil && errors.count == errorsBefore {
            fail(
                "step \(id.value) has allow-flaky but no flaky-check: N, so nothing can find it flaky; add flaky-check",
                at: node)
        }
        // Only when nothing else went wrong here: a misspelt or broken `run` was reported already.
        if step.run == nil && step.fork.isEmpty && errors.count == errorsBefore {
            fail("step \(id.value) has nothing to run; give it `run:` (or `fork:` variants)", at: node)
        }
        if errors.count > errorsBefore {
            brokenSteps.append(id.value)
            return nil
        }
        return step
    }

    /// `run:` as one string or a list of lines.
    mutating func script(_ node: Node) -> Template? {
        if case .sequence(let sequence) = node {
            let parts = sequence.compactMap { template($0, what: "a line of run") }
            guard parts.count == sequence.count else { return nil }
            var joined: [Template.Part] = []
            for (i, part) in parts.enumerated() {
                if i > 0 { joined.append(.text("\n")) }
                joined.append(contentsOf: part.parts)
            }
            return Template(parts: joined, location: at(node))
        }
        // `run: true` is the command true: a script is its text, whatever YAML takes it for.
        return template(node, what: "run")
    }

    mutating func readInputs(_ node: Node) -> [InputDefinition] {
        guard case .sequence(let sequence) = node else {
            fail("inputs must be a list of paths or globs (or {from: GLOB, to: DIR}), not \(describe(node))", at: node)
            return []
        }
        var result: [InputDefinition] = []
        for entry in sequence {
            if case .mapping = entry {
                var from: Located<String>?
                var to: String?
                for (key, _, value) in entries(entry, allowed: ["from", "to"], what: "an input") {
                    if key == "from" {
                        from = string(value, what: "from")
                    } else if let t = string(value, what: "to") {
                        if t.value.hasPrefix("/") {
                            to = t.value
                        } else {
                            fail("`to` must be an absolute directory in the sandbox, not '\(t.value)'", at: value)
                        }
                    }
                }
                guard let from else {
                    fail("an input mapping needs `from: PATH-OR-GLOB`", at: entry)
                    continue
                }
                result.append(InputDefinition(pattern: from, destination: to))
            } else if let pattern = string(entry, what: "an input") {
                result.append(InputDefinition(pattern: pattern, destination: nil))
            }
        }
        for input in result
        where input.pattern.value.hasPrefix("/") || input.pattern.value.split(separator: "/").contains("..") {
            fail(
                PipelineError(
                    .invalid,
                    "input '\(input.pattern.value)' must be relative to the pipeline's directory and stay inside it",
                    at: input.pattern.location))
        }
        return result
    }

    mutating func readArtifacts(_ node: Node) -> [ArtifactDefinition] {
        var when = ArtifactCondition.success
        var items: [Node] = []
        switch node {
        case .sequence(let sequence): items = Array(sequence)
        case .mapping:
            for (key, _, value) in entries(node, allowed: ["paths", "when"], what: "artifacts") {
                if key == "when" {
                    when = enumeration(value, what: "when", as: ArtifactCondition.self) ?? .success
                } else if case .sequence(let sequence) = value {
                    items = Array(sequence)
                } else {
                    items = [value]
                }
            }
        default: items = [node]
        }
        var result: [ArtifactDefinition] = []
        for item in items {
            if case .mapping = item {
                var path: Located<String>?
                var itemWhen = when
                for (key, _, value) in entries(item, allowed: ["path", "when"], what: "an artifact") {
                    if key == "path" {
                        path = string(value, what: "path")
                    } else {
                        itemWhen = enumeration(value, what: "when", as: ArtifactCondition.self) ?? when
                    }
                }
                guard let path else {
                    fail("an artifact mapping needs `path: PATH-OR-GLOB`", at: item)
                    continue
                }
                result.append(ArtifactDefinition(pattern: path, when: itemWhen))
            } else if let path = string(item, what: "an artifact") {
                result.append(ArtifactDefinition(pattern: path, when: when))
            }
        }
        return result
    }

    /// A dynamic matrix's list: one `${{ }}` expression and nothing else.
    mutating func listExpression(_ node: Node, what: String) -> Expression? {
        guard let template = template(node, what: what) else { return nil }
        guard template.parts.count == 1, case .expression(let expression, _) = template.parts[0] else {
            fail(
                "\(what) must be a list, or one ${{ }} expression that gives a list when the pipeline runs, e.g. \"${{ fromJSON(steps.discover.outputs.pkgs) }}\"",
                at: node)
            return nil
        }
        return expression
    }

    mutating func readMatrix(_ node: Node) -> MatrixDefinition? {
        var axes: [MatrixAxis] = []
        var include: [[String: String]] = []
        var exclude: [[String: String]] = []
        var includeExpression: Expression?
        var broken = false  // an expression refused: say that, not that nothing is left
        for (key, keyNode, value) in entries(node, allowed: nil, what: "matrix") {
            if key == "include", case .scalar = value {
                includeExpression = listExpression(value, what: "matrix include")
                broken = broken || includeExpression == nil
                continue
            }
            if key == "include" || key == "exclude" {
                guard case .sequence(let sequence) = value else {
                    fail("\(key) must be a list of combinations (mappings)", at: value)
                    continue
                }
                for combo in sequence {
                    var values: [String: String] = [:]
                    for (k, _, v) in entries(combo, allowed: nil, what: "a combination of \(key)") {
                        if let s = string(v, what: k) { values[k] = s.value }
                    }
                    if key == "include" { include.append(values) } else { exclude.append(values) }
                }
                continue
            }
            guard Identifiers.isStepID(key) else {
                fail("matrix axis '\(key)' must start with a letter and use letters, digits, _ and -", at: keyNode)
                continue
            }
            if case .scalar = value {
                if let expression = listExpression(value, what: "matrix axis '\(key)'") {
                    axes.append(MatrixAxis(name: key, values: [], expression: expression))
                } else {
                    broken = true
                }
                continue
            }
            guard case .sequence(let sequence) = value, !sequence.isEmpty else {
                fail("matrix axis '\(key)' must be a non-empty list of values", at: value)
                continue
            }
            axes.append(
                MatrixAxis(name: key, values: sequence.compactMap { string($0, what: "a value of \(key)")?.value }))
        }
        let names = Set(axes.map(\.name))
        for ex in exclude {
            for key in ex.keys where !names.contains(key) {
                fail(
                    "exclude names '\(key)', which is not an axis of the matrix (\(names.sorted().joined(separator: ", ")))",
                    at: node)
            }
        }
        var matrix = MatrixDefinition(axes: axes, include: include, exclude: exclude, location: at(node))
        matrix.includeExpression = includeExpression
        // Expanded only when small: the validator refuses (without expanding) one too large.
        var product = 1
        for axis in axes {
            let (next, overflow) = product.multipliedReportingOverflow(by: axis.values.count)
            product = overflow ? Int.max : next
        }
        if !broken && !matrix.isDynamic && product <= PipelineValidator.maxCombinations && matrix.combinations.isEmpty {
            fail("the matrix has no combinations left", at: node)
        }
        return matrix
    }

    mutating func readFork(_ node: Node) -> [ForkVariant] {
        var variants: [ForkVariant] = []
        for (name, keyNode, value) in entries(node, allowed: nil, what: "fork") {
            guard Identifiers.isStepID(name) else {
                fail("variant name '\(name)' must start with a letter and use letters, digits, _ and -", at: keyNode)
                continue
            }
            var variant = ForkVariant(name: Located(name, at: at(keyNode)), run: nil, env: [], settings: StepSettings())
            for (key, _, v) in entries(value, allowed: PipelineParser.variantKeys, what: "variant \(name)") {
                if setting(key, v, into: &variant.settings) { continue }
                if key == "run" {
                    variant.run = script(v)
                } else {
                    variant.env = environment(v, what: "env of variant \(name)")
                }
            }
            variants.append(variant)
        }
        if variants.isEmpty { fail("fork needs at least one named variant", at: node) }
        return variants
    }

    mutating func readSelect(_ node: Node) -> SelectDefinition? {
        var score: Template?
        var keep = SelectDefinition.Keep.best
        var higher = true
        for (key, _, value) in entries(node, allowed: PipelineParser.selectKeys, what: "select") {
            switch key {
            case "score": score = script(value)
            case "keep":
                if let text = string(value, what: "keep") {
                    if let k = SelectDefinition.Keep(rawValue: text.value) {
                        keep = k
                    } else {
                        var message = "keep must be best, all or first-success, not '\(text.value)'"
                        if let s = Suggestion.closest(to: text.value, in: ["best", "all", "first-success"]) {
                            message += "; did you mean '\(s)'?"
                        }
                        fail(message, at: value)
                    }
                }
            default:
                if let text = string(value, what: "order") {
                    switch text.value {
                    case "highest": higher = true
                    case "lowest": higher = false
                    default: fail("order must be highest or lowest, not '\(text.value)'", at: value)
                    }
                }
            }
        }
        if keep == .best && score == nil {
            fail("`keep: best` needs a `score:` command to compare the variants", at: node)
        }
        return SelectDefinition(score: score, keep: keep, higherIsBetter: higher, location: at(node))
    }
}
