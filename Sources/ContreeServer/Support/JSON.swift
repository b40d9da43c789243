import FoundationEssentials
import Glibc

/// A JSON value built by the server for its responses. Keys keep their order, and null is
/// written as null (the clients tell an absent key from a null one).
enum JSON: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object([(String, JSON)])
    /// Already-serialized JSON text, embedded as is.
    case raw(String)

    static func == (a: JSON, b: JSON) -> Bool { a.serialized() == b.serialized() }

    static func int(_ value: Int) -> JSON { .int(Int64(value)) }
    static func optional(_ value: String?) -> JSON { value.map(JSON.string) ?? .null }

    /// The compact UTF-8 text.
    func serialized() -> String {
        var out = ""
        write(to: &out)
        return out
    }

    private func write(to out: inout String) {
        switch self {
        case .null: out += "null"
        case .raw(let text): out += text
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .double(let d):
            if d.isFinite {
                out += d == d.rounded() && abs(d) < 1e15 ? String(Int64(d)) + ".0" : String(d)
            } else {
                out += "null"
            }
        case .string(let s): JSON.quote(s, into: &out)
        case .array(let items):
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += "," }
                item.write(to: &out)
            }
            out += "]"
        case .object(let members):
            out += "{"
            for (i, (key, value)) in members.enumerated() {
                if i > 0 { out += "," }
                JSON.quote(key, into: &out)
                out += ":"
                value.write(to: &out)
            }
            out += "}"
        }
    }

    private static func quote(_ s: String, into out: inout String) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        out += "\""
    }
}

/// Times as the clients parse them: ISO 8601 in UTC with microseconds and an explicit offset.
enum Timestamp {
    static func iso(_ seconds: Double) -> String {
        var whole = time_t(seconds.rounded(.down))
        var micros = Int(((seconds - Double(whole)) * 1e6).rounded())
        if micros >= 1_000_000 {
            whole += 1
            micros -= 1_000_000
        }
        var parts = tm()
        gmtime_r(&whole, &parts)
        func pad(_ v: Int32, _ width: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        let fraction = String(micros)
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2))."
            + String(repeating: "0", count: 6 - fraction.count) + fraction + "+00:00"
    }

    static var now: Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Parses the API's time filters (`since`, `until`): a Unix timestamp, an interval ago
    /// (`600s`, `15m`, `2h`, `3d`, `1w`), or an ISO 8601 date-time (no zone means UTC).
    static func parseFilter(_ raw: String, name: String, now: Double = Timestamp.now) throws -> Double {
        let text = raw.trimmingCharacters(in: .whitespaces)
        if let number = Double(text) { return number }
        if let unit = text.last, let amount = Double(text.dropLast()), amount >= 0 {
            let scale: Double? =
                switch unit {
                case "s": 1
                case "m": 60
                case "h": 3600
                case "d": 86400
                case "w": 604800
                default: nil
                }
            if let scale { return now - amount * scale }
        }
        if let seconds = parseISO(text) { return seconds }
        throw APIError(
            .badRequest,
            "\(name)=\(raw) is not a time: use a Unix timestamp, an interval such as 15m or 2h, or an ISO 8601 date-time"
        )
    }

    /// `YYYY-MM-DD[T| ]HH:MM[:SS[.frac]][Z|±HH:MM|±HHMM]`, or a bare date.
    static func parseISO(_ text: String) -> Double? {
        let chars = Array(text.utf8)
        var i = 0
        func number(_ digits: Int) -> Int? {
            guard i + digits <= chars.count else { return nil }
            var value = 0
            for c in chars[i..<(i + digits)] {
                guard c >= 48 && c <= 57 else { return nil }
                value = value * 10 + Int(c - 48)
            }
            i += digits
            return value
        }
        func expect(_ c: UInt8) -> Bool {
            guard i < chars.count, chars[i] == c else { return false }
            i += 1
            return true
        }
        guard let year = number(4), expect(45), let month = number(2), expect(45), let day = number(2) else {
            return nil
        }
        var hour = 0
        var minute = 0
        var second = 0.0
        var offset = 0
        if i < chars.count {
            guard chars[i] == 84 || chars[i] == 116 || chars[i] == 32 else { return nil }
            i += 1
            guard let h = number(2), expect(58), let m = number(2) else { return nil }
            hour = h
            minute = m
            if expect(58) {
                guard let s = number(2) else { return nil }
                second = Double(s)
                if expect(46) || expect(44) {
                    var scale = 0.1
                    while i < chars.count, chars[i] >= 48 && chars[i] <= 57 {
                        second += Double(chars[i] - 48) * scale
                        scale /= 10
                        i += 1
                    }
                }
            }
            if i < chars.count {
                if chars[i] == 90 || chars[i] == 122 {
                    i += 1
                } else if chars[i] == 43 || chars[i] == 45 || chars[i] == 32 {
                    // A space stands for a '+' that a query string decoded.
                    let sign = chars[i] == 45 ? -1 : 1
                    i += 1
                    guard let oh = number(2) else { return nil }
                    _ = expect(58)
                    let om = number(2) ?? 0
                    offset = sign * (oh * 3600 + om * 60)
                }
            }
            guard i == chars.count else { return nil }
        }
        guard (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61 else {
            return nil
        }
        var parts = tm()
        parts.tm_year = Int32(year - 1900)
        parts.tm_mon = Int32(month - 1)
        parts.tm_mday = Int32(day)
        parts.tm_hour = Int32(hour)
        parts.tm_min = Int32(minute)
        let base = timegm(&parts)
        return Double(base) + second - Double(offset)
    }
}

/// Finds a key that appears twice in one object of a JSON text. JSON parsers disagree on which
/// one counts (Foundation's takes one, a proxy's validator another), so the API refuses such a
/// body rather than guess. Keys compare after their escapes are decoded (`"\u0061"` is `"a"`).
enum JSONDuplicateKeys {
    /// The dotted path of the first duplicated key, or nil (also for malformed text: the
    /// decoder then says what is wrong).
    static func first(in bytes: [UInt8]) -> String? {
        enum Frame {
            case object(keys: Set<[UInt8]>, path: String, expectingKey: Bool, current: String)
            case array(path: String)
        }
        var stack: [Frame] = []
        var i = 0
        func path(_ key: String) -> String {
            guard let top = stack.last else { return key }
            switch top {
            case .object(_, let p, _, _), .array(let p): return p.isEmpty ? key : p + "." + key
            }
        }
        /// Where a value that starts now sits.
        func childPath() -> String {
            switch stack.last {
            case .object(_, _, _, let current)?: return path(current)
            case .array(let p)?: return p
            case nil: return ""
            }
        }
        while i < bytes.count {
            let c = bytes[i]
            switch c {
            case UInt8(ascii: "{"):
                stack.append(.object(keys: [], path: childPath(), expectingKey: true, current: ""))
                i += 1
            case UInt8(ascii: "["):
                stack.append(.array(path: childPath()))
                i += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                guard !stack.isEmpty else { return nil }
                stack.removeLast()
                i += 1
            case UInt8(ascii: ","):
                if case .object(let keys, let p, _, let current)? = stack.last {
                    stack[stack.count - 1] = .object(keys: keys, path: p, expectingKey: true, current: current)
                }
                i += 1
            case UInt8(ascii: "\""):
                guard let (value, end) = string(bytes, from: i) else { return nil }
                i = end
                if case .object(var keys, let p, true, _)? = stack.last {
                    let key = String(decoding: value, as: UTF8.self)
                    guard keys.insert(value).inserted else { return p.isEmpty ? key : p + "." + key }
                    stack[stack.count - 1] = .object(keys: keys, path: p, expectingKey: false, current: key)
                }
            default:
                i += 1
            }
        }
        return nil
    }

    /// A string literal's decoded bytes and the index after its closing quote.
    private static func string(_ bytes: [UInt8], from start: Int) -> ([UInt8], Int)? {
        var out: [UInt8] = []
        var i = start + 1
        var pendingHigh: UInt32?
        while i < bytes.count {
            let c = bytes[i]
            if c == UInt8(ascii: "\"") { return (out, i + 1) }
            guard c == UInt8(ascii: "\\") else {
                out.append(c)
                i += 1
                continue
            }
            guard i + 1 < bytes.count else { return nil }
            let e = bytes[i + 1]
            i += 2
            switch e {
            case UInt8(ascii: "n"): out.append(10)
            case UInt8(ascii: "t"): out.append(9)
            case UInt8(ascii: "r"): out.append(13)
            case UInt8(ascii: "b"): out.append(8)
            case UInt8(ascii: "f"): out.append(12)
            case UInt8(ascii: "u"):
                guard i + 4 <= bytes.count,
                    let unit = UInt32(String(decoding: bytes[i..<(i + 4)], as: UTF8.self), radix: 16)
                else { return nil }
                i += 4
                var scalar = unit
                if (0xd800..<0xdc00).contains(unit) {
                    pendingHigh = unit
                    continue
                }
                if (0xdc00..<0xe000).contains(unit), let high = pendingHigh {
                    scalar = 0x10000 + ((high - 0xd800) << 10) + (unit - 0xdc00)
                }
                pendingHigh = nil
                out += Array(String(Unicode.Scalar(scalar).map(Character.init) ?? "\u{fffd}").utf8)
            default: out.append(e)
            }
        }
        return nil
    }
}
