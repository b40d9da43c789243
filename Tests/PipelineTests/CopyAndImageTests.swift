import ContreeTestSupport
import Foundation
import Testing

@testable import Pipeline

@Suite("Per-step images and copy fan-in", .requiresRoot)
struct CopyAndImageTests {
    static let fanIn = """
        steps:
          - id: build
            matrix: {os: [debian, alpine]}
            inputs: [noise.txt]
            run: |
              mkdir -p /out/app
              echo "built for ${{ matrix.os }}" > /out/app/bin
              cp noise.txt /tmp/noise
              # A rebuild writes the same bytes at another time.
              touch -t "202001010000.0$(cat noise.txt)" /out/app/bin
          - id: pack
            image: busybox
            copy:
              - {from: build, path: /out/app, to: "/dist/${{ matrix.os }}/"}
            run: find /dist -type f | sort; cat /dist/*/app/bin; test ! -e /out
          - id: one
            image: busybox
            copy: [{from: "build[os=alpine]", path: /out/app/bin, to: /only}]
            run: cat /only
        """

    @Test("copy packs every matrix instance into one step; its key takes the copied files, not the whole snapshot")
    func fanIn() async throws {
        let w = try Workspace()
        try w.write("noise.txt", "1\n")
        let first = try await w.run(CopyAndImageTests.fanIn)
        #expect(first.ran.sorted() == ["build[os=alpine]", "build[os=debian]", "one", "pack"])
        let log = first.log("pack")
        #expect(
            log.contains("/dist/alpine/app/bin\n/dist/debian/app/bin\nbuilt for alpine\nbuilt for debian"), "\(log)")
        #expect(first.log("one").contains("built for alpine"))
        #expect(try await w.run().hits.count == 4)
        // The builds rerun (their input changed) and leave the same /out/app: the copying steps hit.
        try w.write("noise.txt", "2\n")
        let third = try await w.run()
        #expect(third.ran.sorted() == ["build[os=alpine]", "build[os=debian]"])
        #expect(third.hits.sorted() == ["one", "pack"])
    }

    @Test("a step with image: starts a new root there, not from the previous step")
    func ownImage() async throws {
        let w = try Workspace()
        let report = try await w.run(
            """
            steps:
              - {id: first, run: "touch /marker"}
              - {id: second, image: busybox, run: "test ! -e /marker && echo fresh"}
              - {id: third, run: "test ! -e /marker && echo still-fresh"}
            """)
        #expect(report.failed.isEmpty)
        #expect(report.log("second").contains("fresh") && report.log("third").contains("still-fresh"))
    }

    @Test("a copy of a path the source lacks fails the step, naming the path; nothing after it runs")
    func missingPath() async throws {
        let w = try Workspace()
        let report = try await w.run(
            """
            steps:
              - {id: build, run: "mkdir -p /out"}
              - id: pack
                image: busybox
                copy: [{from: build, path: /out/missing, to: /x}]
                run: echo should-not-run
              - {id: after, run: "true"}
            """)
        #expect(report.node("pack")?.status == .failed)
        #expect(
            report.node("pack")?.reason?.contains("has no /out/missing") == true, "\(report.node("pack")?.reason ?? "")"
        )
        #expect(!report.log("pack").contains("should-not-run"))
        #expect(report.node("after")?.status == .skipped)
    }
}
