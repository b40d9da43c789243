import Foundation
import Yams

/// Reads a pipeline file into a `PipelineDefinition`, checking every key, type and expression
/// and naming the file, line and column of each problem. All problems are reported at once.
public struct PipelineParser {
    let file: String
    let source: String
    /// The lines of every file read (the pipeline's, then each included one's): a node's mark
    /// is a line in this sequence, which `place` maps back to its file.
    var lines: [Substring]
    /// Each file read and where its lines begin in `lines`.
    var sources: [(file: String, base: Int, count: Int)]
    var errors: [PipelineError] = []
    /// Ids of steps that were rejected (so that references to them are not reported again).
    var brokenSteps: [String] = []
    /// `templates:` by name: step keys that steps take with `extends:`.
    var templates: [String: Node] = [:]

    static let topKeys = [
        "include", "name", "image", "env", "defaults", "secrets", "caches", "services", "templates", "steps",
    ]
    static let defaultsKeys = ["shell", "workdir", "timeout", "retries", "limits", "network", "isolation"]
    static let stepKeys = [
        "id", "run", "shell", "env", "workdir", "from", "needs", "inputs", "artifacts", "matrix", "fork", "select",
        "timeout", "retries", "if", "continue-on-error", "cache", "limits", "network", "isolation", "secrets",
        "caches", "image", "copy", "services", "extends", "reports", "flaky-check", "allow-flaky", "persist",
    ]
    static let reportsKeys = ["junit"]
    /// The most runs `flaky-check` starts at once (each a sandbox).
    static let flakyCheckLimit = 20
    static let variantKeys = ["run", "env", "shell", "workdir", "timeout", "limits"]
    static let selectKeys = ["score", "keep", "order"]
    static let limitsKeys = ["memory", "cpus", "pids"]
    static let retriesKeys = ["max", "when", "backoff"]

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
        let document: Node?
        do {
            document = try Yams.compose(yaml: text)
        } catch let error as YamlError {
            throw PipelineValidationError([parser.convert(error)])
        }
        guard let composed = document else {
            throw PipelineValidationError([
                PipelineError(.invalid, "the file is empty; a pipeline needs at least `steps:`", at: parser.at(nil))
            ])
        }
        // The file lives in `directory`, whatever `file` is relative to (the working directory).
        let main = URL(
            fileURLWithPath: file.hasPrefix("/") ? file : directory + "/" + (file as NSString).lastPathComponent
        )
        .standardizedFileURL.path
        let root = parser.including(composed, path: main, directory: directory, chain: [main])
        if !parser.errors.isEmpty { throw PipelineValidationError(parser.errors) }
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
        self.sources = [(file, 0, lines.count)]
    }

    /// Where a line of `lines` (1-based) is: its file and its line there.
    func place(line: Int, column: Int) -> SourceLocation {
        let source = sources.last { $0.base < line } ?? sources[0]
        return SourceLocation(file: source.file, line: line - source.base, column: column)
    }

    // MARK: Errors and places

    func at(_ node: Node?) -> SourceLocation {
        guard let mark = node?.mark else { return SourceLocation(file: file, line: 1, column: 1) }
        return place(line: mark.line, column: mark.column)
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
                at: place(line: mark.line, column: mark.column))
        case .duplicatedKeysInMapping(let duplicates, let context):
            return PipelineError(
                .invalid,
                "duplicate key \(duplicates.map { "'\($0)'" }.joined(separator: ", ")) in a mapping; each key may appear once",
                at: place(line: context.mark.line, column: context.mark.column))
        default:
            return PipelineError(
                .invalid, "malformed YAML: \(error)", at: SourceLocation(file: file, line: 1, column: 1))
        }
    }

    /// Maps an offset inside a scalar's value to its place in the file.
    func locator(for node: Node) -> (Int) -> SourceLocation {
        // In the lines of every file read; mapped to a file at the end.
        let base = node.mark.map { (line: $0.line, column: $0.column) } ?? (line: 1, column: 1)
        guard case .scalar(let scalar) = node else {
            return { [self] _ in place(line: base.line, column: base.column) }
        }
        let value = scalar.string
        let block = scalar.style == .literal || scalar.style == .folded
        let quoted = scalar.style == .singleQuoted || scalar.style == .doubleQuoted
        var indent = 0
        if block, base.line < lines.count {
            indent = lines[base.line].prefix { $0 == " " }.count
        }
        return { [self] offset in
            let prefix = value.prefix(offset)
            let newlines = prefix.filter { $0 == "\n" }.count
            let sinceNewline = prefix.reversed().prefix { $0 != "\n" }.count
            if block {
                return place(line: base.line + 1 + newlines, column: indent + sinceNewline + 1)
            }
            if newlines == 0 {
                return place(line: base.line, column: base.column + (quoted ? 1 : 0) + sinceNewline)
            }
            return place(line: base.line + newlines, column: sinceNewline + 1)
        }
    }
}
