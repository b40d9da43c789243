import Foundation
import SystemSupport

/// `report.html`: one self-contained page (inline CSS and SVG, no scripts, no network) with
/// the DAG and each step's state, a timeline with CPU and memory, the forks' selections and
/// the step table.
struct HTMLReport {
    let report: RunReport
    let plan: PipelinePlan

    static let colors: [String: String] = [
        "passed": "#2e9d4f", "cached": "#2b7bb9", "failed": "#d0342c", "skipped": "#9aa0a6", "cancelled": "#e8890c",
        "pending": "#c9ccd1", "running": "#f2c94c", "flaky": "#b565c9",
    ]

    func state(_ node: NodeResult?) -> String {
        guard let node else { return "pending" }
        if node.cached && node.status == .passed { return "cached" }
        return node.status.rawValue
    }

    func render() -> String {
        let results = Dictionary(report.nodes.map { ($0.node, $0) }, uniquingKeysWith: { $1 })
        var html = """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8">
            <title>\(escape(report.pipeline)) — \(report.status.rawValue)</title>
            <style>
            body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1f2328;max-width:1200px}
            h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
            .muted{color:#656d76} table{border-collapse:collapse;width:100%} td,th{padding:4px 8px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
            th{font-weight:600;background:#f6f8fa} .badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px}
            code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace} .kept{font-weight:600}
            svg text{font:12px system-ui,sans-serif}
            </style></head><body>
            <h1>\(escape(report.pipeline)) <span class="badge" style="background:\(HTMLReport.colors[report.status == .passed ? "passed" : report.status == .failed ? "failed" : "cancelled"]!)">\(report.status.rawValue)</span></h1>
            <div class="muted">run <code>\(escape(report.runID))</code> · \(escape(report.file)) · \(String(format: "%.2f", report.duration)) s · \(Plural.count(report.nodes.count, "step")): \(summary()) · jobs \(report.jobs)</div>

            """
        html += "<h2>Graph</h2>\n" + graph(results) + "\n"
        html += "<h2>Timeline</h2>\n" + timeline() + "\n"
        let forks = report.nodes.filter { $0.variants != nil }
        if !forks.isEmpty {
            html += "<h2>Forks</h2>\n"
            for fork in forks {
                html +=
                    "<p><b>\(escape(fork.node))</b></p><table><tr><th>variant</th><th>status</th><th>score</th><th>kept</th><th>note</th></tr>\n"
                for v in fork.variants ?? [] {
                    html +=
                        "<tr class=\"\(v.kept ? "kept" : "")\"><td>\(escape(v.variant))</td><td>\(badge(v.status.rawValue))</td><td>\(v.score.map { String($0) } ?? "")</td><td>\(v.kept ? "✔ kept" : "")</td><td class=\"muted\">\(escape(v.note ?? ""))</td></tr>\n"
                }
                html += "</table>\n"
            }
        }
        html += tests()
        let checked = report.nodes.filter { $0.flakeCheck != nil }
        if !checked.isEmpty {
            html +=
                "<h2>Flake triage</h2>\n<table><tr><th>step</th><th>verdict</th><th>reruns passed</th><th>reruns</th></tr>\n"
            for n in checked {
                let check = n.flakeCheck!
                let runs = check.runs.map { run in
                    "<a href=\"\(escape(run.log))\">\(run.exitCode.map { "exit \($0)" } ?? "killed")</a>"
                }.joined(separator: " · ")
                html +=
                    "<tr><td><code>\(escape(n.node))</code></td><td>\(badge(check.verdict == .flaky ? "flaky" : "failed")) \(escape(check.verdict.rawValue))\(check.allowed ? " (allowed)" : "")</td><td>\(check.passed) of \(check.reruns)</td><td>\(runs)</td></tr>\n"
            }
            html += "</table>\n"
        }
        html +=
            "<h2>Steps</h2>\n<table><tr><th>step</th><th>state</th><th>time</th><th>exit</th><th>CPU</th><th>peak memory</th><th>change</th><th>key</th><th>snapshot</th><th>log</th><th>artifacts</th></tr>\n"
        for n in report.nodes {
            let m = n.metrics
            let cpu = m.map { String(format: "%.2f s", $0.cpuUserSeconds + $0.cpuSystemSeconds) } ?? ""
            let memory = m.map { ByteCount.format($0.peakMemoryBytes) } ?? ""
            let change = m.map { "\($0.diffFiles) files, \(ByteCount.format($0.diffBytes))" } ?? ""
            let artifacts = n.artifacts.map { "<a href=\"\(escape($0.file))\">\(escape($0.path))</a>" }.joined(
                separator: "<br>")
            html +=
                "<tr><td><code>\(escape(n.node))</code>\(n.reason.map { "<div class=\"muted\">\(escape($0))</div>" } ?? "")</td><td>\(badge(state(n)))</td><td>\(n.duration.map { String(format: "%.2f s", $0) } ?? "")</td><td>\(n.exitCode.map(String.init) ?? "")</td><td>\(cpu)</td><td>\(memory)</td><td>\(change)</td><td><code>\(escape(String(n.key?.dropFirst(7).prefix(12) ?? "")))</code></td><td><code>\(escape(String(n.resultImage?.prefix(8) ?? "")))</code></td><td>\(n.log.map { "<a href=\"\(escape($0))\">log</a>" } ?? "")</td><td>\(artifacts)</td></tr>\n"
        }
        html += "</table>\n</body></html>\n"
        return html
    }

    /// The steps' own test reports: counts per step, then every failing case with its message
    /// and text; notes on files that could not be read.
    func tests() -> String {
        let tested = report.nodes.filter { $0.tests != nil }
        guard !tested.isEmpty else { return "" }
        var html =
            "<h2>Tests</h2>\n<table><tr><th>step</th><th>tests</th><th>passed</th><th>failed</th><th>errors</th><th>skipped</th><th>reports</th></tr>\n"
        for n in tested {
            let t = n.tests!
            html +=
                "<tr><td><code>\(escape(n.node))</code></td><td>\(t.total)</td><td>\(t.passed)</td><td>\(t.failed > 0 ? badge("failed") + " " : "")\(t.failed)</td><td>\(t.errors)</td><td>\(t.skipped)</td><td class=\"muted\">\(t.files.map(escape).joined(separator: "<br>"))\((t.notes ?? []).map { "<div>\(escape($0))</div>" }.joined())</td></tr>\n"
        }
        html += "</table>\n"
        let failing = tested.flatMap { n in n.tests!.failing.map { (n.node, $0) } }
        if !failing.isEmpty {
            html += "<p><b>Failing tests</b></p><table><tr><th>step</th><th>test</th><th>message</th></tr>\n"
            for (node, c) in failing {
                let name = [c.classname ?? c.suite, c.name].filter { !$0.isEmpty }.joined(separator: ".")
                html +=
                    "<tr><td><code>\(escape(node))</code></td><td><code>\(escape(name))</code> \(badge(c.outcome == .error ? "error" : "failed"))</td><td>\(escape(c.message ?? ""))\(c.detail.map { "<pre><code>\(escape($0))</code></pre>" } ?? "")</td></tr>\n"
            }
            html += "</table>\n"
        }
        return html
    }

    func summary() -> String {
        var parts: [String] = []
        let counts = report.counts
        let cached = report.cachedCount
        let passed = (counts[.passed] ?? 0) - cached
        if passed > 0 { parts.append("\(passed) passed") }
        if cached > 0 { parts.append("\(cached) cached") }
        for status in [NodeStatus.failed, .skipped, .cancelled] where (counts[status] ?? 0) > 0 {
            parts.append("\(counts[status]!) \(status.rawValue)")
        }
        return parts.joined(separator: ", ")
    }

    func badge(_ state: String) -> String {
        "<span class=\"badge\" style=\"background:\(HTMLReport.colors[state] ?? "#999")\">\(escape(state))</span>"
    }

    /// The DAG as layered boxes: a node's column is one more than its deepest dependency's.
    func graph(_ results: [String: NodeResult]) -> String {
        var depth: [String: Int] = [:]
        for node in plan.nodes { depth[node.id] = (node.dependencies.compactMap { depth[$0] }.max() ?? -1) + 1 }
        var rows: [Int: Int] = [:]
        var position: [String: (x: Int, y: Int)] = [:]
        for node in plan.nodes {
            let column = depth[node.id] ?? 0
            let row = rows[column, default: 0]
            rows[column] = row + 1
            position[node.id] = (column, row)
        }
        let boxWidth = 170
        let boxHeight = 34
        let xGap = 60
        let yGap = 18
        let width = ((depth.values.max() ?? 0) + 1) * (boxWidth + xGap) + 20
        let height = max(1, rows.values.max() ?? 1) * (boxHeight + yGap) + 20
        func origin(_ id: String) -> (Int, Int) {
            let p = position[id] ?? (0, 0)
            return (10 + p.x * (boxWidth + xGap), 10 + p.y * (boxHeight + yGap))
        }
        var svg =
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(width)\" height=\"\(height)\" role=\"img\" aria-label=\"pipeline graph\">\n"
        for edge in report.edges {
            let (x1, y1) = origin(edge.from)
            let (x2, y2) = origin(edge.to)
            let dash = edge.kind == "needs" ? " stroke-dasharray=\"4 3\"" : ""
            svg +=
                "<path d=\"M\(x1 + boxWidth),\(y1 + boxHeight / 2) C\(x1 + boxWidth + xGap / 2),\(y1 + boxHeight / 2) \(x2 - xGap / 2),\(y2 + boxHeight / 2) \(x2),\(y2 + boxHeight / 2)\" fill=\"none\" stroke=\"#8c959f\"\(dash)/>\n"
        }
        for node in plan.nodes {
            let (x, y) = origin(node.id)
            let result = results[node.id]
            let fill = HTMLReport.colors[state(result)] ?? "#999"
            let kept = result?.variants?.first(where: \.kept).map { " → \($0.variant)" } ?? ""
            let label = String((node.id + kept).prefix(24))
            svg += "<g><title>\(escape(node.id)): \(state(result))\(result?.reason.map { " — " + $0 } ?? "")</title>"
            svg +=
                "<rect x=\"\(x)\" y=\"\(y)\" width=\"\(boxWidth)\" height=\"\(boxHeight)\" rx=\"6\" fill=\"\(fill)\" opacity=\"0.92\"/>"
            svg += "<text x=\"\(x + 8)\" y=\"\(y + 21)\" fill=\"#fff\">\(escape(label))</text></g>\n"
        }
        return svg + "</svg>"
    }

    /// Bars from each step's start to its end; the label carries CPU time and peak memory.
    func timeline() -> String {
        let timed = report.nodes.filter { $0.started != nil && $0.ended != nil }
        guard !timed.isEmpty else { return "<p class=\"muted\">No step ran.</p>" }
        let start = report.started.timeIntervalSince1970
        let total = max(0.001, report.ended.timeIntervalSince1970 - start)
        let labelWidth = 220
        let barWidth = 700
        let rowHeight = 22
        var svg =
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(labelWidth + barWidth + 260)\" height=\"\(timed.count * rowHeight + 30)\" role=\"img\" aria-label=\"timeline\">\n"
        for (i, n) in timed.enumerated() {
            let y = 10 + i * rowHeight
            let x0 = Double(labelWidth) + (n.started!.timeIntervalSince1970 - start) / total * Double(barWidth)
            let w = max(2, (n.ended!.timeIntervalSince(n.started!)) / total * Double(barWidth))
            let m = n.metrics
            let detail =
                m.map {
                    String(
                        format: "%.2f s wall, %.2f s CPU, %@", n.duration ?? 0, $0.cpuUserSeconds + $0.cpuSystemSeconds,
                        ByteCount.format($0.peakMemoryBytes))
                } ?? String(format: "%.2f s", n.duration ?? 0)
            svg += "<text x=\"0\" y=\"\(y + 14)\">\(escape(String(n.node.prefix(30))))</text>"
            svg +=
                "<rect x=\"\(String(format: "%.1f", x0))\" y=\"\(y + 2)\" width=\"\(String(format: "%.1f", w))\" height=\"\(rowHeight - 6)\" rx=\"3\" fill=\"\(HTMLReport.colors[state(n)] ?? "#999")\"><title>\(escape(n.node)): \(escape(detail))</title></rect>"
            svg +=
                "<text x=\"\(String(format: "%.1f", x0 + w + 6))\" y=\"\(y + 14)\" fill=\"#656d76\">\(escape(detail + (n.cached ? " (cached)" : "")))</text>\n"
        }
        svg += "<text x=\"\(labelWidth)\" y=\"\(timed.count * rowHeight + 26)\" fill=\"#656d76\">0 s</text>"
        svg +=
            "<text x=\"\(labelWidth + barWidth - 40)\" y=\"\(timed.count * rowHeight + 26)\" fill=\"#656d76\">\(String(format: "%.2f s", total))</text>\n"
        return svg + "</svg>"
    }
}
