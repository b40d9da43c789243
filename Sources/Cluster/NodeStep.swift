import Foundation
import Glibc
import ImageStore
import Pipeline
import Registry
import RegistryCache
import Sandbox
import SystemSupport

/// `contree-pipeline step --spec -` on a cluster node: reads the step's `StepSpec` from stdin,
/// imports the layers this node's store lacks, runs the step (with its retries) on this
/// machine's engine, pushes its snapshot (`step-<key>`, write-once, or `failed-<key>` for
/// `shell`), and tells the coordinator on stdout. The step's output and the node's own words
/// go to stderr. Exit status: the step's, or 75 when the machinery failed (the registry, the
/// store, a version mismatch, no root), with a line on stderr that says what to do.
public enum NodeStep {
    public static let infrastructureStatus: Int32 = 75
    /// Begins the line on stderr that explains an exit 75.
    public static let messagePrefix = "contree-pipeline step: "

    /// Runs the spec in `input`; returns the exit status. Cancelling the calling task (SIGTERM
    /// from `scancel`) stops the step.
    public static func run(
        input: [UInt8], version: String, openStore: () throws -> Store, engine makeEngine: (Store) -> SandboxEngine
    ) async -> Int32 {
        let environment = ProcessInfo.processInfo.environment
        let host = environment["SLURMD_NODENAME"] ?? hostName()
        // First: where it runs and as which job (so a refusal below names this node, and the
        // coordinator can leave it out of the next dispatch).
        emit(StepFrame(event: .started, host: host, job: environment["SLURM_JOB_ID"]))
        Trace.mark("step: started")
        let spec: StepSpec
        do {
            spec = try StepFrame.decoder.decode(StepSpec.self, from: Data(input))
        } catch {
            let other = (try? JSONSerialization.jsonObject(with: Data(input)) as? [String: Any])?["version"] as? String
            return fail(
                "the step spec on stdin could not be read (\(error)); node \(host) runs contree-pipeline \(version)"
                    + (other.map { ", the coordinator \($0)" } ?? "") + ": install the same version on every node")
        }
        guard spec.version == version else {
            return fail(
                "node \(host) runs contree-pipeline \(version), the coordinator \(spec.version): install the same version on every node"
            )
        }
        guard geteuid() == 0 else {
            return fail(
                "node \(host) runs steps as uid \(geteuid()); sandboxes need root: run the step command as root (or through sudo -n) on every node"
            )
        }
        let store: Store
        do {
            store = try openStore()
        } catch {
            return fail("the store on node \(host) could not be opened: \(error)")
        }
        let credentials = spec.registryUser.map {
            RegistryCredentials(username: $0, password: spec.registryPassword ?? "")
        }
        // A cancelled import (scancel) stops its downloads and removes what it made.
        let cancellation = Cancellation()
        let cache: RegistryStepCache
        let parent: ImageRecord
        let inputs: ImageRecord?
        do {
            // One repository for the imports and the push: the blobs the parent brought are
            // known to be there, so the push asks only about the step's own layer.
            cache = try RegistryStepCache(
                spec.registry, store: store, credentials: credentials, allowHTTP: spec.allowHTTP, pushing: true)
            (parent, inputs) = try await withTaskCancellationHandler {
                try await BlockingPool.shared.run {
                    func fetch(_ reference: String) throws -> ImageRecord {
                        guard reference.hasPrefix(spec.registry), reference.count > spec.registry.count + 1 else {
                            throw SandboxError(.invalidArgument, "\(reference) is not in \(spec.registry)")
                        }
                        guard
                            let imported = try cache.repository.importImage(
                                reference: String(reference.dropFirst(spec.registry.count + 1)),
                                cancellation: cancellation)
                        else {
                            throw SandboxError(.notFound, "\(reference) is not in the registry")
                        }
                        return imported.image
                    }
                    return (try fetch(spec.parent), try spec.inputs.map(fetch))
                }
            } onCancel: {
                cancellation.cancel("cancelled on node \(host)")
            }
        } catch {
            if Task.isCancelled {
                emit(StepFrame(event: .finished, host: host, message: "cancelled on node \(host)", cancelled: true))
                return 143
            }
            return fail("node \(host) could not fetch the step's snapshot from \(spec.registry): \(error)")
        }
        Trace.mark("step: parent and inputs imported")
        // The inputs' layer stays while the step maps files from it.
        let lease: Lease?
        do {
            lease = try inputs.map { try store.acquireLease(layers: $0.layers) }
        } catch {
            return fail("the store on node \(host) could not hold the inputs: \(error)")
        }
        defer { lease?.release() }
        let request = spec.request(parent: parent.uuid, inputRoot: inputs?.layers.first.map(store.layerPath))
        let log = StepLog(fileDescriptor: 2, secrets: spec.secrets)
        let outcome: StepOutcome
        do {
            outcome = try await EngineStepExecutor(engine: makeEngine(store)).run(request, log: log)
            log.close()
        } catch is CancellationError {
            log.close()
            emit(StepFrame(event: .finished, host: host, message: "cancelled on node \(host)", cancelled: true))
            return 143
        } catch {
            log.close()
            let message = (error as? PipelineError)?.message ?? "\(error)"
            emit(StepFrame(event: .finished, host: host, message: message))
            return 1
        }
        Trace.mark("step: ran")
        var result: String?
        if let uuid = outcome.record.resultImage {
            do {
                result = try await BlockingPool.shared.run {
                    try publish(uuid, outcome: outcome, spec: spec, store: store, cache: cache)
                }
            } catch {
                return fail(
                    "step \(spec.node) ran on node \(host) but its snapshot could not be pushed to \(spec.registry): \(error)"
                )
            }
        }
        Trace.mark("step: pushed")
        emit(
            StepFrame(
                event: .finished, host: host, record: outcome.record,
                output: String(decoding: outcome.output, as: UTF8.self), attempts: outcome.attempts, result: result,
                history: outcome.history.count > 1 ? outcome.history : nil))
        if outcome.record.exitCode == 0 { return 0 }
        return outcome.record.exitCode.map { $0 == 0 ? 1 : $0 } ?? 1
    }

    /// Pushes the snapshot: a passed step as its write-once cache entry (an entry already
    /// there is kept and named), a failed one under `failed-<key>`. Returns its reference.
    static func publish(
        _ uuid: String, outcome: StepOutcome, spec: StepSpec, store: Store, cache: RegistryStepCache
    ) throws -> String? {
        guard let image = try store.image(uuid) else { return nil }
        if outcome.record.exitCode == 0, let outputs = spec.publishableOutputs(outcome.output) {
            // Write-once: an entry there (a duplicate of a lost node's, an earlier run's) is kept,
            // and this snapshot goes by digest alone: the coordinator takes this run's result
            // (a step forced to run must not get an earlier snapshot back).
            let tag = try cache.containsStep(key: spec.key) ? nil : RegistryStepCache.stepTag(spec.key)
            let digest = try cache.pushStep(
                key: spec.key, image: image, outputs: outputs, record: outcome.record, tag: tag)
            return spec.registry + "@" + digest
        }
        let digest = try cache.pushStep(
            key: spec.key, image: image, outputs: [:], record: outcome.record,
            tag: RegistryStepCache.failedTag(spec.key))
        return spec.registry + "@" + digest
    }

    static func emit(_ frame: StepFrame) {
        let bytes = Array(frame.line.utf8)
        try? FileSystem.writeAll(fd: 1, bytes, path: "stdout")
    }

    static func fail(_ message: String) -> Int32 {
        let bytes = Array((messagePrefix + message + "\n").utf8)
        try? FileSystem.writeAll(fd: 2, bytes, path: "stderr")
        return infrastructureStatus
    }

    static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        gethostname(&buffer, buffer.count)
        return String(cString: buffer)
    }
}
