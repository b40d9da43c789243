import Foundation
import SystemSupport

/// Everything that determines a fork variant's score: the variant's snapshot, and the score
/// command as it runs there (shell, script, env, working directory, isolation). Two pipelines
/// share a score only when all of it is equal.
struct ScoreKeyComponents: Codable, Sendable, Equatable {
    /// Bumped when the meaning of a component changes, so old scores stop matching (format 1
    /// was cut at the first NUL by the database, keeping only the snapshot).
    static let currentFormat = 2

    var format = ScoreKeyComponents.currentFormat
    /// Content digest of the variant's snapshot.
    var image: String
    /// The score command with its shell: `[sh, -e, -c, script]`.
    var command: [String]
    /// `NAME=value`, sorted.
    var env: [String]
    var workdir: String
    var isolation: String

    init(image: String, command: [String], env: [String: String], workdir: String, isolation: String) {
        self.image = image
        self.command = command
        self.env = env.map { "\($0.key)=\($0.value)" }.sorted()
        self.workdir = workdir
        self.isolation = isolation
    }

    /// `score:sha256:…` of the JSON encoding with sorted keys.
    var key: String { "score:" + Digest.ofCanonicalJSON(self).description }
}
