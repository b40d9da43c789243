/// Hides secret values in text: each value whole and, for a value of several lines (a PEM
/// key, a kubeconfig), each of its lines too, because logs and outputs are handled a line at a
/// time and a line of a key is as secret as the key.
struct SecretMask: Sendable {
    /// What is replaced, longest first (so that no shorter pattern cuts a longer one), with the
    /// name of the secret it comes from.
    private let patterns: [(text: String, secret: String)]

    /// Shorter values (and lines) are left alone: masking `a` or `ok` would wreck every log
    /// and hide nothing worth hiding.
    static let shortest = 3

    init(_ secrets: [String: String]) {
        var patterns: [String: String] = [:]
        for (name, value) in secrets.sorted(by: { $0.key < $1.key }) {
            var pieces = [value]
            if value.contains(where: \.isNewline) {
                pieces += value.split(whereSeparator: \.isNewline).map { String($0).trimmingWhitespace }
            }
            for piece in pieces where piece.count >= SecretMask.shortest && patterns[piece] == nil {
                patterns[piece] = name
            }
        }
        self.patterns = patterns.map { ($0.key, $0.value) }.sorted { $0.text.count > $1.text.count }
    }

    /// `text` with every secret (and every line of a multi-line one) replaced by `***`.
    func callAsFunction(_ text: String) -> String {
        var masked = text
        for pattern in patterns where masked.contains(pattern.text) {
            masked = masked.replacing(pattern.text, with: "***")
        }
        return masked
    }

    /// The name of a secret `text` holds (whole, or a line of it), if any.
    func secret(in text: String) -> String? {
        patterns.first { text.contains($0.text) }?.secret
    }
}
