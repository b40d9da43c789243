/// Sizes as people write them: `1048576`, `512k`, `512m`, `2g`, `2GiB`, `1.5g`.
public enum ByteCount {
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
