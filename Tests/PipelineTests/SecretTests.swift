import ContreeTestSupport
import Foundation
import Testing

@testable import Pipeline

/// A secret of several lines is as secret as one of a line: it stays out of everything a run
/// keeps.
@Suite("Secrets stay out of what a run keeps", .requiresRoot)
struct SecretTests {
    static let key = """
        -----BEGIN OPENSSH PRIVATE KEY-----
        b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
        QyNTUxOQAAACDx3m9nUuJ5uWZ1fGk2mC0c1F7Zq0xXvWQ8Xn1aJpC0bQAAAJgc8vRxHPL0
        -----END OPENSSH PRIVATE KEY-----
        """

    @Test("every line of a multi-line secret is masked in the log, the console's tail and JUnit")
    func multiLineMasked() async throws {
        let w = try Workspace()
        try w.write("key.pem", Self.key + "\n")
        let junit = w.root + "/junit.xml"
        let report = try await w.run(
            """
            secrets:
              KEY: {file: key.pem}
            steps:
              - id: deploy
                secrets: [KEY]
                run: |
                  echo "$KEY"
                  printf '%s' "$KEY" | tail -n 2 | head -n 1
                  exit 1
            """, options: RunOptions(junitPath: junit))
        #expect(report.status == .failed)
        let log = report.log("deploy")
        let xml = try String(contentsOfFile: junit, encoding: .utf8)
        let json = try String(contentsOfFile: report.outDir + "/report.json", encoding: .utf8)
        for line in Self.key.split(separator: "\n") {
            #expect(!log.contains(line), "the log shows \(line)")
            #expect(!xml.contains(line), "JUnit shows \(line)")
            #expect(!json.contains(line))
        }
        #expect(log.contains("***"))
    }

    @Test("an output that holds a secret, or a line of one, is not stored: the step fails and says why")
    func outputRefused() async throws {
        let w = try Workspace()
        try w.write("key.pem", Self.key + "\n")
        let report = try await w.run(
            """
            secrets:
              KEY: {file: key.pem}
              TOKEN: {env: TEST_TOKEN}
            steps:
              - id: leak
                secrets: [KEY, TOKEN]
                run: |
                  echo "fine=yes" >> $CONTREE_OUTPUT
                  echo "$KEY" | sed -n 2p | sed 's/^/first=/' >> $CONTREE_OUTPUT
            """, options: RunOptions(environment: ["TEST_TOKEN": "hunter2-secret"]))
        #expect(report.node("leak")?.status == .failed)
        #expect(report.node("leak")?.outputs.isEmpty == true)
        #expect(report.node("leak")?.reason?.contains("output first holds the secret KEY") == true)
        let json = try String(contentsOfFile: report.outDir + "/report.json", encoding: .utf8)
        #expect(!json.contains("b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"))
        let token = try await w.run(
            """
            secrets:
              TOKEN: {env: TEST_TOKEN}
            steps:
              - id: token
                secrets: [TOKEN]
                run: echo "token=Bearer $TOKEN" >> $CONTREE_OUTPUT
            """, options: RunOptions(environment: ["TEST_TOKEN": "hunter2-secret"]))
        #expect(token.node("token")?.status == .failed)
        #expect(token.node("token")?.reason?.contains("output token holds the secret TOKEN") == true)
        #expect(
            !(try String(contentsOfFile: token.outDir + "/report.json", encoding: .utf8)).contains("hunter2-secret"))
    }
}
