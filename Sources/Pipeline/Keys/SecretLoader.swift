import Foundation
import Glibc
import SystemSupport

/// Reads secrets on the host, the same way for `run` and `explain`: from an environment
/// variable, or from a file (relative to the pipeline, and beneath its directory unless the
/// run allows any host path) without its trailing newlines.
enum SecretLoader {
    static func load(
        _ secrets: [SecretDefinition], directory: String, hostPaths: HostPaths, environment: [String: String]
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
                do {
                    let fd = try hostPaths.open(
                        hostPaths.absolute(path, directory: directory), what: "secret \(secret.name.value)")
                    defer { close(fd) }
                    var text = String(decoding: try FileSystem.readAll(fd: fd, path: path), as: UTF8.self)
                    while text.hasSuffix("\n") || text.hasSuffix("\r") { text.removeLast() }
                    values[secret.name.value] = text
                } catch let error as SandboxError {
                    problems.append(PipelineError(.invalid, error.description, at: secret.name.location))
                } catch {
                    problems.append(
                        PipelineError(
                            .invalid, "secret \(secret.name.value): \(error)", at: secret.name.location, cause: error))
                }
            }
        }
        return (values, problems)
    }
}
