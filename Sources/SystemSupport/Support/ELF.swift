/// Just enough ELF to tell a static binary from a dynamic one.
package enum ELF {
    /// Whether the file has a program interpreter (PT_INTERP), i.e. needs a dynamic loader.
    package static func isDynamic(_ path: String) throws -> Bool {
        let bytes = try FileSystem.readFile(path)
        guard bytes.count > 64, bytes[0..<4].elementsEqual([0x7f, 0x45, 0x4c, 0x46]), bytes[4] == 2 else {
            return false
        }
        func u16(_ o: Int) -> Int { Int(bytes[o]) | Int(bytes[o + 1]) << 8 }
        func u64(_ o: Int) -> Int { (0..<8).reduce(0) { $0 | Int(bytes[o + $1]) << (8 * $1) } }
        let phoff = u64(32)
        let phentsize = u16(54)
        let phnum = u16(56)
        for i in 0..<phnum {
            let o = phoff + i * phentsize
            guard o + 4 <= bytes.count else { break }
            if bytes[o] == 3 && bytes[o + 1] == 0 && bytes[o + 2] == 0 && bytes[o + 3] == 0 { return true }
        }
        return false
    }
}
