import Foundation
import Yams

extension PipelineParser {
    /// The pipeline with its `include:` files merged in, as one root: each included file (a path
    /// relative to the file that includes it; it may include others) gives env, defaults,
    /// secrets, caches, services, templates and steps; mappings merge key by key in include
    /// order and the including file's own keys win; steps come in include order, the including
    /// file's last. Each file's nodes keep their places: its text is composed after the lines of
    /// the files read before it, so `place` names the file and line of any error.
    mutating func including(_ root: Node, path: String, directory: String, chain: [String]) -> Node {
        guard case .mapping(let mapping) = root else { return root }
        let pairs = merged(root, what: "the pipeline")
        guard let include = pairs.first(where: { $0.0.string == "include" }) else { return root }
        let names = oneOrMore(include.1, what: "include")
        var parts: [Node] = []
        let here = URL(fileURLWithPath: path).deletingLastPathComponent().path
        for name in names {
            let target = URL(fileURLWithPath: name.value.hasPrefix("/") ? name.value : here + "/" + name.value)
                .standardizedFileURL.path
            if let start = chain.firstIndex(of: target) {
                let cycle = (chain[start...] + [target]).map { PipelineParser.relative($0, to: directory) }
                fail(
                    PipelineError(
                        .invalid, "files include each other in a cycle: \(cycle.joined(separator: " → "))",
                        at: name.location))
                continue
            }
            guard let data = FileManager.default.contents(atPath: target),
                let text = String(data: data, encoding: .utf8)
            else {
                fail(
                    PipelineError(
                        .invalid,
                        "cannot read the included file \(name.value) (\(target)); paths are relative to the file that includes them",
                        at: name.location))
                continue
            }
            // Its lines come after every line read so far: marks in it are unique to it.
            let base = lines.count
            let shown = PipelineParser.relative(target, to: directory)
            let own = text.split(separator: "\n", omittingEmptySubsequences: false)
            sources.append((shown, base, own.count))
            lines += own
            let composed: Node?
            do {
                composed = try Yams.compose(yaml: String(repeating: "\n", count: base) + text)
            } catch let error as YamlError {
                fail(convert(error))
                continue
            } catch {
                fail(PipelineError(.invalid, "\(shown): \(error)", at: name.location))
                continue
            }
            guard let composed, case .mapping = composed else {
                fail(
                    PipelineError(
                        .invalid, "the included file \(name.value) must be a mapping of pipeline keys",
                        at: name.location))
                continue
            }
            parts.append(including(composed, path: target, directory: directory, chain: chain + [target]))
        }
        let own = Node.mapping(
            Node.Mapping(pairs.filter { $0.0.string != "include" }, mapping.tag, mapping.style, mapping.mark))
        return (parts + [own]).dropFirst().reduce(parts.first ?? own) { PipelineParser.combine($0, $1) }
    }

    /// The pipeline at `path` as it is read: includes merged, each step's merge keys and
    /// `extends` applied, `templates` and `x-` keys left out; as YAML. (The file must be valid:
    /// `parse` first.)
    public static func resolvedYAML(file path: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8)
        else {
            throw PipelineValidationError([PipelineError(.invalid, "cannot read the pipeline file \(path)")])
        }
        let absolute = URL(fileURLWithPath: path).standardizedFileURL
        var parser = PipelineParser(file: path, source: text)
        guard let document = try Yams.compose(yaml: text) else { return "" }
        let root = parser.including(
            document, path: absolute.path, directory: absolute.deletingLastPathComponent().path, chain: [absolute.path])
        guard case .mapping(let mapping) = root else { return "" }
        parser.readTemplates(root)
        var pairs: [(Node, Node)] = []
        for (key, value) in parser.merged(root, what: "the pipeline") {
            guard let name = key.string, name != "templates", name != "include", !name.hasPrefix("x-") else { continue }
            if name == "steps", case .sequence(let steps) = value {
                let resolved = steps.enumerated().map { parser.extending($1, what: "step \($0 + 1)") }
                pairs.append((key, .sequence(Node.Sequence(resolved, steps.tag, steps.style, steps.mark))))
            } else {
                pairs.append((key, value))
            }
        }
        return try Yams.serialize(node: .mapping(Node.Mapping(pairs, mapping.tag, mapping.style, mapping.mark)))
    }

    /// Two pipelines' roots as one: `steps` lists joined (`base`'s first), every other key
    /// deep-merged (`over` winning).
    static func combine(_ base: Node, _ over: Node) -> Node {
        guard case .mapping(let a) = base, case .mapping(let b) = over else { return over }
        var pairs: [(Node, Node)] = []
        var taken = Set<String>()
        for (key, value) in a {
            guard let name = key.string, let other = b.first(where: { $0.key.string == name }) else {
                pairs.append((key, value))
                continue
            }
            taken.insert(name)
            if name == "steps", case .sequence(let first) = value, case .sequence(let second) = other.value {
                pairs.append(
                    (key, .sequence(Node.Sequence(Array(first) + Array(second), second.tag, second.style, second.mark)))
                )
            } else {
                pairs.append((other.key, deepMerge(value, other.value)))
            }
        }
        for (key, value) in b where !(key.string.map(taken.contains) ?? false) { pairs.append((key, value)) }
        return .mapping(Node.Mapping(pairs, b.tag, b.style, b.mark))
    }

    /// `path` relative to `directory` when beneath it (as messages show files).
    static func relative(_ path: String, to directory: String) -> String {
        let root = URL(fileURLWithPath: directory).standardizedFileURL.path
        return path.hasPrefix(root + "/") ? String(path.dropFirst(root.count + 1)) : path
    }
}
