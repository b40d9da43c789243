import Foundation
import ImageStore
import SystemSupport

/// `--cache-from` and `--cache-to`: steps and scores through shared caches. A shared cache
/// that cannot be reached costs a note in the log and a step that runs, never a failed run.
extension PipelineRunner {
    /// The step stored under `key` in the first shared cache that has it, imported and
    /// remembered in this store's cache; with the cache's location.
    func sharedStep(_ key: String, components: StepKeyComponents, log: StepLog) async -> (CachedStep, String)? {
        for source in options.cacheFrom {
            do {
                guard let step = try await BlockingPool.shared.run({ try source.fetchStep(key: key) }) else { continue }
                try cache.remember(
                    key: key, components: components, resultImage: step.image.uuid, outputs: step.outputs,
                    record: step.record)
                log.note("cache hit \(key) from \(source.location): imported as \(step.image.uuid), not run here")
                return (
                    CachedStep(key: key, resultImage: step.image.uuid, outputs: step.outputs, record: step.record),
                    source.location
                )
            } catch {
                log.note("the shared cache \(source.location) could not give step \(key) (\(error)); running it here")
            }
        }
        return nil
    }

    /// A score stored in a shared cache, remembered in this store.
    func sharedScore(_ key: String, log: StepLog) async -> String? {
        for source in options.cacheFrom {
            do {
                guard let text = try await BlockingPool.shared.run({ try source.fetchScore(key: key) }) else {
                    continue
                }
                try cache.rememberScore(key, text)
                return text
            } catch {
                log.note("the shared cache \(source.location) could not give a score (\(error)); computing it here")
            }
        }
        return nil
    }

    /// The dependency caches the plan's steps use.
    var dependencyCachesUsed: [String] {
        let used = Set(plan.nodes.flatMap { plan.definition.step($0.step)?.caches.map(\.name.value) ?? [] })
        return plan.definition.caches.map(\.name.value).filter(used.contains)
    }

    /// `--cache-from`: a dependency cache missing (or empty) here starts from the newest
    /// `cache-NAME` of the first shared cache that has one. A failure is a warning: the steps
    /// run with the cache as it is.
    func restoreDependencyCaches() async {
        guard !options.cacheFrom.isEmpty else { return }
        let caches = DependencyCaches(store: engine.store)
        let store = engine.store
        for name in dependencyCachesUsed {
            let local = caches.path(of: name)
            if FileSystem.exists(local), (try? FileSystem.list(local).isEmpty) == false { continue }
            for source in options.cacheFrom {
                do {
                    let restored = try await BlockingPool.shared.run { () -> Bool in
                        guard let image = try source.fetchDependencyCache(name: name) else { return false }
                        return try caches.restore(name, from: image, store: store)
                    }
                    if restored {
                        notes.withLock { $0.append("cache \(name): restored from \(source.location)") }
                        break
                    }
                } catch {
                    notes.withLock {
                        $0.append(
                            "cache \(name): \(source.location) could not give it (\(error)); steps start with it empty")
                    }
                }
            }
        }
    }

    /// `--cache-to`: each dependency cache the run used, as a root image tagged `cache-NAME`.
    func publishDependencyCaches(to destination: any SharedStepCache, export: inout CacheExport) async -> [String]? {
        let caches = DependencyCaches(store: engine.store)
        let store = engine.store
        var pushed: [String] = []
        for name in dependencyCachesUsed {
            do {
                let done = try await BlockingPool.shared.run { () -> Bool in
                    guard let image = try caches.snapshot(name, store: store) else { return false }
                    try destination.publishDependencyCache(name: name, image: image)
                    return true
                }
                if done { pushed.append(name) }
            } catch {
                export.error = (export.error.map { $0 + "; " } ?? "") + "cache \(name): \(error)"
            }
        }
        return pushed.isEmpty ? nil : pushed
    }

    /// Publishes every passed step the store's cache holds and every score used: the entries
    /// the destination lacks are pushed, the rest counted as present.
    func publish(_ nodes: [NodeResult], to destination: any SharedStepCache) async -> CacheExport {
        let started = Date()
        let steps = nodes.compactMap { node -> CachedStep? in
            guard node.status == .passed, node.variants == nil, let key = node.key else { return nil }
            return try? cache.lookup(key)
        }
        let scores = scoresUsed.withLock { $0 }
        let store = engine.store
        let notPushed = Dictionary(
            nodes.filter { $0.status != .passed }.map {
                ($0.node, $0.status.rawValue + ($0.reason.map { ": " + $0 } ?? ""))
            },
            uniquingKeysWith: { $1 })
        var export = CacheExport(destination: destination.location, notPushed: notPushed)
        do {
            export = try await BlockingPool.shared.run { [export] in
                var export = export
                for step in steps {
                    if try destination.containsStep(key: step.key) {
                        export.present += 1
                        continue
                    }
                    guard let image = try store.image(step.resultImage) else { continue }
                    try destination.publishStep(key: step.key, image: image, outputs: step.outputs, record: step.record)
                    export.pushed += 1
                }
                for (key, text) in scores.sorted(by: { $0.key < $1.key }) {
                    if try destination.fetchScore(key: key) != nil {
                        export.present += 1
                        continue
                    }
                    try destination.publishScore(key: key, score: text)
                    export.pushed += 1
                }
                return export
            }
        } catch {
            export.error = "\(error)"
        }
        export.seconds = Date().timeIntervalSince(started)
        return export
    }
}
