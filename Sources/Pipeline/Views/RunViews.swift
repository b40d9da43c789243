import Foundation
import Synchronization
import SystemSupport

/// Where a view writes (stdout by default; tests capture it).
public final class ViewOutput: Sendable {
    private let fd: Int32
    private let lock = Mutex(())

    public init(fd: Int32 = 1) {
        self.fd = fd
    }

    public func write(_ text: String) {
        // A view that cannot write (a closed terminal) shows nothing more; the run goes on.
        lock.withLock { _ in try? FileSystem.writeAll(fd: fd, Array(text.utf8), path: "the run's view") }
    }

    public var isTerminal: Bool { isatty(fd) == 1 }
}

/// Picks the view for where the output goes: log groups inside GitHub Actions or GitLab CI,
/// a live view on a terminal, plain timestamped lines otherwise.
public enum RunViews {
    public static func make(
        output: ViewOutput = ViewOutput(), environment: [String: String] = ProcessInfo.processInfo.environment
    )
        -> any RunObserver
    {
        if environment["GITHUB_ACTIONS"] == "true" { return LineView(output: output, groups: .github) }
        if environment["GITLAB_CI"] == "true" { return LineView(output: output, groups: .gitlab) }
        if output.isTerminal { return TerminalView(output: output) }
        return LineView(output: output, groups: nil)
    }

    static func icon(_ result: NodeResult) -> String {
        if result.cached && result.status == .passed { return "⟲" }
        switch result.status {
        case .passed: return "✔"
        case .failed: return result.failsPipeline ? "✘" : "!"
        case .skipped: return "–"
        case .cancelled: return "■"
        case .running: return "▶"
        case .pending: return "·"
        }
    }

    static func state(_ result: NodeResult) -> String {
        if result.cached && result.status == .passed { return "cached" }
        if result.toleratedFailure { return "failed (continued)" }
        return result.status.rawValue
    }

    /// `on n2 (slurm job 41)`
    static func describe(_ placement: Placement) -> String {
        "on \(placement.node ?? "?")" + (placement.jobID.map { " (\(placement.executor) job \($0))" } ?? "")
    }

    static func seconds(_ value: Double?) -> String {
        guard let value else { return "" }
        return value < 10 ? String(format: "%.2f s", value) : String(format: "%.1f s", value)
    }

    /// The table printed at the end of every run, then the tails of failed steps' logs.
    static func summary(_ report: RunReport) -> String {
        // A column for the machine when any step ran elsewhere.
        let placed = report.nodes.contains { $0.executorNode != nil }
        let header = ["step", "state", "time", "exit", "cpu", "peak memory", "snapshot"] + (placed ? ["node"] : [])
        let rows = report.nodes.map { n -> [String] in
            let m = n.metrics
            let cells: [String] = [
                n.node, state(n), seconds(n.duration), n.exitCode.map(String.init) ?? "",
                m.map { seconds($0.cpuUserSeconds + $0.cpuSystemSeconds) } ?? "",
                m.map { ByteCount.format($0.peakMemoryBytes) } ?? "", String(n.resultImage?.prefix(8) ?? ""),
            ]
            return placed ? cells + [n.executorNode ?? ""] : cells
        }
        var widths = header.map(\.count)
        for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in c + String(repeating: " ", count: widths[i] - c.count) }.joined(
                separator: "  "
            )
            .trimmingWhitespace
        }
        var text = "\n" + line(header) + "\n" + rows.map(line).joined(separator: "\n") + "\n"
        var warnings = ""
        for n in report.nodes where n.status == .passed {
            for pattern in n.missingArtifacts ?? [] {
                warnings += "warning: \(n.node): artifact '\(pattern)' matched nothing in its snapshot\n"
            }
        }
        for note in report.notes { warnings += "note: \(note)\n" }
        for n in report.nodes { for note in n.tests?.notes ?? [] { warnings += "note: \(n.node): \(note)\n" } }
        if !warnings.isEmpty { text += "\n" + warnings }
        let verified = report.nodes.compactMap(\.verification)
        if !verified.isEmpty {
            let count = { (verdict: Verification.Verdict) in verified.filter { $0.verdict == verdict }.count }
            text +=
                "\nverify: \(Plural.count(verified.count, "cached step")) run again from the same parent: \(count(.identical)) identical, \(count(.sameFiles)) the same files (only times differ), \(count(.differs)) differ, \(count(.failed)) failed\n"
        }
        for n in report.nodes {
            guard let check = n.flakeCheck else { continue }
            text +=
                "\nflaky-check: \(n.node) is \(check.verdict.rawValue): \(check.passed) of \(check.reruns) reruns from the same snapshot passed"
                + (check.allowed
                    ? " (allow-flaky: it passes)"
                    : check.verdict == .flaky ? " (it still fails: allow-flaky: true would let it pass)" : "")
                + "\n"
        }
        let tested = report.nodes.compactMap { n in n.tests.map { (n.node, $0) } }.filter { $0.1.total > 0 }
        if !tested.isEmpty {
            let all = tested.map(\.1)
            let sum = { (count: (TestResults) -> Int) in all.map(count).reduce(0, +) }
            text +=
                "\ntests: \(sum(\.total)) in \(Plural.count(tested.count, "step")): \(sum(\.passed)) passed, \(sum(\.failed)) failed, \(sum(\.errors)) errors, \(sum(\.skipped)) skipped\n"
            let failing = tested.flatMap { node, tests in tests.failing.map { (node, $0) } }
            for (node, c) in failing.prefix(20) {
                let name = [c.classname ?? c.suite, c.name].filter { !$0.isEmpty }.joined(separator: ".")
                text += "  ✘ \(node): \(name)\(c.message.map { ": " + $0 } ?? "")\n"
            }
            if failing.count > 20 { text += "  … \(failing.count - 20) more failing tests in report.html\n" }
        }
        for n in report.nodes where n.status == .failed {
            text += "\n── \(n.node): \(n.reason ?? "failed") ──\n"
            if let log = n.log, let data = FileManager.default.contents(atPath: report.outDir + "/" + log) {
                let lines = String(decoding: data, as: UTF8.self).split(
                    separator: "\n", omittingEmptySubsequences: false)
                text += lines.suffix(20).joined(separator: "\n") + "\n"
            }
        }
        let counts = report.counts
        text += "\n\(report.pipeline): \(report.status.rawValue.uppercased()) in \(seconds(report.duration)) — "
        let failed = report.nodes.filter(\.failsPipeline).count
        let tolerated = (counts[.failed] ?? 0) - failed
        text += "\((counts[.passed] ?? 0) - report.cachedCount) ran, \(report.cachedCount) cached, \(failed) failed, "
        text += "\(counts[.skipped] ?? 0) skipped"
        if tolerated > 0 {
            text += " (\(tolerated) failure\(tolerated == 1 ? "" : "s") tolerated: fork variants or continue-on-error)"
        }
        if (counts[.cancelled] ?? 0) > 0 { text += ", \(counts[.cancelled]!) cancelled" }
        text += "\nreports: \(report.outDir)/report.html\n"
        return text
    }
}

/// Plain lines with timestamps, optionally with each finished step's log in a collapsible
/// CI group.
final class LineView: RunObserver {
    enum Groups {
        case github, gitlab
    }

    let output: ViewOutput
    let groups: Groups?
    private let outDir = Mutex<String>("")

    init(output: ViewOutput, groups: Groups?) {
        self.output = output
        self.groups = groups
    }

    static func timestamp() -> String {
        UTCTime.iso8601(secondsSince1970: UTCTime.now)
    }

    func handle(_ event: RunEvent) {
        switch event {
        case .started(let runID, let plan, let dir):
            outDir.withLock { $0 = dir }
            output.write(
                "\(LineView.timestamp()) run \(runID) of \(plan.definition.name): \(Plural.count(plan.nodes.count, "step"))\n"
            )
        case .nodeStarted(let id):
            output.write("\(LineView.timestamp()) ▶ \(id) started\n")
        case .planExpanded(let plan):
            output.write(
                "\(LineView.timestamp()) ◆ a dynamic matrix expanded: \(Plural.count(plan.nodes.count, "step")) in all\n"
            )
        case .nodePlaced(let id, let placement):
            output.write("\(LineView.timestamp()) ▶ \(id) running \(RunViews.describe(placement))\n")
        case .nodeFinished(let result):
            var line = "\(LineView.timestamp()) \(RunViews.icon(result)) \(result.node) \(RunViews.state(result))"
            if let d = result.duration, result.status != .skipped { line += " in \(RunViews.seconds(d))" }
            if let node = result.executorNode { line += " on \(node)" }
            if let reason = result.reason { line += ": \(reason)" }
            if let kept = result.variants?.filter(\.kept).map(\.variant), !kept.isEmpty {
                line += " (kept \(kept.joined(separator: ", ")))"
            }
            guard let groups, let log = result.log, result.status != .skipped else {
                output.write(line + "\n")
                return
            }
            let text =
                (FileManager.default.contents(atPath: outDir.withLock { $0 } + "/" + log))
                .map { String(decoding: $0, as: UTF8.self) } ?? ""
            switch groups {
            case .github:
                output.write("::group::\(line)\n\(text)::endgroup::\n")
                if result.failsPipeline {
                    output.write("::error title=\(result.node) failed::\(result.reason ?? "failed")\n")
                }
            case .gitlab:
                let section = "contree_" + String(result.node.map { $0.isLetter || $0.isNumber ? $0 : "_" })
                let now = Int(Date().timeIntervalSince1970)
                let collapsed = result.status == .failed ? "false" : "true"
                output.write(
                    "\u{1B}[0Ksection_start:\(now):\(section)[collapsed=\(collapsed)]\r\u{1B}[0K\(line)\n\(text)\u{1B}[0Ksection_end:\(now):\(section)\r\u{1B}[0K\n"
                )
            }
        case .finished(let report):
            output.write(RunViews.summary(report))
        }
    }
}

/// A live view: one line per step (queued, running with elapsed time, cached, passed,
/// failed), redrawn in place, then the summary.
final class TerminalView: RunObserver {
    let output: ViewOutput
    private struct State {
        var order: [String] = []
        var started: [String: Date] = [:]
        /// Where running steps run (`on n2 (slurm job 41)`).
        var placed: [String: String] = [:]
        var results: [String: NodeResult] = [:]
        var drawnLines = 0
        var finished = false
        var title = ""
    }
    private let state = Mutex(State())
    private let ticker = Mutex<Task<Void, Never>?>(nil)

    init(output: ViewOutput) {
        self.output = output
    }

    func handle(_ event: RunEvent) {
        switch event {
        case .started(let runID, let plan, _):
            state.withLock {
                $0.order = plan.nodes.map(\.id)
                $0.title = "\(plan.definition.name) · run \(runID)"
            }
            let task = Task { [weak self] in
                while !Task.isCancelled {
                    self?.redraw()
                    try? await Task.sleep(for: .milliseconds(200))
                }
            }
            ticker.withLock { $0 = task }
        case .nodeStarted(let id):
            state.withLock { $0.started[id] = Date() }
        case .planExpanded(let plan):
            // A dynamic node gives way to its instances, in plan order.
            state.withLock { $0.order = plan.nodes.map(\.id) }
        case .nodePlaced(let id, let placement):
            state.withLock { $0.placed[id] = RunViews.describe(placement) }
        case .nodeFinished(let result):
            state.withLock { $0.results[result.node] = result }
        case .finished(let report):
            ticker.withLock { $0?.cancel() }
            redraw()
            state.withLock { $0.finished = true }
            output.write(RunViews.summary(report))
        }
    }

    private func redraw() {
        let text: String = state.withLock { state in
            guard !state.finished else { return "" }
            var lines = [state.title]
            let height = 40
            let ids = state.order
            for id in ids {
                if let result = state.results[id] {
                    var line = "\(RunViews.icon(result)) \(id)  \(RunViews.state(result))"
                    if let d = result.duration, result.status != .skipped { line += "  \(RunViews.seconds(d))" }
                    if let node = result.executorNode { line += "  on \(node)" }
                    lines.append(line)
                } else if let started = state.started[id] {
                    let placed = state.placed[id].map { " " + $0 } ?? ""
                    lines.append("▶ \(id)  running\(placed)  \(RunViews.seconds(Date().timeIntervalSince(started)))")
                } else if id.hasSuffix("*]") {
                    lines.append("· \(id)  dynamic: expands when what it reads ends")
                } else {
                    lines.append("· \(id)  queued")
                }
            }
            if lines.count > height {
                // Keep the title, what runs and the latest outcomes in view.
                let running = lines.filter { $0.hasPrefix("▶") }
                lines =
                    [lines[0]]
                    + Array(
                        (lines.dropFirst().filter { !$0.hasPrefix("▶") && !$0.hasPrefix("·") }.suffix(
                            height - 2 - running.count)) + running)
                    + ["… \(ids.count - state.results.count - running.count) queued"]
            }
            var out = ""
            if state.drawnLines > 0 { out += "\u{1B}[\(state.drawnLines)A" }
            out += "\u{1B}[J" + lines.joined(separator: "\n") + "\n"
            state.drawnLines = lines.count
            return out
        }
        if !text.isEmpty { output.write(text) }
    }
}
