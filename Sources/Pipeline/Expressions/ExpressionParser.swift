/// Parses the expression language of `${{ }}` and `if:`.
///
/// ```
/// expr    := or
/// or      := and ('||' and)*
/// and     := eq ('&&' eq)*
/// eq      := cmp (('==' | '!=') cmp)*
/// cmp     := unary (('<' | '<=' | '>' | '>=') unary)*
/// unary   := '!' unary | primary
/// primary := 'string' | number | true | false | null | '(' expr ')'
///          | name '(' args ')' | name ('.' name | '[' 'string' ']')*
/// ```
struct ExpressionParser {
    static let functions: [String: ClosedRange<Int>] = [
        "success": 0...0, "failure": 0...0, "always": 0...0, "cancelled": 0...0,
        "contains": 2...2, "startsWith": 2...2, "endsWith": 2...2, "format": 1...20,
        "fromJSON": 1...1, "toJSON": 1...1, "join": 1...2,
    ]

    private let text: [Character]
    private var position = 0
    /// Maps an offset in the text to a place in the file.
    private let locate: (Int) -> SourceLocation

    init(_ text: String, locate: @escaping (Int) -> SourceLocation) {
        self.text = Array(text)
        self.locate = locate
    }

    /// Parses `text` as one whole expression.
    static func parse(_ text: String, locate: @escaping (Int) -> SourceLocation) throws -> Expression {
        var parser = ExpressionParser(text, locate: locate)
        parser.skipSpace()
        guard parser.position < parser.text.count else {
            throw PipelineError(.invalid, "empty expression", at: locate(0))
        }
        let expression = try parser.parseOr()
        parser.skipSpace()
        if parser.position < parser.text.count {
            throw parser.error("unexpected '\(parser.text[parser.position])' in expression")
        }
        return expression
    }

    private func error(_ message: String, at offset: Int? = nil) -> PipelineError {
        PipelineError(.invalid, message, at: locate(offset ?? position))
    }

    private mutating func skipSpace() {
        while position < text.count && text[position].isWhitespace { position += 1 }
    }

    private mutating func consume(_ token: String) -> Bool {
        skipSpace()
        let chars = Array(token)
        guard position + chars.count <= text.count, Array(text[position..<(position + chars.count)]) == chars else {
            return false
        }
        // "<" must not eat the start of "<="
        if chars.count == 1, "<>=!".contains(chars[0]), position + 1 < text.count, text[position + 1] == "=" {
            return false
        }
        position += chars.count
        return true
    }

    private mutating func parseOr() throws -> Expression {
        var left = try parseAnd()
        while consume("||") { left = .binary("||", left, try parseAnd()) }
        return left
    }

    private mutating func parseAnd() throws -> Expression {
        var left = try parseEquality()
        while consume("&&") { left = .binary("&&", left, try parseEquality()) }
        return left
    }

    private mutating func parseEquality() throws -> Expression {
        var left = try parseComparison()
        while true {
            if consume("==") {
                left = .binary("==", left, try parseComparison())
            } else if consume("!=") {
                left = .binary("!=", left, try parseComparison())
            } else {
                return left
            }
        }
    }

    private mutating func parseComparison() throws -> Expression {
        var left = try parseUnary()
        while true {
            var matched: String?
            for op in ["<=", ">=", "<", ">"] where consume(op) {
                matched = op
                break
            }
            guard let op = matched else { return left }
            left = .binary(op, left, try parseUnary())
        }
    }

    private mutating func parseUnary() throws -> Expression {
        if consume("!") { return .not(try parseUnary()) }
        return try parsePrimary()
    }

    private mutating func parsePrimary() throws -> Expression {
        skipSpace()
        guard position < text.count else { throw error("the expression ends too early") }
        let start = position
        let c = text[position]
        if c == "(" {
            position += 1
            let inner = try parseOr()
            guard consume(")") else { throw error("missing ')'") }
            return inner
        }
        if c == "'" { return .literal(.string(try parseString())) }
        if c.isNumber || (c == "-" && position + 1 < text.count && text[position + 1].isNumber) {
            position += 1
            while position < text.count && (text[position].isNumber || text[position] == ".") { position += 1 }
            guard let n = Double(String(text[start..<position])) else { throw error("malformed number", at: start) }
            return .literal(.number(n))
        }
        if c == "\"" {
            throw error("strings in expressions use single quotes: 'text'")
        }
        guard c.isLetter || c == "_" else { throw error("unexpected '\(c)' in expression") }
        let name = parseName()
        switch name {
        case "true": return .literal(.bool(true))
        case "false": return .literal(.bool(false))
        case "null": return .literal(.null)
        default: break
        }
        if consume("(") {
            guard let arity = ExpressionParser.functions[name] else {
                throw error(
                    "unknown function '\(name)'; the functions are \(ExpressionParser.functions.keys.sorted().joined(separator: ", "))",
                    at: start)
            }
            var args: [Expression] = []
            if !consume(")") {
                repeat { args.append(try parseOr()) } while consume(",")
                guard consume(")") else { throw error("missing ')' after the arguments of \(name)") }
            }
            guard arity.contains(args.count) else {
                throw error(
                    "\(name) takes \(arity.lowerBound == arity.upperBound ? "\(arity.lowerBound)" : "\(arity.lowerBound) to \(arity.upperBound)") argument\(arity.upperBound == 1 ? "" : "s"), got \(args.count)",
                    at: start)
            }
            return .call(name, args, locate(start))
        }
        var path = [name]
        while true {
            if consume(".") {
                skipSpace()
                guard position < text.count, text[position].isLetter || text[position] == "_" else {
                    throw error("a name must follow '.'")
                }
                path.append(parseName())
            } else if consume("[") {
                skipSpace()
                guard position < text.count, text[position] == "'" else { throw error("expected 'name' inside [ ]") }
                path.append(try parseString())
                guard consume("]") else { throw error("missing ']'") }
            } else {
                break
            }
        }
        return .reference(path, locate(start))
    }

    private mutating func parseName() -> String {
        let start = position
        while position < text.count,
            text[position].isLetter || text[position].isNumber || text[position] == "_" || text[position] == "-"
        {
            position += 1
        }
        return String(text[start..<position])
    }

    private mutating func parseString() throws -> String {
        let start = position
        position += 1
        var value = ""
        while position < text.count {
            if text[position] == "'" {
                if position + 1 < text.count && text[position + 1] == "'" {
                    value.append("'")
                    position += 2
                    continue
                }
                position += 1
                return value
            }
            value.append(text[position])
            position += 1
        }
        throw error("unterminated string", at: start)
    }
}

/// A string with `${{ expression }}` parts.
public struct Template: Sendable {
    public enum Part: Sendable {
        case text(String)
        case expression(Expression, SourceLocation)
    }

    public var parts: [Part]
    public var location: SourceLocation

    public var isLiteral: Bool { parts.allSatisfy { if case .text = $0 { return true } else { return false } } }
    public var expressions: [Expression] {
        parts.compactMap { if case .expression(let e, _) = $0 { return e } else { return nil } }
    }

    /// The text itself when it has no expressions.
    public var literal: String? {
        guard isLiteral else { return nil }
        return parts.map { if case .text(let t) = $0 { return t } else { return "" } }.joined()
    }

    public init(literal: String, at location: SourceLocation) {
        self.parts = [.text(literal)]
        self.location = location
    }

    /// Parses `source`; `locate` maps an offset in it to a place in the file.
    public static func parse(
        _ source: String, at location: SourceLocation, locate: @escaping (Int) -> SourceLocation
    )
        throws -> Template
    {
        let chars = Array(source)
        var parts: [Part] = []
        var literal = ""
        var i = 0
        while i < chars.count {
            if chars[i] == "$", i + 2 < chars.count, chars[i + 1] == "{", chars[i + 2] == "{" {
                var j = i + 3
                var closed = false
                while j + 1 < chars.count {
                    if chars[j] == "}" && chars[j + 1] == "}" {
                        closed = true
                        break
                    }
                    j += 1
                }
                guard closed else {
                    throw PipelineError(.invalid, "'${{' is not closed with '}}'", at: locate(i))
                }
                if !literal.isEmpty { parts.append(.text(literal)) }
                literal = ""
                let inner = String(chars[(i + 3)..<j])
                let offset = i + 3
                let expression = try ExpressionParser.parse(inner) { locate(offset + $0) }
                parts.append(.expression(expression, locate(i)))
                i = j + 2
                continue
            }
            literal.append(chars[i])
            i += 1
        }
        if !literal.isEmpty || parts.isEmpty { parts.append(.text(literal)) }
        return Template(parts: parts, location: location)
    }

    init(parts: [Part], location: SourceLocation) {
        self.parts = parts
        self.location = location
    }

    /// The text with every expression replaced by its value.
    public func render(in scope: ExpressionScope) -> String {
        parts.map { part in
            switch part {
            case .text(let t): return t
            case .expression(let e, _): return e.evaluate(in: scope).text
            }
        }.joined()
    }
}
