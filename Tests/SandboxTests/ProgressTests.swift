import Foundation
import Glibc
import Testing

@testable import SystemSupport

@Suite("Progress of long work")
struct ProgressTests {
    func capture(terminal: Bool, _ body: (ProgressReporter) -> Void) throws -> String {
        var fds: [Int32] = [-1, -1]
        if terminal {
            var primary: Int32 = -1
            var secondary: Int32 = -1
            #expect(openpty(&primary, &secondary, nil, nil, nil) == 0)
            fds = [primary, secondary]
        } else {
            #expect(pipe(&fds) == 0)
        }
        body(ProgressReporter(fd: fds[1]))
        close(fds[1])
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fds[0], &buffer, buffer.count)
            if n <= 0 { break }
            out += buffer[0..<n]
        }
        close(fds[0])
        return String(decoding: out, as: UTF8.self)
    }

    @Test("plain timestamped lines when the output is not a terminal")
    func plainLines() throws {
        let text = try capture(terminal: false) { p in
            p.report("debian:bookworm", "Retrieving Release", elapsed: 1)
            p.finish("debian:bookworm", "built")
        }
        let lines = text.split(separator: "\n")
        #expect(lines.count == 2)
        #expect(lines[0].hasSuffix("[debian:bookworm] Retrieving Release"))
        #expect(lines[0].first?.isNumber == true && lines[0].contains("T") && !text.contains("\u{1B}"))
    }

    @Test("one rewritten status line on a terminal")
    func terminalLine() throws {
        let text = try capture(terminal: true) { p in
            p.report("debian:bookworm", "Retrieving Release", elapsed: 3)
            p.report("debian:bookworm", "Extracting base-files", elapsed: 9)
        }
        #expect(text.contains("\r\u{1B}[2K[debian:bookworm 3s] Retrieving Release"))
        #expect(text.contains("\r\u{1B}[2K[debian:bookworm 9s] Extracting base-files"))
        #expect(!text.contains("\n"))
    }
}
