/// Sizes as people write them: `1048576`, `512k`, `512m`, `2g`, `2GiB`, `1.5g`.
public enum ByteCount {
    /// `512 B`, `1.5 KiB`, `3.2 MiB`, `1.25 GiB`.
    public static func format(_ n: Int64) -> String {
        func fixed(_ value: Double, _ digits: Int) -> String {
            let scale = digits == 1 ? 10 : 100
            let scaled = Int((value * Double(scale)).rounded())
            let fraction = String(scaled % scale)
            return "\(scaled / scale)." + String(repeating: "0", count: digits - fraction.count) + fraction
        }
        if n < 1024 { return "\(n) B" }
        if n < 1 << 20 { return fixed(Double(n) / 1024, 1) + " KiB" }
        if n < 1 << 30 { return fixed(Double(n) / 1_048_576, 1) + " MiB" }
        return fixed(Double(n) / 1_073_741_824, 2) + " GiB"
    }

    public static func parse(_ text: String) -> Int64? {
        let lower = text.lowercased().filter { !$0.isWhitespace }
        let digits = lower.prefix { $0.isNumber || $0 == "." }
        guard let value = Double(digits) else { return nil }
        let suffix = String(lower.dropFirst(digits.count)).replacing("ib", with: "").replacing("b", with: "")
        let scale: Double
        switch suffix {
        case "": scale = 1
        case "k": scale = 1024
        case "m": scale = 1_048_576
        case "g": scale = 1_073_741_824
        case "t": scale = 1_099_511_627_776
        default: return nil
        }
        return Int64(value * scale)
    }
}
