import Glibc

/// NUL-terminated C strings that live as long as this object.
package final class CStringArray {
    package let pointer: UnsafeMutablePointer<UnsafePointer<CChar>?>
    let count: Int

    package init(_ strings: [String]) {
        count = strings.count
        pointer = .allocate(capacity: strings.count + 1)
        for (i, s) in strings.enumerated() { pointer[i] = UnsafePointer(strdup(s)) }
        pointer[strings.count] = nil
    }

    deinit {
        for i in 0..<count { free(UnsafeMutableRawPointer(mutating: pointer[i])) }
        pointer.deallocate()
    }
}
