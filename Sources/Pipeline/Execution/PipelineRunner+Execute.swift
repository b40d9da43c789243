import Foundation
import ImageStore
import Sandbox
import SystemSupport

/// What every node of one run shares.
struct ExecutionContext: Sendable {
    let runner: PipelineRunner
    let baseImage: ImageRecord
    /// Steps' own `image:` references, resolved (before anything ran).
    var stepImages: [String: ImageRecord] = [:]
    let secrets: [String: String]
    /// Nodes that execute even on a cache hit (`--from`).
    let secretKey: [UInt8]
}

extension PipelineRunner {
    func execute(_ node: PlanNode, results: ResultTable, context: ExecutionContext) async -> NodeResult {
        let log = StepLog(path: outDir + "/logs/" + node.fileName + ".log", secrets: context.secrets)
        defer { log.close() }
        log.onPlacement { [observer] in observer?.handle(.nodePlaced(node.id, $0)) }
        var result = NodeResult(node: node, status: .running)
        result.started = Date()
        result.log = "logs/" + node.fileName + ".log"
        do {
            switch node.kind {
            case .run: try await executeRun(node, results: results, context: context, log: log, into: &result)
            case .select: try await executeSelect(node, results: results, context: context, log: log, into: &result)
            case .dynamic:
                throw PipelineError(.invalid, "\(node.id) is a dynamic matrix the scheduler expands; it never runs")
            }
        } catch is CancellationError {
            result.status = .cancelled
            result.reason = "the run was cancelled"
        } catch let error as CacheMissError {
            result.status = .failed
            result.strictFailure = true
            result.reason = error.message
            log.note(error.message)
        } catch let error as PipelineError {
            result.status = .failed
            result.reason = error.message
            if error.kind == .infrastructure { result.infrastructureFailure = true }
            log.note(error.message)
        } catch {
            result.status = Task.isCancelled ? .cancelled : .failed
            result.reason = "\(error)"
            log.note("\(error)")
        }
        if result.status == .failed && !result.strictFailure {
            if plan.definition.step(node.step)?.continueOnError == true { result.toleratedFailure = true }
            // A failed fork variant is an outcome of the search, not of the pipeline.
            if node.variant != nil { result.containedFailure = true }
        }
        result.ended = Date()
        return result
    }

    /// The image a node starts from (see `startingPoint`).
    func parentImage(
        _ node: PlanNode, results: ResultTable, context: ExecutionContext, log: StepLog
    ) throws -> ImageRecord {
        let start = plan.startingPoint(
            node, results: results, base: context.baseImage.uuid, stepImages: context.stepImages.mapValues(\.uuid))
        if case .node(let parent) = node.parent, start.from != parent {
            log.note(
                "\(parent) left no snapshot; this step starts from \(start.from.map { "the snapshot of \($0)" } ?? "the pipeline's image")"
            )
        }
        let known = [context.baseImage] + context.stepImages.values
        guard let image = try known.first(where: { $0.uuid == start.image }) ?? engine.store.image(start.image) else {
            let from = start.from ?? ""
            throw PipelineError(
                .failed,
                "the snapshot of \(from) is gone (removed by image rm or gc?); rerun with --from \(plan.node(from)?.step ?? from)"
            )
        }
        return image
    }

    private func executeRun(
        _ node: PlanNode, results: ResultTable, context: ExecutionContext, log: StepLog,
        into result: inout NodeResult
    ) async throws {
        let parent = try parentImage(node, results: results, context: context, log: log)
        result.parentImage = parent.uuid

        let serviceImages = try PipelineRunner.serviceImages(
            node, results: results, base: context.baseImage, store: engine.store
        ) { context.stepImages[$0.value] ?? context.baseImage }
        let services = serviceRequests(node, images: serviceImages)
        let serviceKey = PipelineRunner.serviceKey(node, images: serviceImages)
        // Staging copies reads snapshots and rendering hashes the step's input files: blocking
        // work, in one trip to the pool for disk work.
        let plan = self.plan
        let store = engine.store
        let (staged, prepared) = try await BlockingPool.files.run {
            let staged = try CopyStager(store: store, plan: plan).stage(node, results: results)
            do {
                return (
                    staged,
                    try StepPreparer(plan: plan).prepare(
                        node, parent: parent, results: results, secrets: context.secrets,
                        secretKey: context.secretKey, copies: staged?.keyComponent, services: serviceKey,
                        parentState: try store.state(of: parent.uuid)?.digest)
                )
            } catch {
                staged?.lease.release()
                throw error
            }
        }
        defer { staged?.lease.release() }
        let (components, command, env, secretEnv, workdir, inputs, isolation) = (
            prepared.components, prepared.command, prepared.env, prepared.secretEnv, prepared.workdir, prepared.inputs,
            prepared.isolation
        )
        let key = components.key
        result.key = key
        result.components = components

        let forced = options.noCache || forced.withLock { $0.contains(node.id) } || !node.cache
        var hit = forced ? nil : try cache.lookup(key)
        let verifying = options.verify.map { $0.isEmpty || $0.contains(node.step) || $0.contains(node.id) } ?? false
        if let hit {
            log.note("cache hit \(key): reusing \(hit.resultImage) without running")
            if let replayed = hit.log, !replayed.isEmpty {
                log.note("the output it had when it ran:")
                log.replay(replayed)
            }
        } else if !forced, let (shared, source) = await sharedStep(key, components: components, log: log) {
            hit = shared
            result.cachedFrom = source
        }
        if let hit, verifying {
            log.note("--verify: running it again from the same parent, to compare with the cached snapshot")
            result.cached = true
            result.outputs = hit.outputs
        } else if let hit {
            result.status = .passed
            result.cached = true
            result.resultImage = hit.resultImage
            result.outputs = hit.outputs
            result.exitCode = hit.record?.exitCode ?? 0
            result.metrics = hit.record?.metrics
            try await collectArtifacts(
                node, image: hit.resultImage, workdir: workdir, passed: true, log: log, into: &result)
            await readTestReports(node, image: hit.resultImage, workdir: workdir, log: log, into: &result)
            return
        }
        if options.failOnCacheMiss && !(verifying && hit != nil) {
            // A fork variant that failed with this very key before is a known outcome of the
            // search (tree-search.yaml's `broken`): it fails again without running.
            if node.variant != nil, let run = try cache.lastFailure(key: key) {
                log.note("failed with this key in run \(run); not run again (--fail-on-cache-miss)")
                result.cached = true  // an outcome from the history, like a hit
                throw PipelineError(.failed, "failed with this key in run \(run) (not run again: --fail-on-cache-miss)")
            }
            throw CacheMissError(
                "step \(node.id) would run (no cached result for key \(key)) and --fail-on-cache-miss is set; `explain \(node.id)` says what changed"
            )
        }

        // The copies become a layer over the parent, and the step runs over that.
        var start = parent
        if let staged {
            start = try await BlockingPool.files.run {
                try Snapshotter(store: store).commit(
                    staged.directory, base: parent, config: parent.config, origin: "copy:\(node.id)",
                    lease: staged.lease
                ).image
            }
            log.note("copied in: " + staged.entries.joined(separator: ", "))
        }
        var request = StepRequest(
            node: node.id, key: key, parent: start.uuid, command: command, environment: env, secrets: secretEnv,
            workdir: workdir, inputs: inputs, inputRoot: plan.definition.directory, timeout: node.settings.timeout,
            limits: ResourceLimits(
                memoryBytes: node.settings.limits.memoryBytes, cpus: node.settings.limits.cpus,
                pids: node.settings.limits.pids ?? 4096),
            network: node.settings.network ?? .loopback, isolation: isolation,
            attempts: 1 + (node.settings.retries?.max ?? 0), outputPath: PipelineRunner.outputPath,
            caches: (plan.definition.step(node.step)?.caches ?? []).compactMap { use in
                plan.definition.caches.first { $0.name.value == use.name.value }.map {
                    StepRequest.Cache(name: use.name.value, path: $0.path, sharing: use.sharing)
                }
            }, services: services)
        request.retry = node.settings.retries ?? RetryPolicy(max: 0)
        request.persistMemory = node.settings.persist == .memory
        if let hit, verifying {
            try await verify(node, request, cached: hit, workdir: workdir, log: log, into: &result)
            return
        }
        var run = try await steps.run(request, log: log)
        if run.record.exitCode != 0, let reruns = plan.definition.step(node.step)?.flakyCheck, !Task.isCancelled {
            do {
                let (check, passing) = try await flakeCheck(
                    node, request, reruns: reruns, secrets: context.secrets, log: log)
                result.flakeCheck = check
                if let passing, check.allowed {
                    log.note(
                        "allow-flaky: going on from a rerun that passed (\(passing.record.resultImage ?? "no snapshot"))"
                    )
                    run = passing
                }
            } catch {
                // The step's own failure stands, with its snapshot; the triage did not finish.
                log.note(
                    "flaky-check did not finish (\(error is CancellationError ? "cancelled" : "\(error)")); the step's failure stands"
                )
            }
        }
        result.attempts = run.attempts
        if run.history.count > 1 { result.attemptRecords = run.history.map(AttemptRecord.init) }
        if let placement = run.placement {
            result.executor = placement.executor
            result.executorNode = placement.node
            result.slurmJobID = placement.jobID
        }
        let record = run.record
        result.exitCode = record.exitCode
        result.signal = record.signal
        result.timedOut = record.timedOut
        result.metrics = record.metrics
        result.resultImage = record.resultImage
        // Outputs feed reports, the cache and later keys: no secret may travel through them.
        result.outputs = PipelineRunner.parseOutputs(run.output, log: log)
        if let (name, secret) = result.outputs.sorted(by: { $0.key < $1.key }).lazy
            .compactMap({ output in log.mask.secret(in: output.value).map { (output.key, $0) } }).first
        {
            result.outputs = [:]
            throw PipelineError(
                .failed,
                "output \(name) holds the secret \(secret) (or a line of it); outputs are kept in reports, the cache and later steps' keys, so none of this step's outputs were stored: pass the secret to the steps that need it with their own `secrets:`"
            )
        }
        let passed = record.exitCode == 0
        result.status = passed ? .passed : .failed
        if !passed { result.reason = PipelineRunner.describe(record) }
        if let check = result.flakeCheck {
            let verdict = "\(check.verdict.rawValue): \(check.passed) of \(check.reruns) reruns passed"
            result.reason =
                passed
                ? "flaky (allow-flaky): it failed, then \(check.passed) of \(check.reruns) reruns passed"
                : (result.reason ?? "failed") + "; "
                    + (check.verdict == .flaky ? verdict + " (allow-flaky: true lets a flaky step pass)" : verdict)
        }
        if passed, let image = record.resultImage {
            // Only successes are served as hits; a failure's snapshot stays for `shell`.
            try cache.remember(
                key: key, components: components, resultImage: image, outputs: result.outputs, record: record,
                log: log.written(last: StepCache.logLimit))
        }
        if let image = record.resultImage {
            await readTestReports(node, image: image, workdir: workdir, log: log, into: &result)
            try await collectArtifacts(node, image: image, workdir: workdir, passed: passed, log: log, into: &result)
        }
    }

    /// `--verify`: runs a cached step again (never sharing a run, never caching the result)
    /// and compares the snapshot it leaves with the cached one: the same layer, the same files
    /// with other times (a note), or files that differ (the step fails, listing them and the
    /// `image diff` that shows them). A verified step goes on as the hit it was.
    private func verify(
        _ node: PlanNode, _ request: StepRequest, cached hit: CachedStep, workdir: String, log: StepLog,
        into result: inout NodeResult
    ) async throws {
        let run = try await steps.runUnshared(request, log: log)
        result.attempts = run.attempts
        result.metrics = run.record.metrics
        result.exitCode = run.record.exitCode
        var check = Verification(
            cachedImage: hit.resultImage, verifiedImage: run.record.resultImage, verdict: .identical)
        defer { result.verification = check }
        guard run.record.exitCode == 0 else {
            check.verdict = .failed
            throw PipelineError(
                .failed,
                "not reproducible: it passed when it was cached, and run again from the same parent it \(PipelineRunner.describe(run.record))"
            )
        }
        let store = engine.store
        guard let cachedImage = try store.image(hit.resultImage),
            let verifiedImage = try run.record.resultImage.flatMap({ try store.image($0) })
        else {
            throw PipelineError(.failed, "--verify: a snapshot to compare is gone (removed by gc?); run again")
        }
        if cachedImage.layers == verifiedImage.layers && cachedImage.config == verifiedImage.config {
            log.note("--verify: reproducible: the same layer (\(cachedImage.layers.last ?? "no layer"))")
        } else {
            let changes = try await BlockingPool.files.run {
                try ImageDiff.changes(from: cachedImage, to: verifiedImage, store: store)
            }
            check.changes = changes.prefix(Verification.changeLimit).map { "\($0.kind.rawValue) \($0.path.text)" }
            if changes.isEmpty && cachedImage.config == verifiedImage.config {
                check.verdict = .sameFiles
                log.note(
                    "--verify: reproducible: the same files, modes and contents; only file times differ (layer \(cachedImage.layers.last ?? "") vs \(verifiedImage.layers.last ?? ""))"
                )
            } else {
                check.verdict = .differs
                let listed = check.changes!.joined(separator: ", ")
                let more =
                    changes.count > Verification.changeLimit
                    ? " and \(changes.count - Verification.changeLimit) more" : ""
                let what =
                    changes.isEmpty
                    ? "its image config differs"
                    : "\(Plural.count(changes.count, "path")) \(changes.count == 1 ? "differs" : "differ"): \(listed)\(more)"
                for change in changes.prefix(Verification.changeLimit) {
                    log.note("--verify: \(change.kind.rawValue) \(change.path.text)")
                }
                throw PipelineError(
                    .failed,
                    "not reproducible: run again from the same parent, \(what); `contree-pipeline image diff \(hit.resultImage) \(verifiedImage.uuid)` shows them"
                )
            }
        }
        // Reproducible: the verification's own snapshot is not kept; but a run that changed
        // nothing answers with its parent, which is not the verification's to remove.
        if let verified = run.record.resultImage, verified != hit.resultImage, verified != request.parent {
            try? store.removeImage(verified, force: false)
        }
        check.verifiedImage = nil
        result.status = .passed
        result.resultImage = hit.resultImage
        try await collectArtifacts(
            node, image: hit.resultImage, workdir: workdir, passed: true, log: log, into: &result)
        await readTestReports(node, image: hit.resultImage, workdir: workdir, log: log, into: &result)
    }

    /// `flaky-check: N`: runs a failed step N more times at once, each from the same parent
    /// snapshot with a log of its own (`NODE.flaky-I.log`), and tells flaky (some passed) from
    /// deterministic (none did). - Returns: the verdict, and the first rerun that passed.
    private func flakeCheck(
        _ node: PlanNode, _ failedRequest: StepRequest, reruns: Int, secrets: [String: String], log: StepLog
    ) async throws -> (FlakeCheck, StepOutcome?) {
        try Task.checkCancellation()
        log.note("flaky-check: the step failed; running it \(reruns) more times from the same parent snapshot")
        var single = failedRequest
        single.attempts = 1
        single.retry = RetryPolicy(max: 0)
        let request = single
        let outcomes = try await withThrowingTaskGroup(of: (Int, StepOutcome, String).self) { group in
            for index in 1...reruns {
                group.addTask { [steps, outDir] in
                    let name = "logs/\(node.fileName).flaky-\(index).log"
                    let rerunLog = StepLog(path: outDir + "/" + name, secrets: secrets)
                    defer { rerunLog.close() }
                    return (index, try await steps.runUnshared(request, log: rerunLog), name)
                }
            }
            var all: [(Int, StepOutcome, String)] = []
            for try await outcome in group { all.append(outcome) }
            return all.sorted { $0.0 < $1.0 }
        }
        try Task.checkCancellation()
        let passing = outcomes.first { $0.1.record.exitCode == 0 }?.1
        let passed = outcomes.filter { $0.1.record.exitCode == 0 }.count
        let check = FlakeCheck(
            verdict: passed > 0 ? .flaky : .deterministic, reruns: reruns, passed: passed,
            allowed: passed > 0 && plan.definition.step(node.step)?.allowFlaky == true,
            runs: outcomes.map { _, outcome, name in
                FlakeCheck.Run(
                    exitCode: outcome.record.exitCode, signal: outcome.record.signal,
                    timedOut: outcome.record.timedOut, wallSeconds: outcome.record.metrics.wallSeconds,
                    snapshot: outcome.record.resultImage, log: name)
            })
        log.note(
            "flaky-check: \(passed) of \(reruns) reruns passed: \(check.verdict.rawValue)"
                + " (exit statuses: \(outcomes.map { $0.1.record.exitCode.map(String.init) ?? "killed" }.joined(separator: ", ")); logs: \(outcomes.map(\.2).joined(separator: ", ")))"
        )
        return (check, passing)
    }

    /// Reads the step's JUnit files (`reports: {junit: ...}`) out of its snapshot, passed or
    /// failed. What cannot be read (no match, bad XML, too large) is a note in the log and the
    /// report, never a failure.
    private func readTestReports(
        _ node: PlanNode, image: String, workdir: String, log: StepLog, into result: inout NodeResult
    ) async {
        let patterns = plan.definition.step(node.step)?.junitReports.map(\.value) ?? []
        guard !patterns.isEmpty else { return }
        let collector = ArtifactCollector(store: engine.store, outDir: outDir)
        var tests = TestResults()
        do {
            let (files, missing) = try await BlockingPool.files.run {
                try collector.readFiles(patterns, from: image, workdir: workdir, limit: TestResults.fileLimit)
            }
            for (path, contents) in files {
                guard let contents else {
                    tests.note("\(path) is larger than \(ByteCount.format(Int64(TestResults.fileLimit))); not read")
                    continue
                }
                tests.read(contents, file: path)
            }
            for pattern in missing { tests.note("reports.junit '\(pattern)' matched nothing in the snapshot") }
        } catch {
            tests.note("the test reports could not be read: \(error)")
        }
        for note in tests.notes ?? [] { log.note(note) }
        if tests.total > 0 {
            log.note(
                "tests: \(tests.total) in \(Plural.count(tests.files.count, "report")): \(tests.passed) passed, \(tests.failed) failed, \(tests.errors) errors, \(tests.skipped) skipped"
            )
        }
        result.tests = tests
    }

    /// The image each of the node's services starts from: the snapshot its `from` names, its
    /// own `image` (`resolve`), or the pipeline's.
    static func serviceImages(
        _ node: PlanNode, results: ResultTable, base: ImageRecord, store: Store,
        resolve: (Located<String>) throws -> ImageRecord
    ) throws -> [ImageRecord] {
        try node.services.map { service in
            if let source = service.source {
                guard let uuid = results[source]?.resultImage, let image = try store.image(uuid) else {
                    throw PipelineError(
                        .failed,
                        "service \(service.definition.name.value) starts from \(source), which left no snapshot")
                }
                return image
            }
            return try service.definition.image.map(resolve) ?? base
        }
    }

    /// The services' part of the step key: name, image digest, command, environment, check.
    static func serviceKey(_ node: PlanNode, images: [ImageRecord]) -> [String]? {
        guard !node.services.isEmpty else { return nil }
        return zip(node.services, images).map { service, image in
            let definition = service.definition
            let env = definition.env.sorted { $0.name < $1.name }.map { "\($0.name)=\($0.value)" }
            return
                ([definition.name.value, StepKeyComponents.imageDigest(image), "sh -c " + definition.run] + env
                + (definition.ready.map { ["ready: " + $0] } ?? [])).joined(separator: " ")
        }
    }

    /// The node's services, rendered: image, command, environment and log.
    func serviceRequests(_ node: PlanNode, images: [ImageRecord]) -> [ServiceRequest] {
        zip(node.services, images).map { service, image in
            let definition = service.definition
            return ServiceRequest(
                name: definition.name.value, image: image.uuid, command: ["sh", "-c", definition.run],
                environment: Dictionary(definition.env.map { ($0.name, $0.value) }, uniquingKeysWith: { $1 }),
                ready: definition.ready.map { ["sh", "-c", $0] }, readyTimeout: definition.readyTimeout,
                logPath: outDir + "/logs/" + node.fileName + "." + definition.name.value + ".log")
        }
    }

    static func describe(_ record: RunRecord) -> String {
        if record.timedOut { return "timed out after \(record.metrics.wallSeconds.formatted(digits: 1)) s" }
        if record.oomKilled { return "ran out of memory and was killed" }
        if let signal = record.signal { return "killed by signal \(signal)" }
        return "exited with status \(record.exitCode ?? -1)"
    }

    /// `KEY=value` lines; anything else is reported in the log and ignored.
    static func parseOutputs(_ bytes: [UInt8], log: StepLog) -> [String: String] {
        var outputs: [String: String] = [:]
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            guard let eq = line.firstIndex(of: "="),
                Identifiers.isEnvironmentName(String(line[..<eq]))
                    || Identifiers.isStepID(String(line[..<eq]))
            else {
                if !String(line).trimmingWhitespace.isEmpty {
                    log.note("ignored a line of $CONTREE_OUTPUT (not KEY=value): \(line)")
                }
                continue
            }
            outputs[String(line[..<eq])] = String(line[line.index(after: eq)...])
        }
        return outputs
    }

    private func collectArtifacts(
        _ node: PlanNode, image: String, workdir: String, passed: Bool, log: StepLog, into result: inout NodeResult
    ) async throws {
        let wanted = node.artifacts.filter {
            $0.when == .always || ($0.when == .success && passed) || ($0.when == .failure && !passed)
        }
        guard !wanted.isEmpty else { return }
        // Copying (or linking) files out of the snapshot blocks: on the pool for disk work.
        let collector = ArtifactCollector(store: engine.store, outDir: outDir, cache: cache)
        let (records, missing) = try await BlockingPool.files.run {
            try collector.collect(wanted.map(\.pattern.value), from: image, workdir: workdir, node: node)
        }
        result.artifacts = records
        guard !missing.isEmpty else { return }
        result.missingArtifacts = missing
        for pattern in missing { log.note("artifact '\(pattern)' matched nothing in the snapshot") }
        if passed && options.strictArtifacts {
            throw PipelineError(
                .failed,
                "artifact \(missing.map { "'\($0)'" }.joined(separator: ", ")) matched nothing in the snapshot of \(node.id), and --strict-artifacts is set"
            )
        }
    }

    // MARK: Selection among fork variants

    private func executeSelect(
        _ node: PlanNode, results: ResultTable, context: ExecutionContext, log: StepLog,
        into result: inout NodeResult
    ) async throws {
        guard let select = node.select else { return }
        if options.failOnCacheMiss, let missed = node.variantNodes.first(where: { results[$0]?.strictFailure == true })
        {
            throw CacheMissError(
                "variant \(missed) is not cached and --fail-on-cache-miss is set: no selection can be trusted")
        }
        var outcomes: [VariantOutcome] = []
        for id in node.variantNodes {
            guard let variant = results[id], let variantNode = plan.node(id) else { continue }
            var outcome = VariantOutcome(
                variant: variantNode.variant ?? id, node: id, status: variant.status, score: nil, kept: false, note: nil
            )
            if variant.status != .passed || variant.resultImage == nil {
                outcome.note = "did not succeed"
                outcomes.append(outcome)
                continue
            }
            if let scoreTemplate = select.score {
                // The score sees what the variant saw: its env, where it ran.
                let env = StepPreparer(plan: plan).environment(variantNode, results: results)
                let scope = NodeScope(
                    node: variantNode, plan: plan, results: results, env: env, pipelineName: plan.definition.name,
                    cancelled: false)
                let command =
                    (node.settings.shell ?? PipelineRunner.defaultShell) + ["-c", scoreTemplate.render(in: scope)]
                let image = try engine.store.image(variant.resultImage!)
                // The score runs where the variant ran.
                let workdir = InputResolver.normalize(
                    variantNode.settings.workdir?.render(in: scope) ?? PipelineRunner.defaultWorkdir)
                let isolation = variantNode.settings.isolation ?? .container
                let scoreKey = ScoreKeyComponents(
                    image: image.map(StepKeyComponents.imageDigest) ?? "", command: command, env: env,
                    workdir: workdir, isolation: isolation.rawValue
                ).key
                let text: String
                let reuse = !options.noCache && !forced.withLock { $0.contains(node.id) }
                if reuse, let cached = try cache.score(scoreKey) {
                    text = cached
                } else if reuse, let shared = await sharedScore(scoreKey, log: log) {
                    text = shared
                } else {
                    if options.failOnCacheMiss {
                        throw CacheMissError(
                            "the score of \(outcome.variant) is not cached and --fail-on-cache-miss is set")
                    }
                    let run = try await engine.run(
                        RunSpec(
                            image: variant.resultImage!, command: command, env: env, cwd: workdir,
                            timeout: node.settings.timeout ?? 600,
                            disposable: true, stdout: .capture(limit: 1 << 16),
                            stderr: .capture(limit: 0, onChunk: { log.append($0) }), isolation: isolation))
                    if run.record.cancelled { throw CancellationError() }
                    guard run.record.exitCode == 0 else {
                        outcome.note = "the score command \(PipelineRunner.describe(run.record))"
                        log.note("\(outcome.variant): \(outcome.note!)")
                        outcomes.append(outcome)
                        continue
                    }
                    text = String(decoding: run.stdout, as: UTF8.self)
                    try cache.rememberScore(scoreKey, text)
                }
                scoresUsed.withLock { $0[scoreKey] = text }
                let last = text.split(separator: "\n").last.map { String($0).trimmingWhitespace } ?? ""
                guard let score = Double(last) else {
                    outcome.note = "the score command printed '\(last.prefix(40))', not a number"
                    log.note("\(outcome.variant): \(outcome.note!)")
                    outcomes.append(outcome)
                    continue
                }
                outcome.score = score
                log.note("\(outcome.variant): score \(score)")
            }
            outcomes.append(outcome)
        }
        let candidates = outcomes.indices.filter {
            outcomes[$0].status == .passed && outcomes[$0].note == nil
                && (select.score == nil || outcomes[$0].score != nil)
        }
        var kept: [Int] = []
        switch select.keep {
        case .all: kept = candidates
        case .firstSuccess: kept = Array(candidates.prefix(1))
        case .best:
            if let best = candidates.max(by: { a, b in
                let x = outcomes[a].score ?? 0
                let y = outcomes[b].score ?? 0
                // max(by:) keeps the last of equals: compare so that the first in file order wins.
                return select.higherIsBetter ? (x < y || (x == y && a > b)) : (x > y || (x == y && a > b))
            }) {
                kept = [best]
            }
        }
        for i in outcomes.indices where !kept.contains(i) && outcomes[i].note == nil {
            outcomes[i].note = select.keep == .firstSuccess ? "a variant before it succeeded" : "lower score"
        }
        for i in kept { outcomes[i].kept = true }
        result.variants = outcomes
        guard !kept.isEmpty else {
            result.status = .failed
            result.reason = "no variant of \(node.step) succeeded"
            return
        }
        result.status = .passed
        if select.keep != .all, let first = kept.first {
            result.resultImage = results[outcomes[first].node]?.resultImage
            result.outputs = results[outcomes[first].node]?.outputs ?? [:]
            result.parentImage = result.resultImage
            log.note("kept \(outcomes[first].variant)")
        }
        result.cached = outcomes.allSatisfy { results[$0.node]?.cached ?? false }
    }
}

/// `--fail-on-cache-miss` met a step that would run: a failure nothing excuses.
struct CacheMissError: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

extension Double {
    func formatted(digits: Int) -> String { String(format: "%.\(digits)f", self) }
}
