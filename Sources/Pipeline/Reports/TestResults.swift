import Foundation

#if canImport(FoundationXML)
    import FoundationXML
#endif

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
        let parser = XMLParser(data: data)
        parser.delegate = reader
        parser.shouldResolveExternalEntities = false
        let parsed = parser.parse()
        // libxml2 takes a file cut short (a runner killed mid-write) without complaint.
        let cutShort = parsed && reader.depth > 0
        guard parsed, !cutShort, reader.sawSuiteOrCase else {
            let why =
                cutShort
                ? "it ends inside <\(reader.openElement)>: cut short?"
                : !parsed
                    ? "line \(parser.lineNumber): not well-formed XML"
                    : "it has no <testsuite> or <testcase>"
            note("\(file) is not a JUnit report (\(why)); its tests are not counted")
            return
        }
        for testCase in reader.cases { add(testCase) }
    }
}

/// A SAX reader of JUnit XML: cases with their suite, outcome, message and text.
private final class JUnitReader: NSObject, XMLParserDelegate {
    let file: String
    var cases: [TestCaseResult] = []
    var sawSuiteOrCase = false
    private var suites: [String] = []
    /// Elements open at this point, and the innermost.
    var depth = 0
    var openElement = ""
    private var current: TestCaseResult?
    /// Inside a `<failure>`, `<error>` or `<skipped>` of the current case: its text.
    private var text: String?

    init(file: String) {
        self.file = file
    }

    func parser(
        _ parser: XMLParser, didStartElement element: String, namespaceURI: String?, qualifiedName: String?,
        attributes: [String: String] = [:]
    ) {
        depth += 1
        openElement = element
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
            text = ""
        default:
            break
        }
    }

    func parser(_ parser: XMLParser, foundCharacters string: String) {
        if text != nil, text!.utf8.count < TestResults.detailLimit { text! += string }
    }

    func parser(_ parser: XMLParser, foundCDATA block: Data) {
        if text != nil, text!.utf8.count < TestResults.detailLimit { text! += String(decoding: block, as: UTF8.self) }
    }

    func parser(_ parser: XMLParser, didEndElement element: String, namespaceURI: String?, qualifiedName: String?) {
        depth -= 1
        switch element {
        case "testsuite":
            _ = suites.popLast()
        case "testcase":
            if let done = current { cases.append(done) }
            current = nil
        case "failure", "error", "skipped":
            if let body = text?.trimmingCharacters(in: .whitespacesAndNewlines), !body.isEmpty, current != nil,
                current!.detail == nil
            {
                current!.detail = String(body.utf8.prefix(TestResults.detailLimit)) ?? String(body.prefix(1024))
            }
            text = nil
        default:
            break
        }
    }
}
