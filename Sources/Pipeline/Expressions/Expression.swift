/// A value an expression produces. Comparisons are loose in the way CI users expect: numbers
/// compare as numbers when both sides are numeric, everything else compares as text.
public enum ExpressionValue: Sendable, Equatable {
    case string(String)
    case number(Double)
    case bool(Bool)
    case null

    public var isTruthy: Bool {
        switch self {
        case .string(let s): return !s.isEmpty
        case .number(let n): return n != 0 && !n.isNaN
        case .bool(let b): return b
        case .null: return false
        }
    }

    /// How the value reads when interpolated into a string.
    public var text: String {
        switch self {
        case .string(let s): return s
        case .number(let n): return n == n.rounded() && abs(n) < 1e15 ? String(Int64(n)) : String(n)
        case .bool(let b): return b ? "true" : "false"
        case .null: return ""
        }
    }

    var number: Double? {
        switch self {
        case .number(let n): return n
        case .string(let s): return Double(s.trimmingWhitespace)
        case .bool(let b): return b ? 1 : 0
        case .null: return 0
        }
    }
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
    public func evaluate(in scope: ExpressionScope) -> ExpressionValue {
        switch self {
        case .literal(let v): return v
        case .reference(let path, _): return scope.resolve(path)
        case .not(let e): return .bool(!e.evaluate(in: scope).isTruthy)
        case .call(let name, let args, _):
            let values = args.map { $0.evaluate(in: scope) }
            switch name {
            case "success", "failure", "always", "cancelled": return .bool(scope.status(name))
            case "contains":
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
                let left = l.evaluate(in: scope)
                return left.isTruthy ? r.evaluate(in: scope) : left
            case "||":
                let left = l.evaluate(in: scope)
                return left.isTruthy ? left : r.evaluate(in: scope)
            default:
                let a = l.evaluate(in: scope)
                let b = r.evaluate(in: scope)
                if let x = a.number, let y = b.number, a.isNumeric || b.isNumeric {
                    return .bool(Expression.compare(op, x, y))
                }
                return .bool(Expression.compare(op, a.text, b.text))
            }
        }
    }
}

extension Expression {
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
