import FoundationEssentials
import Glibc
import Hummingbird
import ImageFormats
import SystemSupport

extension ServerState {
    /// `GET /v1/inspect/{uuid}/grep`: searches file contents with POSIX extended regular
    /// expressions (patterns OR-ed), skipping binary files and never following symlinks. Files
    /// are read as streams, lines are capped, and one request scans at most `GrepSearch.maxScan`
    /// bytes.
    func grep(_ call: APICall, _ uuid: String) async throws -> Response {
        let record = try api.visibleImage(uuid, namespace: call.namespace)
        let patterns = call.params("pattern")
        guard !patterns.isEmpty else { throw APIError(.badRequest, "pattern is required (it may be repeated)") }
        guard patterns.count <= 16, patterns.allSatisfy({ !$0.isEmpty && $0.utf8.count <= 1024 }) else {
            throw APIError(.badRequest, "at most 16 patterns of 1 to 1024 characters each")
        }
        for pattern in patterns { try GrepSearch.check(pattern) }
        let roots = call.params("path").isEmpty ? ["/"] : call.params("path")
        guard roots.count <= 16 else { throw APIError(.badRequest, "at most 16 paths") }
        let globs = call.params("glob")
        let limits = GrepSearch.Limits(
            maxCount: try call.intParam("max_count", default: 10000, range: 1...10000),
            maxTotal: try call.intParam("max_total", default: 1000, range: 1...10000),
            before: try call.intParam("before", default: 0, range: 0...50),
            after: try call.intParam("after", default: 0, range: 0...50))
        let mode = call.param("case") ?? "sensitive"
        guard ["sensitive", "insensitive", "smart"].contains(mode) else {
            throw APIError(.badRequest, "case must be sensitive, insensitive or smart")
        }
        let ignoreCase =
            mode == "insensitive" || (mode == "smart" && !patterns.contains { $0.contains(where: \.isUppercase) })
        let fs = ImageFilesystem(layersTopFirst: record.layers.reversed().map(api.store.layerPath))
        var found: [ImageFilesystem.Node] = []
        for root in roots {
            guard root.hasPrefix("/") else { throw APIError(.badRequest, "path '\(root)' must be absolute") }
            let node: ImageFilesystem.Node?
            do {
                node = try fs.lookup(root, followFinal: false)
            } catch let error as SandboxError where error.code == .pathEscapes {
                throw APIError(.badRequest, "path '\(root)' leaves the image's root")
            }
            guard let node else { throw APIError.notFound("\(root) does not exist in image \(record.uuid)") }
            found.append(node)
        }
        let nodes = found
        // Compiling and searching block: a thread of their own, not the server's pool.
        let result = try await BlockingPool.shared.run { () -> JSON in
            let search = try GrepSearch(patterns: patterns, ignoreCase: ignoreCase)
            var state = GrepSearch.Progress()
            for node in nodes {
                try fs.walk(node) { file in
                    guard !state.truncated, file.isRegular else { return }
                    let path = file.path.isEmpty ? "/" : file.path.text
                    guard GrepSearch.globsAllow(globs, path: path) else { return }
                    guard let fd = try? fs.openFile(file) else { return }
                    defer { close(fd) }
                    search.scan(fd, path: path, limits: limits, progress: &state)
                }
            }
            return .object([
                ("path", .string(roots.joined(separator: ","))), ("patterns", .array(patterns.map(JSON.string))),
                ("matches", .array(state.matches)), ("truncated", .bool(state.truncated)),
            ])
        }
        return .json(result)
    }
}

/// Compiled patterns and a streaming line search.
final class GrepSearch: @unchecked Sendable {
    /// The most bytes one request reads, and the longest line searched (longer ones are cut).
    static let maxScan: Int64 = 256 << 20
    static let maxLine = 64 << 10

    struct Limits: Sendable {
        var maxCount: Int
        var maxTotal: Int
        var before: Int
        var after: Int
    }

    struct Progress {
        var matches: [JSON] = []
        var total = 0
        var scanned: Int64 = 0
        var truncated = false
    }

    private var regexes: [regex_t] = []

    /// Refuses what would make the POSIX matcher blow up: back-references, and repetition
    /// counts whose product passes 256 (glibc expands `{m,n}` by copying the expression).
    static func check(_ pattern: String) throws {
        let chars = Array(pattern.utf8)
        var product = 1
        var i = 0
        while i < chars.count {
            if chars[i] == UInt8(ascii: "\\"), i + 1 < chars.count {
                if (UInt8(ascii: "1")...UInt8(ascii: "9")).contains(chars[i + 1]) {
                    throw APIError(.badRequest, "pattern '\(pattern)': back-references (\\1 …) are not supported")
                }
                i += 2
                continue
            }
            if chars[i] == UInt8(ascii: "{"), let close = chars[i...].firstIndex(of: UInt8(ascii: "}")) {
                let bounds = String(decoding: chars[(i + 1)..<close], as: UTF8.self).split(
                    separator: ",", omittingEmptySubsequences: false)
                if let low = Int(bounds.first ?? ""), bounds.count <= 2 {
                    let high = bounds.count == 2 ? (bounds[1].isEmpty ? low : Int(bounds[1]) ?? low) : low
                    product *= max(1, min(max(low, high), 1_000_000))
                    if product > 256 {
                        throw APIError(
                            .badRequest,
                            "pattern '\(pattern)': its repetition counts multiply past 256; use a simpler pattern")
                    }
                }
                i = close + 1
                continue
            }
            i += 1
        }
    }

    init(patterns: [String], ignoreCase: Bool) throws {
        for pattern in patterns {
            var re = regex_t()
            let rc = regcomp(&re, pattern, REG_EXTENDED | (ignoreCase ? REG_ICASE : 0))
            guard rc == 0 else {
                var message = [CChar](repeating: 0, count: 256)
                regerror(rc, &re, &message, message.count)
                let text = String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                throw APIError(.badRequest, "pattern '\(pattern)' is not a valid regular expression: \(text)")
            }
            regexes.append(re)
        }
    }

    deinit {
        for i in regexes.indices { regfree(&regexes[i]) }
    }

    /// ripgrep-style `-g` globs: a file passes when it matches a positive glob (or there are
    /// none) and no `!` glob. A glob without '/' matches the file name.
    static func globsAllow(_ globs: [String], path: String) -> Bool {
        guard !globs.isEmpty else { return true }
        let name = String(path.split(separator: "/").last ?? "")
        func matches(_ glob: String) -> Bool {
            glob.contains("/")
                ? fnmatch(glob.hasPrefix("/") ? glob : "*/" + glob, path, 0) == 0 : fnmatch(glob, name, 0) == 0
        }
        let positive = globs.filter { !$0.hasPrefix("!") }
        let negative = globs.filter { $0.hasPrefix("!") }.map { String($0.dropFirst()) }
        if negative.contains(where: matches) { return false }
        return positive.isEmpty || positive.contains(where: matches)
    }

    /// One line as read: its number, offset and bytes (with its newline, cut at `maxLine`).
    private struct Line {
        var number: Int
        var offset: Int
        var bytes: [UInt8]
    }

    /// Searches one file line by line, reading it in chunks; a file with a NUL byte is binary
    /// and contributes nothing.
    func scan(_ fd: Int32, path: String, limits: Limits, progress: inout Progress) {
        var found: [JSON] = []
        var count = 0
        var recent: [Line] = []  // up to `before` lines before the current one
        var afterLeft = 0
        var lastEmitted = 0  // the number of the last line emitted
        var pending: [UInt8] = []
        var pendingCut = false
        var number = 0
        var offset = 0
        var buffer = [UInt8](repeating: 0, count: 1 << 16)

        func handle(_ line: Line) -> Bool {
            let subs = submatches(line.bytes)
            if let subs, count < limits.maxCount && progress.total + count < limits.maxTotal {
                for context in recent where context.number > lastEmitted {
                    found.append(entry(path, context, [], type: "context"))
                }
                found.append(entry(path, line, subs, type: "match"))
                lastEmitted = line.number
                count += 1
                afterLeft = limits.after
            } else if afterLeft > 0 {
                found.append(entry(path, line, [], type: "context"))
                lastEmitted = line.number
                afterLeft -= 1
            } else if count >= limits.maxCount || progress.total + count >= limits.maxTotal {
                return false
            }
            if limits.before > 0 {
                recent.append(line)
                if recent.count > limits.before { recent.removeFirst() }
            }
            return true
        }

        reading: while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            progress.scanned += Int64(n)
            if progress.scanned > GrepSearch.maxScan {
                progress.truncated = true
                break
            }
            let chunk = buffer[0..<n]
            if chunk.contains(0) { return }  // binary
            var start = chunk.startIndex
            while let newline = chunk[start...].firstIndex(of: 10) {
                if !pendingCut { pending += chunk[start...newline].prefix(GrepSearch.maxLine - pending.count) }
                number += 1
                let line = Line(number: number, offset: offset, bytes: pending)
                offset += pending.count  // approximate past a cut line
                pending = []
                pendingCut = false
                start = newline + 1
                if !handle(line) { break reading }
            }
            if !pendingCut {
                pending += chunk[start...].prefix(GrepSearch.maxLine - pending.count)
                pendingCut = pending.count >= GrepSearch.maxLine
            }
        }
        if !pending.isEmpty && count < limits.maxCount {
            number += 1
            _ = handle(Line(number: number, offset: offset, bytes: pending))
        }
        progress.total += count
        progress.matches += found
        if progress.total >= limits.maxTotal { progress.truncated = true }
    }

    private func entry(_ path: String, _ line: Line, _ subs: [JSON], type: String) -> JSON {
        .object([
            ("path", .string(path)), ("line_number", .int(line.number)), ("absolute_offset", .int(line.offset)),
            ("line_text", .string(String(decoding: line.bytes, as: UTF8.self))), ("line_bytes", .int(line.bytes.count)),
            ("submatches", .array(subs)), ("type", .string(type)),
        ])
    }

    /// Every non-overlapping, non-empty match of any pattern in one line (without its newline);
    /// nil when no pattern matches (an empty match, as `^` makes, still matches).
    private func submatches(_ line: [UInt8]) -> [JSON]? {
        var body = line
        if body.last == 0x0a { body.removeLast() }
        body.append(0)
        var found: [(Int, Int)] = []
        var matched = false
        for i in regexes.indices {
            var offset = 0
            while offset < body.count {
                var match = regmatch_t()
                let rc = body.withUnsafeBufferPointer { buffer in
                    buffer.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buffer.count) { chars in
                        regexec(&regexes[i], chars + offset, 1, &match, offset > 0 ? REG_NOTBOL : 0)
                    }
                }
                guard rc == 0 else { break }
                matched = true
                let start = offset + Int(match.rm_so)
                let end = offset + Int(match.rm_eo)
                if end > start { found.append((start, end)) }
                offset = end > start ? end : end + 1
                if offset >= body.count - 1 { break }
            }
        }
        guard matched else { return nil }
        return found.sorted { $0.0 < $1.0 }.map { start, end in
            .object([
                ("text", .string(String(decoding: body[start..<end], as: UTF8.self))), ("start", .int(start)),
                ("end", .int(end)),
            ])
        }
    }
}
