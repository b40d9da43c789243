import Foundation
import Sandbox
import SystemSupport
import Yams

extension PipelineParser {
    // MARK: Typed readers

    /// The entries of a mapping, refusing keys that are not in `allowed` (with a suggestion).
    /// YAML merge keys are applied: `<<: *anchor` (or a list of them) adds the entries of those
    /// mappings that this one does not set itself, the first mapping of a list winning; their
    /// values keep where they were written (errors point at the anchor's lines).
    /// With `extensions`, keys that begin with `x-` are skipped.
    mutating func entries(
        _ node: Node, allowed: [String]?, what: String, extensions: Bool = false
    ) -> [(key: String, keyNode: Node, value: Node)] {
        guard case .mapping = node else {
            fail("\(what) must be a mapping (key: value), not \(describe(node))", at: node)
            return []
        }
        var result: [(String, Node, Node)] = []
        for (keyNode, value) in merged(node, what: what) {
            guard let key = keyNode.string else {
                fail("keys of \(what) must be strings", at: keyNode)
                continue
            }
            if extensions && key.hasPrefix("x-") { continue }
            if let allowed, !allowed.contains(key) {
                var message = "unknown key '\(key)' in \(what)"
                let suggestion = Suggestion.closest(to: key, in: allowed)
                if let suggestion { message += "; did you mean '\(suggestion)'?" }
                message += " (allowed: \(allowed.joined(separator: ", ")))"
                fail(PipelineError(.invalid, message, at: at(keyNode), problem: .unknownKey(suggestion: suggestion)))
                continue
            }
            result.append((key, keyNode, value))
        }
        return result
    }

    /// A mapping's pairs with its merge keys (`<<`) applied, in order: its own pairs, then the
    /// merged ones it does not override.
    mutating func merged(_ node: Node, what: String, depth: Int = 0) -> [(Node, Node)] {
        guard case .mapping(let mapping) = node else { return [] }
        var own: [(Node, Node)] = []
        var merges: [Node] = []
        for (keyNode, value) in mapping {
            if keyNode.string == "<<" && keyNode.scalar?.style == .plain {
                switch value {
                case .mapping: merges.append(value)
                case .sequence(let list) where list.allSatisfy({ if case .mapping = $0 { true } else { false } }):
                    merges += list
                default:
                    fail(
                        "a merge key (<<) in \(what) takes a mapping or a list of mappings (*anchor), not \(describe(value))",
                        at: value)
                }
            } else {
                own.append((keyNode, value))
            }
        }
        guard depth < 16 else { return own }
        var seen = Set(own.compactMap { $0.0.string })
        for source in merges {
            for (keyNode, value) in merged(source, what: what, depth: depth + 1) {
                guard let key = keyNode.string, !seen.contains(key) else { continue }
                seen.insert(key)
                own.append((keyNode, value))
            }
        }
        return own
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

    /// One value or a list of them (`extends: a` or `extends: [a, b]`).
    mutating func oneOrMore(_ node: Node, what: String) -> [Located<String>] {
        if case .sequence = node { return stringList(node, what: what) }
        return string(node, what: what).map { [$0] } ?? []
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

    /// `network: none | loopback | egress`, or `{mode: egress, host-loopback: true}`.
    mutating func network(_ node: Node) -> NetworkMode? {
        guard case .mapping = node else { return enumeration(node, what: "network", as: NetworkMode.self) }
        var mode: NetworkMode?
        var hostLoopback: (value: Bool, node: Node)?
        var modeSeen = false
        for (key, _, value) in entries(node, allowed: ["mode", "host-loopback"], what: "network") {
            if key == "mode" {
                modeSeen = true
                mode = enumeration(value, what: "network mode", as: NetworkMode.self)
            } else if let flag = bool(value, what: "host-loopback") {
                hostLoopback = (flag, value)
            }
        }
        if !modeSeen { fail("network needs a mode (none, loopback or egress)", at: node) }
        guard let mode, let hostLoopback, hostLoopback.value else { return mode }
        switch mode {
        case .egress, .egressHostLoopback: return .egressHostLoopback
        case .none, .loopback:
            fail("host-loopback needs mode: egress (the host is reached through the NAT uplink)", at: hostLoopback.node)
            return nil
        }
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

    /// `retries: N` or `retries: {max: N, when: [exit:1, timeout, oom], backoff: 2s}`.
    mutating func retryPolicy(_ node: Node) -> RetryPolicy? {
        guard case .mapping = node else {
            return integer(node, what: "retries", minimum: 0).map { RetryPolicy(max: $0) }
        }
        var policy = RetryPolicy(max: 0)
        var sawMax = false
        for (key, _, value) in entries(node, allowed: PipelineParser.retriesKeys, what: "retries") {
            switch key {
            case "max":
                sawMax = true
                policy.max = integer(value, what: "retries.max", minimum: 0) ?? 0
            case "when":
                policy.when = stringList(value, what: "retries.when").compactMap { entry in
                    guard let condition = RetryPolicy.Condition(entry.value) else {
                        fail(
                            PipelineError(
                                .invalid, "retries.when takes exit:N (0 to 255), timeout or oom, not '\(entry.value)'",
                                at: entry.location))
                        return nil
                    }
                    return condition
                }
            default: policy.backoff = duration(value, what: "retries.backoff") ?? 0
            }
        }
        if !sawMax {
            fail("retries needs max: the attempts after the first (retries: {max: 2, when: [...]})", at: node)
        }
        return policy
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
        case "retries": settings.retries = retryPolicy(value)
        case "limits": settings.limits = limits(value, what: "limits")
        case "network":
            settings.network = network(value)
            settings.networkLocation = at(value)
        case "isolation": settings.isolation = enumeration(value, what: "isolation", as: IsolationKind.self)
        case "persist":
            settings.persist = enumeration(value, what: "persist", as: StepSettings.PersistMode.self)
            settings.persistLocation = at(value)
        default: return false
        }
        return true
    }
}
