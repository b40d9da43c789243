import ArgumentParser
import Cluster
import ContreeServer
import Dispatch
import Foundation
import ImageStore
import Pipeline
import Registry
import RegistryCache
import Sandbox
import SystemSupport

/// Parses and validates a pipeline file, printing every problem with its place (exit 2).
func loadPipeline(_ path: String, targets: [String] = []) throws -> PipelinePlan {
    do {
        return try PipelinePlan(try PipelineParser.parse(file: path)).restricted(to: targets)
    } catch let error as PipelineValidationError {
        printError(error.description)
        throw ExitCode(2)
    } catch let error as PipelineError {
        printError("error: \(error.message)")
        throw ExitCode(2)
    }
}

struct RunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a pipeline: cached steps are reused, the rest run in sandboxes.",
        discussion: """
            Exit status: 0 when the pipeline passed, 1 when a step failed, 2 for invalid input \
            (nothing ran), 75 when the machinery failed (a cluster node, the registry between \
            machines: running again may pass), 130 when interrupted. With --executor slurm the \
            steps that miss the cache run on a Slurm cluster, one srun each, their snapshots \
            moving through the --cache-to registry (docs/distributed.md). Reports go to --out (default \
            .contree/runs/RUN-ID next to the file): report.json, metrics.csv, report.html, logs/, \
            artifacts/.
            """)

    @OptionGroup var storeOptions: StoreOptions
    @Argument(help: "The pipeline file.") var pipeline: String
    @Argument(
        help: ArgumentHelp(
            "Run only these steps or nodes (build, 'build[os=debian]') and what they depend on.", valueName: "target"))
    var targets: [String] = []
    @Option(
        name: [.short, .long],
        help: "Steps running at once (default: the number of cores; with --executor slurm, the partition's CPUs).")
    var jobs: Int?
    @Flag(help: "After a failure, still run every branch that does not depend on it.") var keepGoing = false
    @Flag(help: "Fail a passing step whose artifacts: pattern matches nothing (otherwise the summary warns).")
    var strictArtifacts = false

    func validate() throws {
        if let jobs, jobs < 1 { throw ValidationError("--jobs must be at least 1, not \(jobs)") }
        if verify && noCache {
            throw ValidationError(
                "--verify compares cached steps with a new run of them, and --no-cache uses no cached step: drop one")
        }
        if let publish, !NamespacePublication.isNamespace(publish) {
            throw ValidationError(
                "--publish takes a namespace: the name of a token in serve's tokens file (letters, digits, '-', '_', '.'), not '\(publish)'"
            )
        }
        if let executor = executor ?? ProcessInfo.processInfo.environment["CONTREE_EXECUTOR"],
            !["local", "slurm"].contains(executor)
        {
            throw ValidationError("--executor takes local or slurm, not '\(executor)'")
        }
    }
    @Option(name: .customLong("from"), help: "Run this step and everything after it even if cached (repeatable).")
    var fromSteps: [String] = []
    @Flag(help: "Run every step, ignoring the cache.") var noCache = false
    @Flag(help: "Fail instead of running any step that is not cached (reproducibility checks).")
    var failOnCacheMiss = false
    @Flag(
        help:
            "Run cached steps again, each from its recorded parent, and compare the snapshots: a step whose files differ fails, listing them. With targets, only those steps are verified."
    )
    var verify = false
    @Option(
        help: ArgumentHelp(
            "Tag every step's snapshot run/RUN/STEP in this serve namespace (a token's name), for the ConTree clients (tag:run/RUN/STEP).",
            valueName: "namespace"))
    var publish: String?
    @Option(help: "The run's report directory.") var out: String?
    @Option(help: "Also write JUnit XML here.") var junit: String?
    @Flag(help: "Print report.json on stdout instead of the live view.") var json = false
    @Option(
        name: .customLong("cache-from"),
        help: "Take the steps this store lacks from a registry repository, docker://HOST[:PORT]/REPO (repeatable).")
    var cacheFrom: [String] = []
    @Option(
        name: .customLong("cache-to"),
        help:
            "At the end, push the passed steps to a registry repository (docker://HOST[:PORT]/REPO) for --cache-from elsewhere."
    )
    var cacheTo: String?
    @Option(help: "Registry user for --cache-from/--cache-to (or $CONTREE_REGISTRY_USER).") var registryUser: String?
    @Option(help: "Registry password (or $CONTREE_REGISTRY_PASSWORD).") var registryPassword: String?
    @Flag(help: "Allow plain http to a cache registry that is not on this machine.") var allowHTTP = false
    @Option(
        help: ArgumentHelp(
            "Where steps that miss the cache run: local, or slurm (one srun each; needs --cache-to). Or $CONTREE_EXECUTOR.",
            valueName: "local|slurm"))
    var executor: String?
    @Option(name: .customLong("slurm-partition"), help: "The Slurm partition (or $CONTREE_SLURM_PARTITION).")
    var slurmPartition: String?
    @Option(
        name: .customLong("slurm-arg"), parsing: .unconditionalSingleValue,
        help: "One more srun argument for every step, e.g. --slurm-arg --qos=ci (repeatable; or $CONTREE_SLURM_ARGS).")
    var slurmArgs: [String] = []
    @Option(
        name: .customLong("slurm-command"),
        help: "contree-pipeline on the nodes (default: this binary's path; every node needs the same version).")
    var slurmCommand: String?
    @Flag(
        help:
            "Let secret files and local image paths (oci:, oci-archive:, docker-archive:) lie anywhere on this host; by default they must be inside the pipeline's directory, as inputs always are."
    )
    var allowHostPaths = false

    func run() async throws {
        let plan = try loadPipeline(pipeline, targets: targets)
        for step in fromSteps where plan.definition.step(step) == nil {
            printError("error: --from \(step): no such step in \(pipeline)")
            throw ExitCode(2)
        }
        ContainerBackend.warmUp()
        let store = try reportingErrors { try storeOptions.open() }
        let engine = SandboxEngine.withAllBackends(store: store, progress: ProgressReporter())
        let credentials = registryCredentials(registryUser, registryPassword)
        let environment = ProcessInfo.processInfo.environment
        let cacheTo = self.cacheTo ?? environment["CONTREE_CACHE_TO"]
        let slurm = (executor ?? environment["CONTREE_EXECUTOR"]) == "slurm"
        var cacheFrom = self.cacheFrom
        var slurmCPUs: Int?
        if slurm {
            slurmCPUs = try checkSlurm(plan, cacheTo: cacheTo, store: store, credentials: credentials)
            // What the nodes pushed is this run's cache too.
            if let cacheTo, !cacheFrom.contains(cacheTo) { cacheFrom.append(cacheTo) }
        }
        let sources: [any SharedStepCache]
        let destination: (any SharedStepCache)?
        do {
            sources = try cacheFrom.map {
                try RegistryStepCache($0, store: store, credentials: credentials, allowHTTP: allowHTTP)
            }
            destination = try cacheTo.map {
                try RegistryStepCache($0, store: store, credentials: credentials, allowHTTP: allowHTTP, pushing: true)
            }
        } catch {
            printError("error: \(error)")
            throw ExitCode(2)
        }
        var options = RunOptions(
            // On a cluster at most 256 by default: each running step holds an srun, a thread and
            // a few descriptors here (--jobs sets more).
            jobs: jobs ?? slurmCPUs.map { min($0, 256) } ?? ProcessInfo.processInfo.activeProcessorCount,
            keepGoing: keepGoing,
            forceSteps: fromSteps, noCache: noCache, failOnCacheMiss: failOnCacheMiss,
            outDir: out, junitPath: junit, cacheFrom: sources, cacheTo: destination, allowHostPaths: allowHostPaths,
            strictArtifacts: strictArtifacts)
        options.verify = verify ? Set(targets) : nil
        options.version = ContreePipeline.version
        if let publish {
            options.publishNamespace = publish
            options.publisher = { namespace, tags in
                try NamespacePublication.publish(tags, namespace: namespace, store: store)
            }
        }
        let observer: any RunObserver = json ? RunViews.make(output: ViewOutput(fd: 2)) : RunViews.make()
        let runner = try reportingErrors {
            guard slurm, let cacheTo else {
                return try PipelineRunner(plan: plan, engine: engine, options: options, observer: observer)
            }
            let nodes = try SlurmStepExecutor(
                SlurmConfiguration(
                    registry: cacheTo, credentials: credentials, allowHTTP: allowHTTP,
                    partition: slurmPartition ?? environment["CONTREE_SLURM_PARTITION"],
                    arguments: slurmArgs.isEmpty
                        ? (environment["CONTREE_SLURM_ARGS"] ?? "").split(separator: " ").map(String.init) : slurmArgs,
                    command: try slurmCommand ?? FileSystem.readLink("/proc/self/exe"),
                    version: ContreePipeline.version),
                store: store)
            return try PipelineRunner(plan: plan, engine: engine, steps: nodes, options: options, observer: observer)
        }
        let task = Task { try await runner.run() }
        let signals = Termination.cancelOnSignal(task)
        defer { signals.forEach { $0.cancel() } }
        let report: RunReport
        do {
            report = try await task.value
        } catch let error as PipelineValidationError {
            printError(error.description)
            throw ExitCode(2)
        } catch is CancellationError {
            printError(
                "contree: the run was cancelled before any step started (its image was being imported); nothing was imported"
            )
            throw ExitCode(130)
        } catch {
            throw fail(error)
        }
        if let export = report.cacheExport {
            if let problem = export.error {
                printError(
                    "warning: pushing the cache to \(export.destination) stopped after \(Plural.count(export.pushed, "entry", plural: "entries")): \(problem); the run's result stands"
                )
            } else {
                printError(
                    "cache: \(export.pushed) pushed to \(export.destination), \(export.present) already there (\(String(format: "%.1f", export.seconds)) s)"
                        + (export.caches.map { "; dependency caches pushed: " + $0.joined(separator: ", ") } ?? "")
                )
            }
            for (node, why) in (export.notPushed ?? [:]).sorted(by: { $0.key < $1.key }) {
                printError("cache: \(node) not pushed (\(why))")
            }
        }
        if let published = report.published {
            if let problem = published.error {
                printError("warning: --publish \(published.namespace): nothing was published: \(problem)")
            } else {
                let failed = report.nodes.filter { $0.status == .failed }.compactMap { published.tags[$0.node] }
                printError(
                    "published \(Plural.count(published.tags.count, "snapshot")) to namespace \(published.namespace) as run/\(report.runID)/STEP"
                        + (failed.isEmpty
                            ? ""
                            : "; branch from the failure with the ConTree clients: "
                                + failed.map { "tag:" + $0 }.joined(separator: ", ")))
            }
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            encoder.dateEncodingStrategy = .iso8601
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        }
        if report.exitStatus != 0 { throw ExitCode(report.exitStatus) }
    }
}

extension RunCommand {
    /// Before anything runs with --executor slurm: a registry to move snapshots through, no
    /// step with services, Slurm's tools, a controller that answers, the partition, the
    /// registry reachable. Returns the partition's CPUs. Exits 2 (set-up) or 75 (unreachable).
    func checkSlurm(
        _ plan: PipelinePlan, cacheTo: String?, store: Store, credentials: RegistryCredentials?
    ) throws -> Int {
        guard let cacheTo else {
            printError(
                "error: --executor slurm moves snapshots between machines through a registry: add --cache-to docker://HOST[:PORT]/REPO (a registry every node reaches)"
            )
            throw ExitCode(2)
        }
        let planned = Set(plan.nodes.map(\.step))
        let withServices = plan.definition.steps.filter { planned.contains($0.id.value) && !$0.services.isEmpty }
        for step in withServices {
            printError(
                "\(step.location): error: step \(step.id.value) has services, which --executor slurm does not start yet; run this pipeline with --executor local"
            )
        }
        if !withServices.isEmpty { throw ExitCode(2) }
        let cpus: Int
        do {
            cpus = try SlurmCluster.cpus(
                partition: slurmPartition ?? ProcessInfo.processInfo.environment["CONTREE_SLURM_PARTITION"])
        } catch let problem as SlurmCluster.Problem {
            printError("error: \(problem.description)")
            throw ExitCode(problem.status)
        }
        do {
            _ = try RegistryRepository(cacheTo, store: store, credentials: credentials, allowHTTP: allowHTTP)
                .annotations(tag: "contree-reachable")
        } catch {
            printError(
                "error: the registry \(cacheTo) cannot be reached from here (\(error)); every node and this machine must reach it: check the address and that it is up"
            )
            throw ExitCode(75)
        }
        // Each running step holds srun's pipes and its log here: the soft descriptor limit
        // (1024 by default) goes up to the hard one.
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        return cpus
    }
}

struct ValidateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "validate", abstract: "Check a pipeline file without running it (exit 2 when it is invalid).",
        discussion: """
            Everything run checks before anything runs: the file itself, then on this host the \
            inputs (each must match files beneath the pipeline's directory), the secrets the steps \
            use (each variable set, each file there) and a local image path. The base image is \
            not built or imported.
            """)
    @Argument(help: "The pipeline file.") var pipeline: String
    @Flag(help: "As `run --allow-host-paths`: secret files and local image paths may lie anywhere on this host.")
    var allowHostPaths = false
    @Flag(
        help:
            "Print the resolved pipeline (includes merged, templates and merge keys applied, x- keys dropped) as YAML."
    )
    var print = false

    func run() throws {
        let plan = try loadPipeline(pipeline)
        let problems = Preflight(plan.definition, allowHostPaths: allowHostPaths).check().problems
        if !problems.isEmpty {
            printError(PipelineValidationError(problems).description)
            throw ExitCode(2)
        }
        if self.print {
            Swift.print(try reportingErrors { try PipelineParser.resolvedYAML(file: pipeline) }, terminator: "")
            return
        }
        let steps = plan.definition.steps.count
        let dynamic = plan.nodes.filter { $0.kind == .dynamic }.count
        Swift.print(
            "\(pipeline): valid — \(steps) step\(steps == 1 ? "" : "s"), \(plan.nodes.count) node\(plan.nodes.count == 1 ? "" : "s") after expansion"
                + (dynamic == 0
                    ? ""
                    : " (\(dynamic) of them dynamic: \(dynamic == 1 ? "a matrix that expands" : "matrices that expand") while it runs)")
        )
    }
}

extension GraphRenderer.Format: ExpressibleByArgument {}

struct GraphCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "graph", abstract: "Print the pipeline's DAG as Mermaid or Graphviz DOT.")
    @Argument(help: "The pipeline file.") var pipeline: String
    @Option(help: "mermaid or dot.") var format: GraphRenderer.Format = .mermaid

    func run() throws {
        print(GraphRenderer.render(try loadPipeline(pipeline), as: format), terminator: "")
    }
}

struct ExplainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "explain",
        abstract: "Show a step's key components and, on a miss, what changed since it last passed.")
    @OptionGroup var storeOptions: StoreOptions
    @Argument(help: "The pipeline file.") var pipeline: String
    @Argument(help: "The step, or one node of it: 'test[opt=-O2]', 'solve.fast'.") var step: String
    @Flag(help: "As `run --allow-host-paths`: secret files and local image paths may lie anywhere on this host.")
    var allowHostPaths = false

    func run() throws {
        let plan = try loadPipeline(pipeline)
        try reportingErrors {
            let engine = SandboxEngine.withAllBackends(store: try storeOptions.open(), progress: ProgressReporter())
            let explanations: [StepExplanation]
            do {
                explanations = try KeyExplainer(plan: plan, engine: engine, allowHostPaths: allowHostPaths).explain(
                    step: step)
            } catch let error as PipelineError {
                printError("error: \(error.message)")
                throw ExitCode(2)
            } catch let error as PipelineValidationError {
                printError(error.description)
                throw ExitCode(2)
            }
            for e in explanations {
                print("step \(e.node)")
                guard let c = e.components, let key = e.key else {
                    print("  key: unknown — \(e.note ?? "")")
                    continue
                }
                print("  key: \(key)")
                print("  \(e.hit.map { "HIT: reuses snapshot \($0.resultImage)" } ?? "MISS: it would run")")
                print("  components:")
                print("    format:       \(c.format)")
                print("    parent image: \(c.parentImage)")
                print(
                    "    command:      \(c.command.map { $0.contains(" ") || $0.contains("\n") ? "'" + $0.replacingOccurrences(of: "\n", with: "\\n") + "'" : $0 }.joined(separator: " "))"
                )
                print("    workdir:      \(c.workdir)")
                print("    user:         \(c.user)")
                print("    isolation:    \(c.isolation)")
                for item in c.env { print("    env:          \(item)") }
                for item in c.inputs { print("    input:        \(item)") }
                for item in c.secrets { print("    secret:       \(item)") }
                print("    network:      \(c.network)")
                for item in c.copies ?? [] { print("    copy:         \(item)") }
                for item in c.services ?? [] { print("    service:      \(item)") }
                if let failed = e.failedRun {
                    if e.changesSinceFailure.isEmpty {
                        print(
                            "  unchanged since run \(failed), where it failed: it would fail the same way unless what it reads outside its key changed"
                        )
                    } else {
                        print("  changed since run \(failed), where it failed:")
                        for d in e.changesSinceFailure { print("    - \(d)") }
                    }
                }
                if e.hit == nil {
                    if let run = e.previousRun {
                        if e.differences.isEmpty {
                            print(
                                "  unchanged since run \(run), but its snapshot is no longer cached (removed, or the step has cache: false)"
                            )
                        } else {
                            print("  changed since run \(run), the last that passed:")
                            for d in e.differences { print("    - \(d)") }
                        }
                    } else {
                        print("  no earlier run of this step passed")
                    }
                }
            }
        }
    }
}

struct RunsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "runs", abstract: "List past pipeline runs, newest first; prune old ones.",
        subcommands: [RunsListCommand.self, RunsPruneCommand.self], defaultSubcommand: RunsListCommand.self)
}

struct RunsPruneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune",
        abstract: "Forget old runs and remove their report folders.",
        discussion: """
            Keeps the newest N runs of each pipeline (file and name) with --keep, and/or the runs \
            younger than --older-than. Folders under .contree/runs/ are removed; a folder given \
            with --out is left where it is (and named). A run that has not ended and began in \
            the last day may still be going: it stays.
            """)
    @OptionGroup var storeOptions: StoreOptions
    @Option(help: "Keep the newest N runs of each pipeline.") var keep: Int?
    @Option(help: ArgumentHelp("Forget runs that started longer ago than AGE (30m, 12h, 7d, 2w).", valueName: "AGE"))
    var olderThan: String?
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        if keep == nil && olderThan == nil {
            throw ValidationError("say what to prune: --keep N, --older-than AGE, or both")
        }
        if let keep, keep < 0 { throw ValidationError("--keep takes a number of runs (0 or more), not \(keep)") }
        if let olderThan, Format.parseAge(olderThan) == nil {
            throw ValidationError(
                "--older-than takes an age such as 7d, 12h, 30m or a number of seconds, not '\(olderThan)'")
        }
    }

    struct Pruned: Codable {
        var run: String
        var folder: String
        var removed: Bool
        var note: String?
    }

    func run() throws {
        try reportingErrors {
            let cache = try StepCache(store: try storeOptions.open())
            let cutoff = olderThan.flatMap(Format.parseAge).map { Date().addingTimeInterval(-$0) }
            var pruned: [Pruned] = []
            var failed = false
            for run in try cache.forgetRuns(keep: keep, startedBefore: cutoff) {
                var entry = Pruned(run: run.id, folder: run.outDir, removed: false)
                if !run.outDir.hasSuffix("/.contree/runs/" + run.id) {
                    entry.note = "given with --out: left in place"
                } else if FileSystem.exists(run.outDir) {
                    do {
                        try FileSystem.removeTree(run.outDir)
                        entry.removed = true
                    } catch {
                        entry.note = "could not be removed: \(error)"
                        failed = true
                    }
                } else {
                    entry.note = "already gone"
                }
                pruned.append(entry)
            }
            if json {
                try printJSON(pruned)
            } else {
                for entry in pruned where entry.note != nil && !entry.removed {
                    print("\(entry.run): \(entry.folder) \(entry.note!)")
                }
                let removed = pruned.filter(\.removed).count
                print("forgot \(Plural.count(pruned.count, "run")), removed \(Plural.count(removed, "folder"))")
            }
            if failed { throw ExitCode(1) }
        }
    }
}

struct RunsListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list", abstract: "List past pipeline runs, newest first (the default).")
    @OptionGroup var storeOptions: StoreOptions
    @Option(help: "How many.") var limit = 20
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try reportingErrors {
            let runs = try StepCache(store: try storeOptions.open()).runs(limit: limit)
            if json { return try printJSON(runs) }
            print(
                Format.table(
                    ["RUN", "PIPELINE", "FILE", "STATUS", "STARTED", "DURATION", "REPORTS"],
                    runs.map { run in
                        [
                            run.id, run.pipeline, run.file, run.status, Format.date(run.started),
                            run.ended.map { String(format: "%.1f s", $0.timeIntervalSince(run.started)) } ?? "",
                            run.outDir,
                        ]
                    }))
        }
    }
}

struct ArtifactsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "artifacts", abstract: "List a past run's artifacts, or copy them to a directory.")
    @OptionGroup var storeOptions: StoreOptions
    @Argument(help: "The run id (or a unique prefix).") var runID: String
    @Option(help: "Copy the artifacts (and manifest.json) here.") var copy: String?
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try reportingErrors {
            guard let summary = try StepCache(store: try storeOptions.open()).run(runID) else {
                throw SandboxError(.notFound, "no run \(runID); `contree-pipeline runs` lists them")
            }
            let manifest = try ArtifactManifest(outDir: summary.outDir)
            let entries = manifest.entries
            if let copy {
                let copied = try manifest.copy(to: copy)
                print("copied \(copied) artifacts to \(copy)")
                return
            }
            if json { return try printJSON(entries) }
            if entries.isEmpty { print("run \(summary.id) has no artifacts") }
            print(
                Format.table(
                    ["STEP", "PATH", "SIZE", "SHA256", "FILE"],
                    entries.map {
                        [
                            $0.node, $0.path, ByteCount.format($0.size), String($0.sha256.prefix(16)),
                            summary.outDir + "/" + $0.file,
                        ]
                    }))
        }
    }
}

struct ShellCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shell",
        abstract: "Open a shell in the snapshot of a step (the failed one by default) as a new branch.",
        discussion: """
            The shell starts where the step ran: its snapshot, working directory and environment \
            (secrets excluded). Its changes become a new image, so the step's own snapshot stays \
            as it was.
            """)

    @OptionGroup var storeOptions: StoreOptions
    @Argument(help: "The pipeline file.") var pipeline: String
    @Argument(help: "The step (default: the first that failed in the run).") var step: String?
    @Option(name: .customLong("run"), help: "The run (default: the pipeline's latest).") var runID: String?
    @Option(help: "The shell to start.") var shell = "/bin/sh"

    func run() async throws {
        let plan = try loadPipeline(pipeline)
        let store = try reportingErrors { try storeOptions.open() }
        let cache = try reportingErrors { try StepCache(store: store) }
        let summary = try reportingErrors { () -> PipelineRunSummary in
            if let runID {
                guard let run = try cache.run(runID) else {
                    throw SandboxError(.notFound, "no run \(runID); `contree-pipeline runs` lists them")
                }
                return run
            }
            guard let run = try cache.lastRun(pipeline: plan.definition.name, file: plan.definition.absolutePath)
            else {
                throw SandboxError(
                    .notFound, "\(plan.definition.name) (\(plan.definition.absolutePath)) has not run yet; run it first"
                )
            }
            return run
        }
        let rows = try reportingErrors { try cache.steps(of: summary.id) }
        let chosen: PipelineStepRow? =
            if let step { rows.first { $0.node == step } ?? rows.first { $0.step == step } } else {
                rows.first { $0.status == "failed" }
            }
        guard let row = chosen else {
            printError(
                step.map { "error: run \(summary.id) has no step \($0)" }
                    ?? "error: nothing failed in run \(summary.id); name the step to open")
            throw ExitCode(2)
        }
        guard let image = row.resultImage ?? row.parentImage else {
            printError("error: \(row.node) left no snapshot in run \(summary.id) (it was \(row.status))")
            throw ExitCode(2)
        }
        var env: [String: String] = [:]
        for entry in row.components?.env ?? [] where !entry.hasPrefix("CONTREE_OUTPUT=") {
            let key = String(entry.prefix { $0 != "=" })
            env[key] = String(entry.dropFirst(key.count + 1))
        }
        let interactive = isatty(0) == 1
        printError(
            "contree: shell in the snapshot of \(row.node) (\(row.status)) — image \(image); its changes become a new image"
        )
        let spec = RunSpec(
            image: image, command: [shell], env: env, cwd: row.components?.workdir, stdin: .fileDescriptor(0),
            stdout: .fileDescriptor(1), stderr: .fileDescriptor(2),
            terminal: interactive ? TerminalSession(inputFD: 0, outputFD: 1) : nil)
        let engine = SandboxEngine(store: store, sources: .commands)
        let raw = interactive ? TerminalMode.makeRaw(0) : nil
        let result: RunResult
        do {
            result = try await engine.run(spec)
        } catch {
            raw?.restore()
            _ = fail(error)
            throw ExitCode(125)
        }
        raw?.restore()
        if let new = result.record.resultImage, new != image {
            printError("contree: the session's changes are image \(new) (parent \(image))")
        } else {
            printError("contree: nothing changed")
        }
        if result.record.shellStatus != 0 { throw ExitCode(result.record.shellStatus) }
    }
}
