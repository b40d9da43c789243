import FoundationEssentials
import Glibc
import Hummingbird
import Sandbox

extension ServerState {
    /// `GET /v1/inspect/{uuid}/grep`: searches file contents with POSIX extended regular
    /// expressions (patterns OR-ed), skipping binary files and never following symlinks.
    func grep(_ call: APICall, _ uuid: String) async throws -> Response {
        let record = try api.visibleImage(uuid, namespace: call.namespace)
        let patterns = call.params("pattern")
        guard !patterns.isEmpty else { throw APIError(.badRequest, "pattern is required (it may be repeated)") }
        guard patterns.count <= 16, patterns.allSatisfy({ !$0.isEmpty && $0.utf8.count <= 1024 }) else {
            throw APIError(.badRequest, "at most 16 patterns of 1 to 1024 characters each")
        }
        let roots = call.params("path").isEmpty ? ["/"] : call.params("path")
        guard roots.count <= 16 else { throw APIError(.badRequest, "at most 16 paths") }
        let globs = call.params("glob")
        let maxCount = try call.intParam("max_count", default: 10000, range: 1...10000)
        let maxTotal = try call.intParam("max_total", default: 1000, range: 1...10000)
        let before = try call.intParam("before", default: 0, range: 0...50)
        let after = try call.intParam("after", default: 0, range: 0...50)
        let mode = call.param("case") ?? "sensitive"
        guard ["sensitive", "insensitive", "smart"].contains(mode) else {
            throw APIError(.badRequest, "case must be sensitive, insensitive or smart")
        }
        let ignoreCase =
            mode == "insensitive" || (mode == "smart" && !patterns.contains { $0.contains(where: \.isUppercase) })
        let fs = ImageFilesystem(layersTopFirst: record.layers.reversed().map(api.store.layerPath))
        let search = try GrepSearch(patterns: patterns, ignoreCase: ignoreCase)
        var found: [(String, ImageFilesystem.Node)] = []
        for root in roots {
            guard root.hasPrefix("/") else { throw APIError(.badRequest, "path '\(root)' must be absolute") }
            let node: ImageFilesystem.Node?
            do {
                node = try fs.lookup(root, followFinal: false)
            } catch let error as SandboxError where error.code == .pathEscapes {
                throw APIError(.badRequest, "path '\(root)' leaves the image's root")
            }
            guard let node else { throw APIError.notFound("\(root) does not exist in image \(record.uuid)") }
            found.append((root, node))
        }
        let nodes = found
        let result = try await DedicatedThread.run { () -> JSON in
            var matches: [JSON] = []
            var total = 0
            var truncated = false
            for (_, node) in nodes {
                try fs.walk(node) { file in
                    guard !truncated, file.isRegular else { return }
                    let path = file.path.isEmpty ? "/" : file.path
                    guard GrepSearch.globsAllow(globs, path: path) else { return }
                    guard let data = try? FileSystem.readFile(fs.physicalPath(file)), !data.contains(0) else { return }
                    let found = search.run(
                        data, path: path, maxCount: maxCount, remaining: maxTotal - total, before: before, after: after)
                    total += found.count
                    matches += found.lines
                    if total >= maxTotal { truncated = true }
                }
            }
            return .object([
                ("path", .string(roots.joined(separator: ","))), ("patterns", .array(patterns.map(JSON.string))),
                ("matches", .array(matches)), ("truncated", .bool(truncated)),
            ])
        }
        return .json(result)
    }
}

/// Compiled patterns and the line search of one file.
final class GrepSearch: @unchecked Sendable {
    private var regexes: [regex_t] = []

    init(patterns: [String], ignoreCase: Bool) throws {
        for pattern in patterns {
            var re = regex_t()
            let rc = regcomp(&re, pattern, REG_EXTENDED | (ignoreCase ? REG_ICASE : 0))
            guard rc == 0 else {
                var message = [CChar](repeating: 0, count: 256)
                regerror(rc, &re, &message, message.count)
                throw APIError(
                    .badRequest, "pattern '\(pattern)' is not a valid regular expression: \(String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))")
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

    /// Matching lines (with context) of one file.
    func run(_ data: [UInt8], path: String, maxCount: Int, remaining: Int, before: Int, after: Int) -> (
        lines: [JSON], count: Int
    ) {
        var lineStarts: [Int] = [0]
        for (i, byte) in data.enumerated() where byte == 0x0a && i + 1 < data.count { lineStarts.append(i + 1) }
        func line(_ index: Int) -> ArraySlice<UInt8> {
            let start = lineStarts[index]
            let end = index + 1 < lineStarts.count ? lineStarts[index + 1] : data.count
            return data[start..<end]
        }
        var out: [JSON] = []
        var count = 0
        var emittedUpTo = -1
        var index = 0
        while index < lineStarts.count && count < min(maxCount, remaining) {
            let text = line(index)
            let submatches = self.submatches(text)
            if !submatches.isEmpty {
                for c in max(emittedUpTo + 1, index - before)..<index {
                    out.append(entry(path, c, lineStarts[c], line(c), [], type: "context"))
                }
                out.append(entry(path, index, lineStarts[index], text, submatches, type: "match"))
                emittedUpTo = index
                count += 1
                var c = index + 1
                while c < lineStarts.count && c <= index + after {
                    if !self.submatches(line(c)).isEmpty { break }
                    out.append(entry(path, c, lineStarts[c], line(c), [], type: "context"))
                    emittedUpTo = c
                    c += 1
                }
                index = max(index + 1, emittedUpTo + 1)
                continue
            }
            index += 1
        }
        return (out, count)
    }

    private func entry(
        _ path: String, _ index: Int, _ offset: Int, _ text: ArraySlice<UInt8>, _ subs: [JSON], type: String
    ) -> JSON {
        .object([
            ("path", .string(path)), ("line_number", .int(index + 1)), ("absolute_offset", .int(offset)),
            ("line_text", .string(String(decoding: text, as: UTF8.self))), ("line_bytes", .int(text.count)),
            ("submatches", .array(subs)), ("type", .string(type)),
        ])
    }

    /// Every non-overlapping match of any pattern in one line (without its newline).
    private func submatches(_ line: ArraySlice<UInt8>) -> [JSON] {
        var body = Array(line)
        if body.last == 0x0a { body.removeLast() }
        body.append(0)
        var found: [(Int, Int)] = []
        for i in regexes.indices {
            var offset = 0
            while offset < body.count - 1 || (offset == 0 && body.count == 1) {
                var match = regmatch_t()
                let rc = body.withUnsafeBufferPointer { buffer in
                    buffer.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buffer.count) { chars in
                        regexec(&regexes[i], chars + offset, 1, &match, offset > 0 ? REG_NOTBOL : 0)
                    }
                }
                guard rc == 0 else { break }
                let start = offset + Int(match.rm_so)
                let end = offset + Int(match.rm_eo)
                found.append((start, end))
                offset = end > start ? end : end + 1
                if body.count == 1 { break }
            }
        }
        return found.sorted { $0.0 < $1.0 }.map { start, end in
            .object([
                ("text", .string(String(decoding: body[start..<end], as: UTF8.self))), ("start", .int(start)),
                ("end", .int(end)),
            ])
        }
    }
}
