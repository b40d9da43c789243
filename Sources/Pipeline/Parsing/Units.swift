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
