import Foundation
import Sandbox
import SystemSupport

/// What can only be checked on this host, before anything runs: every input matches files
/// beneath the pipeline's directory, every secret a step uses has its source, each step's
/// isolation is available, a local image path may be read. `run` checks it (then resolves the
/// image); `validate` checks it and runs nothing.
public struct Preflight: Sendable {
    public let definition: PipelineDefinition
    /// The host environment secrets are read from.
    public var environment: [String: String]
    /// As `--allow-host-paths`: secret files and local image paths may lie anywhere.
    public var allowHostPaths: Bool
    /// The isolation kinds this build can run.
    public var isolations: Set<IsolationKind>

    public init(
        _ definition: PipelineDefinition, environment: [String: String] = ProcessInfo.processInfo.environment,
        allowHostPaths: Bool = false, isolations: Set<IsolationKind> = Set(IsolationKind.allCases)
    ) {
        self.definition = definition
        self.environment = environment
        self.allowHostPaths = allowHostPaths
        self.isolations = isolations
    }

    /// The secrets the steps use, read, and every problem found (each naming its line).
    public func check() -> (secrets: [String: String], problems: [PipelineError]) {
        var problems: [PipelineError] = []
        for step in definition.steps {
            // A pattern with matrix values is checked for each instance as it runs.
            for input in step.inputs where input.matrixNames.isEmpty {
                do {
                    _ = try InputResolver.resolve(input, directory: definition.directory, workdir: "/")
                } catch let error as PipelineError {
                    problems.append(error)
                } catch {
                    problems.append(PipelineError(.invalid, "\(error)", at: step.location, cause: error))
                }
            }
            let settings = step.settings.over(definition.defaults)
            let isolation = settings.isolation ?? .container
            if !isolations.contains(isolation) {
                problems.append(
                    PipelineError(
                        .invalid, "isolation: \(isolation.rawValue) is not available in this build; use container",
                        at: step.location))
            }
            let egress = settings.network?.isEgress == true
            if egress && ChildProcess.lookup("pasta") == nil {
                problems.append(
                    PipelineError(
                        .invalid,
                        "step \(step.id.value) asks for network egress, which needs pasta, and it is not installed: install Debian's passt package (apt-get install passt; scripts/setup does)",
                        at: settings.networkLocation ?? step.location))
            }
            if settings.persist == .memory
                && (isolation != .vm || !step.services.isEmpty || !step.caches.isEmpty || egress)
            {
                problems.append(
                    PipelineError(
                        .invalid,
                        isolation != .vm
                            ? "step \(step.id.value) has persist: memory, which needs isolation: vm (this host's CRIU cannot checkpoint a container); add isolation: vm to it"
                            : "step \(step.id.value) has persist: memory with services, caches or egress, which a memory snapshot cannot hold yet; drop them from it",
                        at: settings.persistLocation ?? step.location))
            }
            if isolation == .vm && !step.services.isEmpty {
                problems.append(
                    PipelineError(
                        .invalid,
                        "step \(step.id.value) is a VM step with services, which VM steps do not have yet; use isolation: container for it",
                        at: step.location))
            }
        }
        let used = Set(definition.steps.flatMap { $0.secrets.map(\.value) })
        let hostPaths = definition.hostPaths(allowingAnywhere: allowHostPaths)
        let (secrets, secretProblems) = SecretLoader.load(
            definition.secrets.filter { used.contains($0.name.value) }, directory: definition.directory,
            hostPaths: hostPaths, environment: environment)
        problems += secretProblems
        do {
            _ = try definition.imageReference(hostPaths: hostPaths)
        } catch let error as PipelineValidationError {
            problems += error.errors
        } catch {
            problems.append(PipelineError(.invalid, "\(error)", at: definition.image.location, cause: error))
        }
        return (secrets, problems)
    }
}
