import Foundation

/// A value an expression produces. Comparisons are loose in the way CI users expect: numbers
/// compare as numbers when both sides are numeric, everything else compares as text.
public enum ExpressionValue: Sendable, Equatable {
    case string(String)
    case number(Double)
    case bool(Bool)
    case null
    /// What `fromJSON` makes of a JSON list or object.
    case array([ExpressionValue])
    case object([String: ExpressionValue])

    public var isTruthy: Bool {
        switch self {
        case .string(let s): return !s.isEmpty
        case .number(let n): return n != 0 && !n.isNaN
        case .bool(let b): return b
        case .null: return false
        case .array, .object: return true
        }
    }

    /// How the value reads when interpolated into a string (lists and objects as JSON).
    public var text: String {
        switch self {
        case .string(let s): return s
        case .number(let n): return n == n.rounded() && abs(n) < 1e15 ? String(Int64(n)) : String(n)
        case .bool(let b): return b ? "true" : "false"
        case .null: return ""
        case .array, .object: return json
        }
    }

    /// The value as JSON (`toJSON`): object keys sorted, so equal values read the same.
    public var json: String {
        switch self {
        case .string(let s):
            let encoder = JSONEncoder()
            encoder.outputFormatting = .withoutEscapingSlashes
            return (try? encoder.encode(s)).flatMap { String(data: $0, encoding: .utf8) } ?? "\"\""
        case .number, .bool: return text
        case .null: return "null"
        case .array(let items): return "[" + items.map(\.json).joined(separator: ",") + "]"
        case .object(let fields):
            return "{"
                + fields.keys.sorted().map { ExpressionValue.string($0).json + ":" + fields[$0]!.json }
                .joined(separator: ",") + "}"
        }
    }

    var number: Double? {
        switch self {
        case .number(let n): return n
        case .string(let s): return Double(s.trimmingWhitespace)
        case .bool(let b): return b ? 1 : 0
        case .null: return 0
        case .array, .object: return nil
        }
    }

    /// Reads JSON text. - Throws: the decoder's complaint when it is not JSON.
    static func fromJSON(_ text: String) throws -> ExpressionValue {
        try JSONDecoder().decode(JSONValue.self, from: Data(text.utf8)).value
    }

    /// Decodes any JSON value; a number stays a number and `true` stays a boolean.
    private struct JSONValue: Decodable {
        var value: ExpressionValue
        init(from decoder: Decoder) throws {
            if let container = try? decoder.container(keyedBy: AnyKey.self) {
                var fields: [String: ExpressionValue] = [:]
                for key in container.allKeys {
                    fields[key.stringValue] = try container.decode(JSONValue.self, forKey: key).value
                }
                value = .object(fields)
            } else if var container = try? decoder.unkeyedContainer() {
                var items: [ExpressionValue] = []
                while !container.isAtEnd { items.append(try container.decode(JSONValue.self).value) }
                value = .array(items)
            } else {
                let container = try decoder.singleValueContainer()
                if container.decodeNil() {
                    value = .null
                } else if let bool = try? container.decode(Bool.self) {
                    value = .bool(bool)
                } else if let number = try? container.decode(Double.self) {
                    value = .number(number)
                } else {
                    value = .string(try container.decode(String.self))
                }
            }
        }
    }

    private struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }
}

/// An expression that cannot be evaluated where a wrong value must not pass silently (a
/// dynamic matrix): `fromJSON` of text that is not JSON.
public struct ExpressionFailure: Error, Sendable {
    public var message: String
}

/// A parsed `${{ }}` or `if:` expression.
public indirect enum Expression: Sendable {
    case literal(ExpressionValue)
    /// A dotted path such as `steps.build.outputs.version` or `matrix.cc`.
    case reference([String], SourceLocation)
    case call(String, [Expression], SourceLocation)
    case not(Expression)
    case binary(String, Expression, Expression)

    /// Every reference in the expression (for validation).
    public var references: [([String], SourceLocation)] {
        switch self {
        case .literal: return []
        case .reference(let path, let location): return [(path, location)]
        case .call(_, let args, _): return args.flatMap(\.references)
        case .not(let e): return e.references
        case .binary(_, let l, let r): return l.references + r.references
        }
    }

    /// Every function called (for validation and to tell status checks apart).
    public var calls: [(String, SourceLocation)] {
        switch self {
        case .literal, .reference: return []
        case .call(let name, let args, let location): return [(name, location)] + args.flatMap(\.calls)
        case .not(let e): return e.calls
        case .binary(_, let l, let r): return l.calls + r.calls
        }
    }
}

/// What references and status functions resolve to when an expression is evaluated.
public protocol ExpressionScope {
    func resolve(_ path: [String]) -> ExpressionValue
    /// `success()`, `failure()`, `always()`, `cancelled()`.
    func status(_ function: String) -> Bool
}

extension Expression {
    /// The value, where text that is not JSON makes `fromJSON` null.
    public func evaluate(in scope: ExpressionScope) -> ExpressionValue {
        (try? evaluate(in: scope, strict: false)) ?? .null
    }

    /// The value. - Throws: `ExpressionFailure` when `strict` and `fromJSON` reads text that is
    /// not JSON (naming the step output it read).
    public func evaluate(in scope: ExpressionScope, strict: Bool) throws -> ExpressionValue {
        switch self {
        case .literal(let v): return v
        case .reference(let path, _): return scope.resolve(path)
        case .not(let e): return .bool(!(try e.evaluate(in: scope, strict: strict)).isTruthy)
        case .call(let name, let args, _):
            let values = try args.map { try $0.evaluate(in: scope, strict: strict) }
            switch name {
            case "success", "failure", "always", "cancelled": return .bool(scope.status(name))
            case "fromJSON":
                do {
                    return try ExpressionValue.fromJSON(values[0].text)
                } catch {
                    guard strict else { return .null }
                    let text = values[0].text
                    throw ExpressionFailure(
                        message: "fromJSON: \(Expression.describe(args[0])) is not JSON: \(Expression.reason(error)); "
                            + (text.isEmpty
                                ? "it is empty (did the step write it to $CONTREE_OUTPUT?)"
                                : "it begins: \(text.prefix(60).debugDescription)"))
                }
            case "toJSON": return .string(values[0].json)
            case "join":
                let separator = values.count > 1 ? values[1].text : ","
                guard case .array(let items) = values[0] else { return .string(values[0].text) }
                return .string(items.map(\.text).joined(separator: separator))
            case "contains":
                if case .array(let items) = values[0] {
                    return .bool(items.contains { $0.text.lowercased() == values[1].text.lowercased() })
                }
                return .bool(values[0].text.lowercased().contains(values[1].text.lowercased()))
            case "startsWith": return .bool(values[0].text.lowercased().hasPrefix(values[1].text.lowercased()))
            case "endsWith": return .bool(values[0].text.lowercased().hasSuffix(values[1].text.lowercased()))
            case "format":
                var text = values[0].text
                for (i, v) in values.dropFirst().enumerated() { text = text.replacing("{\(i)}", with: v.text) }
                return .string(text)
            default: return .null
            }
        case .binary(let op, let l, let r):
            switch op {
            case "&&":
                let left = try l.evaluate(in: scope, strict: strict)
                return left.isTruthy ? try r.evaluate(in: scope, strict: strict) : left
            case "||":
                let left = try l.evaluate(in: scope, strict: strict)
                return left.isTruthy ? left : try r.evaluate(in: scope, strict: strict)
            default:
                let a = try l.evaluate(in: scope, strict: strict)
                let b = try r.evaluate(in: scope, strict: strict)
                if let x = a.number, let y = b.number, a.isNumeric || b.isNumeric {
                    return .bool(Expression.compare(op, x, y))
                }
                return .bool(Expression.compare(op, a.text, b.text))
            }
        }
    }
}

extension Expression {
    /// What an argument reads, for messages: `output pkgs of step discover`.
    static func describe(_ argument: Expression) -> String {
        if case .reference(let path, _) = argument {
            if path.count == 4 && path[0] == "steps" && path[2] == "outputs" {
                return "output \(path[3]) of step \(path[1])"
            }
            return path.joined(separator: ".")
        }
        return "its argument"
    }

    /// A decoder's complaint in a few words.
    static func reason(_ error: Error) -> String {
        if case DecodingError.dataCorrupted(let context) = error {
            let underlying = (context.underlyingError as NSError?)?.userInfo[NSDebugDescriptionErrorKey] as? String
            return underlying ?? context.debugDescription
        }
        return "\(error)"
    }

    static func compare<T: Comparable>(_ op: String, _ x: T, _ y: T) -> Bool {
        switch op {
        case "==": return x == y
        case "!=": return x != y
        case "<": return x < y
        case "<=": return x <= y
        case ">": return x > y
        default: return x >= y
        }
    }
}

extension ExpressionValue {
    fileprivate var isNumeric: Bool {
        switch self {
        case .number: return true
        case .string(let s): return Double(s.trimmingWhitespace) != nil
        default: return false
        }
    }
}

extension String {
    var trimmingWhitespace: String {
        String(drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
    }
}
