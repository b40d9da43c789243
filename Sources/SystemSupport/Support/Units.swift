/// Durations as people write them: pipeline timeouts and the CLI's ages.
package enum Units {
    /// `90`, `1.5`: digits with an optional fraction (no sign, exponent or `inf`), as the
    /// JSON Schema's patterns say.
    package static func isDecimal<S: StringProtocol>(_ text: S) -> Bool {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        return (1...2).contains(parts.count)
            && parts.allSatisfy { !$0.isEmpty && $0.allSatisfy { $0.isASCII && $0.isNumber } }
    }

    /// `90` (seconds), or hours, minutes and seconds in that order, each at most once: `90s`,
    /// `10m`, `1h30m`, `1.5h`; with `days`, weeks and days before them too (`2w`, `7d`, `1d12h`).
    package static func seconds(_ text: String, days: Bool = false) -> Double? {
        if isDecimal(text) { return Double(text) }
        var rest = Substring(text)
        var total = 0.0
        var sawUnit = false
        let clock = [("h", 3600.0), ("m", 60.0), ("s", 1.0)]
        for (unit, factor) in (days ? [("w", 604_800.0), ("d", 86_400.0)] : []) + clock {
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
