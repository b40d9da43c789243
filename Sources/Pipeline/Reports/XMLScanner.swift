/// A small XML reader for the files tests write (JUnit): elements, attributes, text, CDATA and
/// the predefined and numeric entities; declarations, comments and a DOCTYPE are skipped. What
/// is not well-formed (a tag closing another, text outside the root, an unknown entity, a file
/// cut short) is an error naming the line. Written here rather than with FoundationXML: that
/// links libxml2 and ICU into every process of the binary, about a millisecond at each start.
struct XMLScanner {
    enum Failure: Error, Equatable {
        /// Not well-formed, at this line.
        case malformed(line: Int, reason: String)
        /// The text ends inside this element.
        case cutShort(element: String)
    }

    private let bytes: [UInt8]
    private var index = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    /// Reads the whole text, calling `start` (name, attributes), `text` and `end` (name) in order.
    mutating func scan(
        start: (String, [String: String]) -> Void, text: (String) -> Void, end: (String) -> Void
    ) throws {
        var open: [String] = []
        var sawRoot = false
        while index < bytes.count {
            if bytes[index] != UInt8(ascii: "<") {
                let from = index
                while index < bytes.count && bytes[index] != UInt8(ascii: "<") { index += 1 }
                let raw = bytes[from..<index]
                if open.isEmpty {
                    guard raw.allSatisfy({ [0x20, 0x09, 0x0a, 0x0d].contains($0) }) else {
                        throw fail("text outside the root element", at: from)
                    }
                    continue
                }
                text(try decode(raw, at: from))
            } else if has("<?") {
                try skip(past: "?>")
            } else if has("<!--") {
                try skip(past: "-->")
            } else if has("<![CDATA[") {
                let from = index + 9
                try skip(past: "]]>")
                guard !open.isEmpty else { throw fail("CDATA outside the root element", at: from) }
                text(String(decoding: bytes[from..<(index - 3)], as: UTF8.self))
            } else if has("<!") {
                try skipDeclaration()
            } else if has("</") {
                index += 2
                let name = try readName()
                skipSpace()
                guard index < bytes.count, bytes[index] == UInt8(ascii: ">") else {
                    throw fail("</\(name) is not closed with >", at: index)
                }
                index += 1
                guard let innermost = open.last else { throw fail("</\(name)> closes nothing", at: index) }
                guard innermost == name else { throw fail("</\(name)> closes <\(innermost)>", at: index) }
                open.removeLast()
                end(name)
            } else {
                let at = index
                index += 1
                let name = try readName()
                if open.isEmpty && sawRoot { throw fail("a second root element <\(name)>", at: at) }
                var attributes: [String: String] = [:]
                var closed = false
                while true {
                    skipSpace()
                    guard index < bytes.count else { throw Failure.cutShort(element: name) }
                    if has("/>") {
                        index += 2
                        closed = true
                        break
                    }
                    if bytes[index] == UInt8(ascii: ">") {
                        index += 1
                        break
                    }
                    let key = try readName()
                    skipSpace()
                    guard index < bytes.count, bytes[index] == UInt8(ascii: "=") else {
                        throw fail("attribute \(key) of <\(name)> has no value", at: index)
                    }
                    index += 1
                    skipSpace()
                    guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") || bytes[index] == UInt8(ascii: "'")
                    else { throw fail("the value of \(key) is not quoted", at: index) }
                    let quote = bytes[index]
                    let from = index + 1
                    index = from
                    while index < bytes.count && bytes[index] != quote { index += 1 }
                    guard index < bytes.count else { throw Failure.cutShort(element: name) }
                    attributes[key] = try decode(bytes[from..<index], at: from)
                    index += 1
                }
                sawRoot = true
                start(name, attributes)
                if closed { end(name) } else { open.append(name) }
            }
        }
        if let innermost = open.last { throw Failure.cutShort(element: innermost) }
        guard sawRoot else { throw fail("no element", at: index) }
    }

    private func has(_ prefix: String) -> Bool {
        let p = Array(prefix.utf8)
        return index + p.count <= bytes.count && Array(bytes[index..<(index + p.count)]) == p
    }

    private mutating func skip(past terminator: String) throws {
        let t = Array(terminator.utf8)
        let from = index
        while index + t.count <= bytes.count {
            if Array(bytes[index..<(index + t.count)]) == t {
                index += t.count
                return
            }
            index += 1
        }
        throw fail("\(terminator) is missing", at: from)
    }

    /// `<!DOCTYPE ...>`, with an internal subset in brackets.
    private mutating func skipDeclaration() throws {
        let from = index
        var depth = 0
        while index < bytes.count {
            switch bytes[index] {
            case UInt8(ascii: "["): depth += 1
            case UInt8(ascii: "]"): depth -= 1
            case UInt8(ascii: ">") where depth <= 0:
                index += 1
                return
            default: break
            }
            index += 1
        }
        throw fail("a declaration is not closed", at: from)
    }

    private mutating func skipSpace() {
        while index < bytes.count && [0x20, 0x09, 0x0a, 0x0d].contains(bytes[index]) { index += 1 }
    }

    private mutating func readName() throws -> String {
        let from = index
        while index < bytes.count {
            let b = bytes[index]
            let isNameByte =
                (b >= 0x61 && b <= 0x7a) || (b >= 0x41 && b <= 0x5a) || b == UInt8(ascii: "_") || b == UInt8(ascii: ":")
                || b >= 0x80
                || (index > from && ((b >= 0x30 && b <= 0x39) || b == UInt8(ascii: "-") || b == UInt8(ascii: ".")))
            guard isNameByte else { break }
            index += 1
        }
        guard index > from else {
            if index >= bytes.count { throw Failure.cutShort(element: "") }
            throw fail("a name was expected", at: from)
        }
        return String(decoding: bytes[from..<index], as: UTF8.self)
    }

    /// Text with its entities replaced.
    private func decode(_ raw: ArraySlice<UInt8>, at offset: Int) throws -> String {
        guard raw.contains(UInt8(ascii: "&")) else { return String(decoding: raw, as: UTF8.self) }
        var out: [UInt8] = []
        var i = raw.startIndex
        while i < raw.endIndex {
            guard raw[i] == UInt8(ascii: "&") else {
                out.append(raw[i])
                i += 1
                continue
            }
            guard let semicolon = raw[i...].firstIndex(of: UInt8(ascii: ";")), semicolon - i <= 10 else {
                throw fail("& is not an entity (write &amp;)", at: i)
            }
            let name = String(decoding: raw[(i + 1)..<semicolon], as: UTF8.self)
            let scalar: Unicode.Scalar?
            switch name {
            case "amp": scalar = "&"
            case "lt": scalar = "<"
            case "gt": scalar = ">"
            case "quot": scalar = "\""
            case "apos": scalar = "'"
            default:
                if name.hasPrefix("#x") {
                    scalar = UInt32(name.dropFirst(2), radix: 16).flatMap(Unicode.Scalar.init)
                } else if name.hasPrefix("#") {
                    scalar = UInt32(name.dropFirst()).flatMap(Unicode.Scalar.init)
                } else {
                    scalar = nil
                }
            }
            guard let scalar else { throw fail("unknown entity &\(name);", at: i) }
            out += Array(String(Character(scalar)).utf8)
            i = semicolon + 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    private func fail(_ reason: String, at offset: Int) -> Failure {
        let line = 1 + bytes[..<min(offset, bytes.count)].reduce(0) { $0 + ($1 == 0x0a ? 1 : 0) }
        return .malformed(line: line, reason: reason)
    }
}
