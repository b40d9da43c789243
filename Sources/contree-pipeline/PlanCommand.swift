import ArgumentParser
import FoundationEssentials
import ImageStore
import Pipeline
import RegistryCache
import Sandbox
import SystemSupport

/// `plan FILE [TARGET...]`: what a run would do, starting no sandbox.
struct PlanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plan",
        abstract: "Show what `run` would do: for every node, a hit or a miss and why, with the last cost of each miss.",
        discussion: """
            Starts no sandbox. A miss names the first key component that changed since the node last \
            passed (as `explain` does) and what it cost the last time it ran. Exit status: 0 when \
            everything would be a cache hit, 3 when something would run, 2 for invalid input. With \
            --cache-from, a node missing here is looked up in those registries; a hit there is \
            imported (as `run` would), so the keys after it can be computed.
            """)
    @OptionGroup var storeOptions: StoreOptions
    @Argument(help: "The pipeline file.") var pipeline: String
    @Argument(
        help: ArgumentHelp("Plan only these steps or nodes and what they depend on.", valueName: "target"))
    var targets: [String] = []
    @Option(
        name: .customLong("cache-from"),
        help: "A registry repository (docker://HOST[:PORT]/REPO) of steps a local miss may come from (repeatable).")
    var cacheFrom: [String] = []
    @Option(help: "Registry user for --cache-from (or $CONTREE_REGISTRY_USER).") var registryUser: String?
    @Option(help: "Registry password (or $CONTREE_REGISTRY_PASSWORD).") var registryPassword: String?
    @Flag(help: "Allow plain http to a cache registry that is not on this machine.") var allowHTTP = false
    @Flag(help: "As `run --allow-host-paths`.") var allowHostPaths = false
    @Flag(help: "Print JSON.") var json = false

    struct Entry: Encodable {
        var node: String
        /// `hit` or `miss`.
        var state: String
        /// For a hit: `local` or the registry; for a miss: the first thing that changed.
        var reason: String
        var key: String?
        var lastWallSeconds: Double?
        var lastPeakMemoryBytes: Int64?

        enum CodingKeys: String, CodingKey {
            case node, state, reason, key
            case lastWallSeconds = "last_wall_seconds"
            case lastPeakMemoryBytes = "last_peak_memory_bytes"
        }
    }

    struct Summary: Encodable {
        var pipeline: String
        var nodes: [Entry]
        var hits: Int
        var misses: Int
        /// What the misses cost the last time they ran (those that ran before).
        var estimatedSeconds: Double

        enum CodingKeys: String, CodingKey {
            case pipeline, nodes, hits, misses
            case estimatedSeconds = "estimated_seconds"
        }
    }

    func run() throws {
        let plan = try loadPipeline(pipeline, targets: targets)
        let summary: Summary = try reportingErrors {
            let store = try storeOptions.open()
            let engine = SandboxEngine.withAllBackends(store: store, progress: ProgressReporter())
            var explainer = KeyExplainer(plan: plan, engine: engine, allowHostPaths: allowHostPaths)
            let credentials = registryCredentials(registryUser, registryPassword)
            do {
                explainer.sharedCaches = try cacheFrom.map {
                    try RegistryStepCache($0, store: store, credentials: credentials, allowHTTP: allowHTTP)
                }
            } catch {
                printError("error: \(error)")
                throw ExitCode(2)
            }
            let explanations: [StepExplanation]
            do {
                explanations = try explainer.explainAll()
            } catch let error as PipelineValidationError {
                printError(error.description)
                throw ExitCode(2)
            }
            let cache = try StepCache(store: store)
            var entries: [Entry] = []
            for e in explanations {
                guard let node = plan.node(e.node) else { continue }
                var entry = Entry(node: e.node, state: "miss", reason: "", key: e.key)
                if node.kind == .dynamic {
                    entry.state = "dynamic"
                    entry.reason = e.note ?? "a dynamic matrix"
                } else if node.kind == .select {
                    let variantsHit = node.variantNodes.allSatisfy { v in
                        entries.contains { $0.node == v && $0.state == "hit" }
                    }
                    entry.state = variantsHit ? "hit" : "miss"
                    entry.reason = variantsHit ? "every variant is cached" : "a variant would run"
                } else if let source = e.hitSource, e.hit != nil, node.cache {
                    entry.state = "hit"
                    entry.reason = source
                } else {
                    entry.reason =
                        !node.cache
                        ? "cache: false (it runs every time)"
                        : e.differences.first ?? e.note
                            ?? (e.previous == nil ? "it never passed with this file" : "its key is new")
                    if let cost = try cache.lastCost(
                        pipeline: plan.definition.name, file: plan.definition.absolutePath, node: e.node)
                    {
                        entry.lastWallSeconds = cost.wallSeconds
                        entry.lastPeakMemoryBytes = cost.peakMemoryBytes
                    }
                }
                entries.append(entry)
            }
            // What a dynamic matrix will run is not known: it counts as what would run.
            let misses = entries.filter { $0.state == "miss" || $0.state == "dynamic" }
            return Summary(
                pipeline: plan.definition.name, nodes: entries, hits: entries.count - misses.count,
                misses: misses.count, estimatedSeconds: misses.compactMap(\.lastWallSeconds).reduce(0, +))
        }
        if json {
            try printJSON(summary)
        } else {
            print(
                Format.table(
                    ["NODE", "STATE", "WHY", "LAST TIME", "PEAK MEMORY"],
                    summary.nodes.map {
                        [
                            $0.node, $0.state, $0.reason,
                            $0.lastWallSeconds.map { String(format: "%.2f s", $0) } ?? "-",
                            $0.lastPeakMemoryBytes.map { ByteCount.format($0) } ?? "-",
                        ]
                    }))
            print(
                "\(summary.hits) hit, \(summary.misses) would run"
                    + (summary.nodes.contains { $0.lastWallSeconds != nil }
                        ? String(format: " (%.2f s when they last ran)", summary.estimatedSeconds) : ""))
        }
        if summary.misses > 0 { throw ExitCode(3) }
    }
}
