import ContreeTestSupport
import Foundation
import Testing

@testable import Pipeline

/// A step that does not run (its `if:` is false, or it was cancelled) leaves the workspace as it
/// was: the steps after it start from the nearest snapshot before it, as in a GitHub Actions job.
@Suite("Steps that do not run", .requiresRoot)
struct SkippedStepTests {
    @Test("a step skipped by if: passes its parent's snapshot on; the steps after it and an always() cleanup run")
    func skippedByCondition() async throws {
        let w = try Workspace()
        let report = try await w.run(
            """
            env:
              DEPLOY: "no"
            steps:
              - id: build
                run: echo built > /built; echo version=1 >> $CONTREE_OUTPUT
              - id: deploy
                if: env.DEPLOY == 'yes'
                run: echo deployed > /deployed; echo where=prod >> $CONTREE_OUTPUT
              - id: smoke
                run: cat /built; test ! -e /deployed; echo "where=[${{ steps.deploy.outputs.where }}]"
              - id: cleanup
                if: always()
                run: echo cleaned
            """)
        #expect(report.status == .passed)
        #expect(report.node("deploy")?.status == .skipped)
        #expect(report.node("deploy")?.outputs.isEmpty == true)
        #expect(report.node("deploy")?.resultImage == report.node("build")?.resultImage)
        #expect(report.node("smoke")?.status == .passed)
        #expect(report.log("smoke").contains("built"))
        #expect(report.log("smoke").contains("where=[]"))
        #expect(report.node("cleanup")?.status == .passed)
        #expect(report.log("cleanup").contains("cleaned"))
        // A skipped step changes no key: the rerun reuses everything but the cleanup (which
        // reacts to failures, so it runs every time).
        let again = try await w.run()
        #expect(again.ran == ["cleanup"])
        #expect(again.hits == ["build", "smoke"])
    }

    @Test("a step after a failure is skipped, and so is what comes from it; the failure still fails the run")
    func skippedAfterFailure() async throws {
        let w = try Workspace()
        let report = try await w.run(
            """
            env:
              PACKAGE: "yes"
            steps:
              - id: test
                run: exit 1
              - id: notify
                if: failure()
                run: echo notified
              - id: package
                if: env.PACKAGE != 'no'
                run: echo packaged
              - id: publish
                run: echo published
            """)
        #expect(report.status == .failed)
        #expect(report.node("notify")?.status == .passed)
        #expect(report.node("package")?.status == .skipped)
        #expect(report.node("package")?.resultImage == nil)
        #expect(report.node("publish")?.status == .skipped)
    }

    @Test("a cleanup step that comes from a step cancelled by Ctrl-C starts from the snapshot before it")
    func cleanupFromCancelled() async throws {
        let w = try Workspace()
        try w.write(
            "pipeline.yaml",
            """
            steps:
              - id: setup
                run: echo ready > /ready
              - id: long
                run: sleep 60.17
              - id: cleanup
                if: always()
                run: cat /ready
            """)
        let report = try await w.runCancelled(once: ["sleep", "60.17"])
        #expect(report.node("long")?.status == .cancelled)
        #expect(report.node("cleanup")?.status == .passed)
        #expect(report.node("cleanup")?.parentImage == report.node("setup")?.resultImage)
        #expect(report.log("cleanup").contains("ready"))
        #expect(report.log("cleanup").contains("long left no snapshot"))
    }
}
