/// Counts in messages: "1 step", "2 steps", "1 entry", "3 entries".
public enum Plural {
    /// `n` and the noun, plural unless `n` is 1 (`plural` when the noun does not take an s).
    public static func count(_ n: Int, _ noun: String, plural: String? = nil) -> String {
        "\(n) " + (n == 1 ? noun : plural ?? noun + "s")
    }
}
