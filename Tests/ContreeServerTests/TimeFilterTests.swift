import Glibc
import SystemSupport
import Testing

@testable import ContreeServer

@Suite("Time filters and the token file")
struct TimeFilterTests {
    @Test("since/until accept Unix times, intervals, and ISO 8601 with or without a zone")
    func filters() throws {
        let now = 1_800_000_000.0
        #expect(try Timestamp.parseFilter("1700000000", name: "since", now: now) == 1_700_000_000)
        #expect(try Timestamp.parseFilter("15m", name: "since", now: now) == now - 900)
        #expect(try Timestamp.parseFilter("2w", name: "since", now: now) == now - 1_209_600)
        #expect(try Timestamp.parseFilter("2025-01-01T12:00:00+00:00", name: "since", now: now) == 1_735_732_800)
        #expect(try Timestamp.parseFilter("2025-01-01T12:00:00Z", name: "since", now: now) == 1_735_732_800)
        #expect(try Timestamp.parseFilter("2025-01-01T14:00:00+02:00", name: "since", now: now) == 1_735_732_800)
        // The SDK sends a naive local time with microseconds: read as UTC.
        #expect(try Timestamp.parseFilter("2025-01-01T12:00:00.500000", name: "until", now: now) == 1_735_732_800.5)
        // A '+' decoded from a query string arrives as a space.
        #expect(try Timestamp.parseFilter("2025-01-01T12:00:00 00:00", name: "since", now: now) == 1_735_732_800)
        for bad in ["yesterday", "15x", "2025-13-01", "2025-01-01T25:00"] {
            #expect(throws: APIError.self) { try Timestamp.parseFilter(bad, name: "since", now: now) }
        }
        #expect(Timestamp.iso(1_735_732_800.25) == "2025-01-01T12:00:00.250000+00:00")
    }

    @Test("a tokens file names its line when it is wrong")
    func tokens() throws {
        let path = "/tmp/contree-tokens-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(path) }
        let (created, isNew) = try TokenFile.loadOrCreate(path)
        #expect(isNew && created.tokens.count == 1 && created.tokens[0].secret.count == 48)
        try FileSystem.writeFile(path, Array("# c\nok 0123456789abcdef0123\nbad short\n".utf8))
        #expect {
            try TokenFile.load(path)
        } throws: { error in
            "\(error)".contains("\(path):3")
        }
        try FileSystem.writeFile(path, Array("a 0123456789abcdef0123 max_timeout=9\n".utf8))
        #expect(try TokenFile.load(path).token(for: "0123456789abcdef0123")?.maxTimeout == 9)
        #expect(try TokenFile.load(path).token(for: "0123456789abcdef012") == nil)
    }
}
