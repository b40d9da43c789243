import Foundation
import SystemSupport

/// Writes a run's files: `report.json`, `metrics.csv`, `artifacts/manifest.json`,
/// `report.html` and, when asked, JUnit XML.
struct ReportWriter {
    let report: RunReport
    let plan: PipelinePlan

    func write(junitPath: String?) throws {
        let dir = report.outDir
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        try encoder.encode(report).write(to: URL(fileURLWithPath: dir + "/report.json"))
        try Data(csv().utf8).write(to: URL(fileURLWithPath: dir + "/metrics.csv"))
        let artifacts = report.nodes.flatMap(\.artifacts)
        if !artifacts.isEmpty {
            try FileManager.default.createDirectory(atPath: dir + "/artifacts", withIntermediateDirectories: true)
            try encoder.encode(artifacts).write(to: URL(fileURLWithPath: dir + "/artifacts/manifest.json"))
        }
        try Data(HTMLReport(report: report, plan: plan).render().utf8).write(
            to: URL(fileURLWithPath: dir + "/report.html"))
        if let junitPath {
            try Data(junit().utf8).write(to: URL(fileURLWithPath: junitPath))
        }
    }

    func csv() -> String {
        var lines = [
            "step,node,status,cached,exit_code,attempts,wall_seconds,cpu_user_seconds,cpu_system_seconds,peak_memory_bytes,bytes_read,bytes_written,processes,diff_files,diff_bytes,commit_seconds"
        ]
        func field(_ s: String) -> String {
            s.contains(where: { ",\"\n".contains($0) }) ? "\"" + s.replacing("\"", with: "\"\"") + "\"" : s
        }
        for n in report.nodes {
            let m = n.metrics
            let cells: [String] = [
                field(n.step), field(n.node), n.status.rawValue, n.cached ? "true" : "false",
                n.exitCode.map(String.init) ?? "",
                String(n.attempts), m.map { String($0.wallSeconds) } ?? "", m.map { String($0.cpuUserSeconds) } ?? "",
                m.map { String($0.cpuSystemSeconds) } ?? "", m.map { String($0.peakMemoryBytes) } ?? "",
                m.map { String($0.bytesRead) } ?? "", m.map { String($0.bytesWritten) } ?? "",
                m.map { String($0.processes) } ?? "", m.map { String($0.diffFiles) } ?? "",
                m.map { String($0.diffBytes) } ?? "", m.map { String($0.commitSeconds) } ?? "",
            ]
            lines.append(cells.joined(separator: ","))
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The run as JUnit: a suite of the steps (each a case), then a suite per step that read
    /// its tests' own reports (`reports: {junit: ...}`), named after the step, with its cases.
    func junit() -> String {
        let failures = report.nodes.filter { $0.failsPipeline }.count
        let skipped = report.nodes.filter { $0.status == .skipped || $0.status == .cancelled }.count
        let tested = report.nodes.filter { !($0.tests?.cases.isEmpty ?? true) }
        let cases = tested.map { $0.tests!.cases }
        let all = cases.joined()
        var xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        let time = String(format: "%.3f", report.duration)
        xml +=
            "<testsuites name=\"\(escape(report.pipeline))\" tests=\"\(report.nodes.count + all.count)\" failures=\"\(failures + all.filter { $0.outcome == .failed }.count)\" errors=\"\(all.filter { $0.outcome == .error }.count)\" skipped=\"\(skipped + all.filter { $0.outcome == .skipped }.count)\" time=\"\(time)\">\n"
        xml +=
            "  <testsuite name=\"\(escape(report.pipeline))\" tests=\"\(report.nodes.count)\" failures=\"\(failures)\" errors=\"0\" skipped=\"\(skipped)\" time=\"\(time)\" timestamp=\"\(UTCTime.iso8601(secondsSince1970: report.started.timeIntervalSince1970))\">\n"
        for n in report.nodes {
            let t = String(format: "%.3f", n.duration ?? 0)
            xml += "    <testcase classname=\"\(escape(report.pipeline))\" name=\"\(escape(n.node))\" time=\"\(t)\">\n"
            switch n.status {
            case .failed where n.failsPipeline:
                let tail = logTail(n)
                xml += "      <failure message=\"\(escape(n.reason ?? "failed"))\">\(escape(tail))</failure>\n"
            case .skipped, .cancelled:
                xml += "      <skipped message=\"\(escape(n.reason ?? n.status.rawValue))\"/>\n"
            default:
                if n.cached { xml += "      <properties><property name=\"cached\" value=\"true\"/></properties>\n" }
            }
            if let log = n.log {
                xml += "      <system-out>\(escape("log: " + report.outDir + "/" + log))</system-out>\n"
            }
            xml += "    </testcase>\n"
        }
        xml += "  </testsuite>\n"
        for (node, cases) in zip(tested, cases) {
            let count = { (outcome: TestCaseResult.Outcome) in cases.filter { $0.outcome == outcome }.count }
            let seconds = String(format: "%.3f", cases.compactMap(\.seconds).reduce(0, +))
            xml +=
                "  <testsuite name=\"\(escape(node.node))\" tests=\"\(cases.count)\" failures=\"\(count(.failed))\" errors=\"\(count(.error))\" skipped=\"\(count(.skipped))\" time=\"\(seconds)\">\n"
            for testCase in cases {
                let t = testCase.seconds.map { " time=\"\(String(format: "%.3f", $0))\"" } ?? ""
                xml +=
                    "    <testcase classname=\"\(escape(testCase.classname ?? testCase.suite))\" name=\"\(escape(testCase.name))\"\(t)"
                let message = testCase.message.map { " message=\"\(escape($0))\"" } ?? ""
                let body = escape(testCase.detail ?? "")
                switch testCase.outcome {
                case .passed: xml += "/>\n"
                case .failed: xml += ">\n      <failure\(message)>\(body)</failure>\n    </testcase>\n"
                case .error: xml += ">\n      <error\(message)>\(body)</error>\n    </testcase>\n"
                case .skipped: xml += ">\n      <skipped\(message)/>\n    </testcase>\n"
                }
            }
            xml += "  </testsuite>\n"
        }
        xml += "</testsuites>\n"
        return xml
    }

    func logTail(_ node: NodeResult) -> String {
        guard let log = node.log, let data = FileManager.default.contents(atPath: report.outDir + "/" + log) else {
            return ""
        }
        return String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).suffix(30)
            .joined(separator: "\n")
    }
}

func escape(_ text: String) -> String {
    var out = ""
    for c in text.unicodeScalars {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&#39;"
        default:
            // XML 1.0 forbids most control characters, even escaped.
            if c.value < 0x20 && c != "\n" && c != "\t" && c != "\r" {
                out += "?"
            } else {
                out.unicodeScalars.append(c)
            }
        }
    }
    return out
}
