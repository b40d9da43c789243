import Foundation

/// One test case a step's own test runner reported (`reports: {junit: ...}`).
public struct TestCaseResult: Sendable, Codable, Equatable {
    public enum Outcome: String, Sendable, Codable {
        case passed, failed, error, skipped
    }

    /// The enclosing `<testsuite>`'s name.
    public var suite: String
    public var classname: String?
    public var name: String
    public var outcome: Outcome
    public var seconds: Double?
    /// A failure's, error's or skip's `message`.
    public var message: String?
    /// The failure's text (a stack trace, an assertion), cut to `TestResults.detailLimit`.
    public var detail: String?
    /// The report file it came from, as a path in the step's snapshot.
    public var file: String
}

/// What a step's JUnit files said: every case, the counts, and notes on files that could not
/// be read (bad XML is a note, never a failure of the run).
public struct TestResults: Sendable, Codable, Equatable {
    public var files: [String] = []
    public var total = 0
    public var passed = 0
    public var failed = 0
    public var errors = 0
    public var skipped = 0
    public var cases: [TestCaseResult] = []
    /// Cases past `caseLimit` are counted but not listed.
    public var omittedCases: Int?
    public var notes: [String]?

    static let detailLimit = 4096
    static let caseLimit = 5000
    /// A report file larger than this is a note, not read.
    static let fileLimit = 32 << 20

    enum CodingKeys: String, CodingKey {
        case files, total, passed, failed, errors, skipped, cases, notes
        case omittedCases = "omitted_cases"
    }

    /// The failing cases (failures and errors).
    public var failing: [TestCaseResult] { cases.filter { $0.outcome == .failed || $0.outcome == .error } }

    mutating func add(_ testCase: TestCaseResult) {
        total += 1
        switch testCase.outcome {
        case .passed: passed += 1
        case .failed: failed += 1
        case .error: errors += 1
        case .skipped: skipped += 1
        }
        if cases.count < TestResults.caseLimit {
            cases.append(testCase)
        } else {
            omittedCases = (omittedCases ?? 0) + 1
        }
    }

    mutating func note(_ text: String) { notes = (notes ?? []) + [text] }

    /// Reads one JUnit XML file (`<testsuites>` or `<testsuite>` at the top, suites nested or
    /// not); a file that is not well-formed XML adds a note naming the line and keeps nothing
    /// of it.
    mutating func read(_ data: Data, file: String) {
        files.append(file)
        let reader = JUnitReader(file: file)
        var scanner = XMLScanner(Array(data))
        do {
            try scanner.scan(start: reader.start, text: reader.text, end: reader.end)
        } catch XMLScanner.Failure.cutShort(let element) {
            note(
                "\(file) is not a JUnit report (it ends inside \(element.isEmpty ? "a tag" : "<\(element)>"): cut short?); its tests are not counted"
            )
            return
        } catch XMLScanner.Failure.malformed(let line, let reason) {
            note(
                "\(file) is not a JUnit report (line \(line): not well-formed XML: \(reason)); its tests are not counted"
            )
            return
        } catch {
            note("\(file) is not a JUnit report (\(error)); its tests are not counted")
            return
        }
        guard reader.sawSuiteOrCase else {
            note("\(file) is not a JUnit report (it has no <testsuite> or <testcase>); its tests are not counted")
            return
        }
        for testCase in reader.cases { add(testCase) }
    }
}

/// A SAX reader of JUnit XML: cases with their suite, outcome, message and text.
private final class JUnitReader {
    let file: String
    var cases: [TestCaseResult] = []
    var sawSuiteOrCase = false
    private var suites: [String] = []
    private var current: TestCaseResult?
    /// Inside a `<failure>`, `<error>` or `<skipped>` of the current case: its text.
    private var body: String?

    init(file: String) {
        self.file = file
    }

    func start(_ element: String, _ attributes: [String: String]) {
        switch element {
        case "testsuite":
            sawSuiteOrCase = true
            suites.append(attributes["name"] ?? suites.last ?? "")
        case "testcase":
            sawSuiteOrCase = true
            current = TestCaseResult(
                suite: suites.last ?? "", classname: attributes["classname"], name: attributes["name"] ?? "",
                outcome: .passed, seconds: attributes["time"].flatMap(Double.init), message: nil, detail: nil,
                file: file)
        case "failure", "error", "skipped":
            guard current != nil else { return }
            let outcome: TestCaseResult.Outcome =
                element == "failure" ? .failed : element == "error" ? .error : .skipped
            // The worst outcome wins (a case may report a failure and an error).
            if current!.outcome == .passed || (current!.outcome == .skipped && outcome != .skipped) {
                current!.outcome = outcome
                current!.message = attributes["message"] ?? attributes["type"]
            }
            body = ""
        default:
            break
        }
    }

    func text(_ string: String) {
        if body != nil, body!.utf8.count < TestResults.detailLimit { body! += string }
    }

    func end(_ element: String) {
        switch element {
        case "testsuite":
            _ = suites.popLast()
        case "testcase":
            if let done = current { cases.append(done) }
            current = nil
        case "failure", "error", "skipped":
            if let trimmed = body?.trimmingCharacters(in: .whitespacesAndNewlines), !trimmed.isEmpty, current != nil,
                current!.detail == nil
            {
                current!.detail = String(trimmed.utf8.prefix(TestResults.detailLimit)) ?? String(trimmed.prefix(1024))
            }
            body = nil
        default:
            break
        }
    }
}
