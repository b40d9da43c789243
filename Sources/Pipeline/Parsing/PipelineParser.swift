import Foundation
import Sandbox
import Yams

/// Reads a pipeline file into a `PipelineDefinition`, checking every key, type and expression
/// and naming the file, line and column of each problem. All problems are reported at once.
public struct PipelineParser {
    let file: String
    let source: String
    let lines: [Substring]
    var errors: [PipelineError] = []
    /// Ids of steps that were rejected (so that references to them are not reported again).
    var brokenSteps: [String] = []

    static let topKeys = ["name", "image", "env", "defaults", "secrets", "steps"]
    static let defaultsKeys = ["shell", "workdir", "timeout", "retries", "limits", "network", "isolation"]
    static let stepKeys = [
        "id", "run", "shell", "env", "workdir", "from", "needs", "inputs", "artifacts", "matrix", "fork", "select",
        "timeout", "retries", "if", "continue-on-error", "cache", "limits", "network", "isolation", "secrets",
    ]
    static let variantKeys = ["run", "env", "shell", "workdir", "timeout", "limits"]
    static let selectKeys = ["score", "keep", "order"]
    static let limitsKeys = ["memory", "cpus", "pids"]

    /// Parses the file at `path`.
    /// - Throws: `PipelineValidationError` with every problem found.
    public static func parse(file path: String) throws -> PipelineDefinition {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw PipelineValidationError([
                PipelineError(.invalid, "cannot read the pipeline file \(path); check the path")
            ])
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw PipelineValidationError([PipelineError(.invalid, "\(path) is not UTF-8 text")])
        }
        let absolute = URL(fileURLWithPath: path).standardizedFileURL
        return try parse(text, file: path, directory: absolute.deletingLastPathComponent().path)
    }

    /// Parses `text` as the content of `file` (used in messages), with inputs relative to
    /// `directory`.
    public static func parse(_ text: String, file: String, directory: String) throws -> PipelineDefinition {
        var parser = PipelineParser(file: file, source: text)
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch let error as YamlError {
            throw PipelineValidationError([parser.convert(error)])
        }
        guard let root else {
            throw PipelineValidationError([
                PipelineError(.invalid, "the file is empty; a pipeline needs at least `steps:`", at: parser.at(nil))
            ])
        }
        let definition = parser.readPipeline(root, directory: directory)
        guard let definition else { throw PipelineValidationError(parser.errors) }
        // The whole-file checks run even after local problems, so that one pass reports as
        // much as possible; references to steps that failed to parse are not repeated.
        var validator = PipelineValidator(definition: definition)
        let problems = validator.validate().filter { error in
            guard case .unknownStep(let name) = error.problem else { return true }
            return !parser.brokenSteps.contains(name)
        }
        let all = parser.errors + (parser.errors.isEmpty ? problems : problems.filter { $0.problem != .cycle })
        if !all.isEmpty { throw PipelineValidationError(all) }
        return definition
    }

    init(file: String, source: String) {
        self.file = file
        self.source = source
        self.lines = source.split(separator: "\n", omittingEmptySubsequences: false)
    }

    // MARK: Errors and places

    func at(_ node: Node?) -> SourceLocation {
        guard let mark = node?.mark else { return SourceLocation(file: file, line: 1, column: 1) }
        return SourceLocation(file: file, line: mark.line, column: mark.column)
    }

    mutating func fail(_ message: String, at node: Node?) {
        errors.append(PipelineError(.invalid, message, at: at(node)))
    }

    mutating func fail(_ error: PipelineError) {
        errors.append(error)
    }

    func convert(_ error: YamlError) -> PipelineError {
        switch error {
        case .scanner(let context, let problem, let mark, _), .parser(let context, let problem, let mark, _),
            .composer(let context, let problem, let mark, _):
            let detail = context.map { "\($0.text) " } ?? ""
            return PipelineError(
                .invalid, "malformed YAML: \(detail)\(problem)",
                at: SourceLocation(file: file, line: mark.line, column: mark.column))
        case .duplicatedKeysInMapping(let duplicates, let context):
            return PipelineError(
                .invalid,
                "duplicate key \(duplicates.map { "'\($0)'" }.joined(separator: ", ")) in a mapping; each key may appear once",
                at: SourceLocation(file: file, line: context.mark.line, column: context.mark.column))
        default:
            return PipelineError(
                .invalid, "malformed YAML: \(error)", at: SourceLocation(file: file, line: 1, column: 1))
        }
    }

    /// Maps an offset inside a scalar's value to its place in the file.
    func locator(for node: Node) -> (Int) -> SourceLocation {
        let base = at(node)
        guard case .scalar(let scalar) = node else { return { _ in base } }
        let value = scalar.string
        let block = scalar.style == .literal || scalar.style == .folded
        let quoted = scalar.style == .singleQuoted || scalar.style == .doubleQuoted
        var indent = 0
        if block, base.line < lines.count {
            indent = lines[base.line].prefix { $0 == " " }.count
        }
        let file = self.file
        return { offset in
            let prefix = value.prefix(offset)
            let newlines = prefix.filter { $0 == "\n" }.count
            let sinceNewline = prefix.reversed().prefix { $0 != "\n" }.count
            if block {
                return SourceLocation(file: file, line: base.line + 1 + newlines, column: indent + sinceNewline + 1)
            }
            if newlines == 0 {
                return SourceLocation(
                    file: file, line: base.line, column: base.column + (quoted ? 1 : 0) + sinceNewline)
            }
            return SourceLocation(file: file, line: base.line + newlines, column: sinceNewline + 1)
        }
    }

    // MARK: Typed readers

    /// The entries of a mapping, refusing keys that are not in `allowed` (with a suggestion).
    mutating func entries(_ node: Node, allowed: [String]?, what: String) -> [(key: String, keyNode: Node, value: Node)]
    {
        guard case .mapping(let mapping) = node else {
            fail("\(what) must be a mapping (key: value), not \(describe(node))", at: node)
            return []
        }
        var result: [(String, Node, Node)] = []
        for (keyNode, value) in mapping {
            guard let key = keyNode.string else {
                fail("keys of \(what) must be strings", at: keyNode)
                continue
            }
            if let allowed, !allowed.contains(key) {
                var message = "unknown key '\(key)' in \(what)"
                if let suggestion = Suggestion.closest(to: key, in: allowed) {
                    message += "; did you mean '\(suggestion)'?"
                }
                message += " (allowed: \(allowed.joined(separator: ", ")))"
                fail(message, at: keyNode)
                continue
            }
            result.append((key, keyNode, value))
        }
        return result
    }

    func describe(_ node: Node) -> String {
        switch node {
        case .scalar(let s): return s.string.isEmpty ? "an empty value" : "the text '\(s.string.prefix(40))'"
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    mutating func string(_ node: Node, what: String) -> Located<String>? {
        guard case .scalar(let scalar) = node else {
            fail("\(what) must be a single value, not \(describe(node))", at: node)
            return nil
        }
        if scalar.tag.rawValue == Tag.Name.null.rawValue && scalar.style == .plain
            && (scalar.string.isEmpty || scalar.string == "null" || scalar.string == "~")
        {
            fail("\(what) is empty; give it a value", at: node)
            return nil
        }
        return Located(scalar.string, at: at(node))
    }

    /// A value that must be text: a number or a boolean YAML reads as such (`name: 5`,
    /// `image: 123`) is refused with the quoted form to write, as the JSON Schema refuses it.
    mutating func text(_ node: Node, what: String, allowingBoolean: Bool = false) -> Located<String>? {
        if case .scalar(let scalar) = node, scalar.style == .plain {
            let kind: String? =
                switch Resolver.default.resolveTag(of: node) {
                case .int, .float: "a number"
                case .bool: allowingBoolean ? nil : "a boolean"
                case .timestamp: "a date"
                default: nil
                }
            if let kind {
                fail("\(what) must be text, not \(kind); quote it: \"\(scalar.string)\"", at: node)
                return nil
            }
        }
        return string(node, what: what)
    }

    mutating func template(_ node: Node, what: String, textOnly: Bool = false) -> Template? {
        guard let text = textOnly ? text(node, what: what) : string(node, what: what) else { return nil }
        do {
            return try Template.parse(text.value, at: text.location, locate: locator(for: node))
        } catch let error as PipelineError {
            fail(error)
            return nil
        } catch {
            return nil
        }
    }

    mutating func stringList(_ node: Node, what: String) -> [Located<String>] {
        switch node {
        case .scalar: return string(node, what: what).map { [$0] } ?? []
        case .sequence(let sequence): return sequence.compactMap { string($0, what: "an entry of \(what)") }
        default:
            fail("\(what) must be a value or a list of values, not \(describe(node))", at: node)
            return []
        }
    }

    mutating func bool(_ node: Node, what: String) -> Bool? {
        guard let text = string(node, what: what) else { return nil }
        switch text.value.lowercased() {
        case "true", "yes", "on": return true
        case "false", "no", "off": return false
        default:
            fail("\(what) must be true or false, not '\(text.value)'", at: node)
            return nil
        }
    }

    mutating func integer(_ node: Node, what: String, minimum: Int) -> Int? {
        guard let text = string(node, what: what) else { return nil }
        guard text.value.allSatisfy(\.isASCII), text.value.allSatisfy(\.isNumber), let n = Int(text.value), n >= minimum
        else {
            fail("\(what) must be a whole number of at least \(minimum), not '\(text.value)'", at: node)
            return nil
        }
        return n
    }

    mutating func number(_ node: Node, what: String) -> Double? {
        guard let text = string(node, what: what) else { return nil }
        guard Units.isDecimal(text.value), let n = Double(text.value), n > 0 else {
            fail("\(what) must be a positive number, not '\(text.value)'", at: node)
            return nil
        }
        return n
    }

    /// `90`, `90s`, `10m`, `1h30m`, `1.5h`.
    mutating func duration(_ node: Node, what: String) -> Double? {
        guard let text = string(node, what: what) else { return nil }
        guard let seconds = Units.seconds(text.value), seconds > 0 else {
            fail("\(what) must be a duration such as 90, 90s, 10m or 1h30m, not '\(text.value)'", at: node)
            return nil
        }
        return seconds
    }

    mutating func enumeration<T: RawRepresentable>(_ node: Node, what: String, as: T.Type) -> T?
    where T.RawValue == String, T: CaseIterable {
        guard let text = string(node, what: what) else { return nil }
        guard let value = T(rawValue: text.value) else {
            let options = T.allCases.map(\.rawValue)
            var message = "\(what) must be one of \(options.joined(separator: ", ")), not '\(text.value)'"
            if let s = Suggestion.closest(to: text.value, in: options) { message += "; did you mean '\(s)'?" }
            fail(message, at: node)
            return nil
        }
        return value
    }

    mutating func environment(_ node: Node, what: String) -> [EnvironmentEntry] {
        var result: [EnvironmentEntry] = []
        for (key, keyNode, value) in entries(node, allowed: nil, what: what) {
            guard Identifiers.isEnvironmentName(key) else {
                fail(
                    "'\(key)' is not a valid environment variable name (letters, digits, _; not starting with a digit)",
                    at: keyNode)
                continue
            }
            if key.hasPrefix("CONTREE_") {
                fail("variables starting with CONTREE_ are set by contree-pipeline; pick another name", at: keyNode)
                continue
            }
            if let template = template(value, what: "the value of \(key)") {
                result.append(EnvironmentEntry(name: key, value: template))
            }
        }
        return result
    }

    mutating func limits(_ node: Node, what: String) -> LimitsDefinition {
        var limits = LimitsDefinition()
        for (key, _, value) in entries(node, allowed: PipelineParser.limitsKeys, what: what) {
            switch key {
            case "memory":
                if let text = string(value, what: "memory") {
                    if let bytes = ByteCount.parse(text.value), bytes >= 1 << 20 {
                        limits.memoryBytes = bytes
                    } else {
                        fail("memory must be a size of at least 1m such as 512m or 2g, not '\(text.value)'", at: value)
                    }
                }
            case "cpus": limits.cpus = number(value, what: "cpus")
            default: limits.pids = integer(value, what: "pids", minimum: 2)
            }
        }
        return limits
    }

    /// Reads the keys shared by `defaults` and steps into `settings`; true if `key` was one.
    mutating func setting(_ key: String, _ value: Node, into settings: inout StepSettings) -> Bool {
        switch key {
        case "shell":
            let words =
                text(value, what: "shell").map { $0.value.split(whereSeparator: \.isWhitespace).map(String.init) } ?? []
            if words.isEmpty { fail("shell must name an interpreter such as sh, bash or python3", at: value) }
            settings.shell = words.isEmpty ? nil : words
        case "workdir":
            if let t = template(value, what: "workdir", textOnly: true) {
                if let literal = t.literal, !literal.hasPrefix("/") {
                    fail("workdir must be an absolute path in the sandbox, not '\(literal)'", at: value)
                } else {
                    settings.workdir = t
                }
            }
        case "timeout": settings.timeout = duration(value, what: "timeout")
        case "retries": settings.retries = integer(value, what: "retries", minimum: 0)
        case "limits": settings.limits = limits(value, what: "limits")
        case "network": settings.network = enumeration(value, what: "network", as: NetworkMode.self)
        case "isolation": settings.isolation = enumeration(value, what: "isolation", as: IsolationKind.self)
        default: return false
        }
        return true
    }

    // MARK: The pipeline

    mutating func readPipeline(_ root: Node, directory: String) -> PipelineDefinition? {
        var name: String?
        var image: Located<String>?
        var env: [EnvironmentEntry] = []
        var defaults = StepSettings()
        var secrets: [SecretDefinition] = []
        var steps: [StepDefinition] = []
        var sawSteps = false
        for (key, _, value) in entries(root, allowed: PipelineParser.topKeys, what: "the pipeline") {
            switch key {
            case "name": name = text(value, what: "name")?.value
            case "image": image = text(value, what: "image")
            case "env": env = environment(value, what: "env")
            case "defaults":
                for (k, _, v) in entries(value, allowed: PipelineParser.defaultsKeys, what: "defaults") {
                    _ = setting(k, v, into: &defaults)
                }
            case "secrets": secrets = readSecrets(value)
            default:
                sawSteps = true
                guard case .sequence(let sequence) = value else {
                    fail(
                        "steps must be a list of steps (each starting with '- id: ...'), not \(describe(value))",
                        at: value)
                    continue
                }
                for (index, stepNode) in sequence.enumerated() {
                    if let step = readStep(stepNode, index: index) { steps.append(step) }
                }
            }
        }
        if !sawSteps {
            fail("the pipeline has no `steps:`; add at least one step", at: root)
        } else if steps.isEmpty && errors.isEmpty {
            fail("`steps:` is empty; add at least one step", at: root)
        }
        let fileName = URL(fileURLWithPath: file).deletingPathExtension().lastPathComponent
        return PipelineDefinition(
            file: file, directory: directory, name: name ?? fileName,
            image: image ?? Located(BaseImages.defaultImage, at: at(root)), env: env, defaults: defaults,
            secrets: secrets, steps: steps)
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
            default: break
            }
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

    mutating func readMatrix(_ node: Node) -> MatrixDefinition? {
        var axes: [(String, [String])] = []
        var include: [[String: String]] = []
        var exclude: [[String: String]] = []
        for (key, keyNode, value) in entries(node, allowed: nil, what: "matrix") {
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
            guard case .sequence(let sequence) = value, !sequence.isEmpty else {
                fail("matrix axis '\(key)' must be a non-empty list of values", at: value)
                continue
            }
            axes.append((key, sequence.compactMap { string($0, what: "a value of \(key)")?.value }))
        }
        let names = Set(axes.map(\.0))
        for ex in exclude {
            for key in ex.keys where !names.contains(key) {
                fail(
                    "exclude names '\(key)', which is not an axis of the matrix (\(names.sorted().joined(separator: ", ")))",
                    at: node)
            }
        }
        let matrix = MatrixDefinition(axes: axes, include: include, exclude: exclude, location: at(node))
        // Expanded only when small: the validator refuses (without expanding) one too large.
        var product = 1
        for axis in axes {
            let (next, overflow) = product.multipliedReportingOverflow(by: axis.1.count)
            product = overflow ? Int.max : next
        }
        if product <= PipelineValidator.maxCombinations && matrix.combinations.isEmpty {
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

/// Names and ids.
enum Identifiers {
    static func isStepID(_ s: String) -> Bool {
        guard let first = s.first, first.isASCII, first.isLetter else { return false }
        return s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-") }
    }

    static func isEnvironmentName(_ s: String) -> Bool {
        guard let first = s.first, first.isASCII, first.isLetter || first == "_" else { return false }
        return s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
    }
}

/// "Did you mean": the closest candidate within a small edit distance.
enum Suggestion {
    static func closest(to word: String, in candidates: [String]) -> String? {
        let scored = candidates.map { ($0, distance(word.lowercased(), $0.lowercased())) }
        guard let best = scored.min(by: { $0.1 < $1.1 }) else { return nil }
        return best.1 <= max(1, min(3, word.count / 3)) ? best.0 : nil
    }

    /// Edit distance counting a swap of neighbours as one edit (optimal string alignment).
    static func distance(_ a: String, _ b: String) -> Int {
        let x = Array(a)
        let y = Array(b)
        if x.isEmpty { return y.count }
        if y.isEmpty { return x.count }
        var d = Array(repeating: Array(repeating: 0, count: y.count + 1), count: x.count + 1)
        for i in 0...x.count { d[i][0] = i }
        for j in 0...y.count { d[0][j] = j }
        for i in 1...x.count {
            for j in 1...y.count {
                let cost = x[i - 1] == y[j - 1] ? 0 : 1
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
                if i > 1, j > 1, x[i - 1] == y[j - 2], x[i - 2] == y[j - 1] {
                    d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
                }
            }
        }
        return d[x.count][y.count]
    }
}

/// Durations and sizes as people write them.
enum Units {
    /// `90`, `1.5`: digits with an optional fraction (no sign, exponent or `inf`), as the
    /// JSON Schema's patterns say.
    static func isDecimal<S: StringProtocol>(_ text: S) -> Bool {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        return (1...2).contains(parts.count)
            && parts.allSatisfy { !$0.isEmpty && $0.allSatisfy { $0.isASCII && $0.isNumber } }
    }

    /// `90` (seconds), or hours, minutes and seconds in that order, each at most once: `90s`,
    /// `10m`, `1h30m`, `1.5h`.
    static func seconds(_ text: String) -> Double? {
        if isDecimal(text) { return Double(text) }
        var rest = Substring(text)
        var total = 0.0
        var sawUnit = false
        for (unit, factor) in [("h", 3600.0), ("m", 60.0), ("s", 1.0)] {
            let digits = rest.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
            guard !digits.isEmpty, rest.dropFirst(digits.count).first == Character(unit) else { continue }
            guard isDecimal(digits), let n = Double(digits) else { return nil }
            total += n * factor
            rest = rest.dropFirst(digits.count + 1)
            sawUnit = true
        }
        return rest.isEmpty && sawUnit ? total : nil
    }

}
