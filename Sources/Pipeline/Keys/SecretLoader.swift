import Foundation

/// Reads secrets on the host, the same way for `run` and `explain`: from an environment
/// variable, or from a file (relative to the pipeline) without its trailing newlines.
enum SecretLoader {
    static func load(
        _ secrets: [SecretDefinition], directory: String, environment: [String: String]
    )
        -> (values: [String: String], problems: [PipelineError])
    {
        var values: [String: String] = [:]
        var problems: [PipelineError] = []
        for secret in secrets {
            switch secret.source {
            case .environment(let variable):
                if let value = environment[variable] {
                    values[secret.name.value] = value
                } else {
                    problems.append(
                        PipelineError(
                            .invalid, "secret \(secret.name.value): the host variable \(variable) is not set",
                            at: secret.name.location))
                }
            case .file(let path):
                let absolute = path.hasPrefix("/") ? path : directory + "/" + path
                if let data = FileManager.default.contents(atPath: absolute) {
                    var text = String(decoding: data, as: UTF8.self)
                    while text.hasSuffix("\n") || text.hasSuffix("\r") { text.removeLast() }
                    values[secret.name.value] = text
                } else {
                    problems.append(
                        PipelineError(
                            .invalid, "secret \(secret.name.value): cannot read \(absolute)", at: secret.name.location))
                }
            }
        }
        return (values, problems)
    }
}
