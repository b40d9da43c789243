import Glibc

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// The error type of the engine's layers: what failed, what to do about it, and the
/// underlying cause (an errno; another error, such as a registry's answer or a network
/// failure, in `cause`).
public struct SandboxError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// An image, tag, layer or file that does not exist.
        case notFound
        /// Input that cannot be used as given (a malformed reference, a bad option).
        case invalidArgument
        /// A path that leaves the image or the sandbox (`..`, a symlink pointing out).
        case pathEscapes
        /// The request conflicts with the store's state (a tag in use, an image with tags).
        case conflict
        /// A system call failed; the message names the call and its object.
        case systemCall
        /// The store's database failed or holds something it should not.
        case database
        /// The sandbox could not be set up (namespaces, mounts, cgroups).
        case sandboxSetup
        /// A helper program (tar, debootstrap, cp) failed.
        case childProcess
        /// A remote service (a registry) could not be reached, refused, or answered something
        /// unusable; the cause says which.
        case remote
        /// The host lacks something the request needs (a package, a kernel feature).
        case unsupported
        /// The store is inconsistent.
        case corrupt
        /// The operation was cancelled.
        case cancelled
        /// Something is larger than a limit allows (a run's change, a sparse file).
        case limitExceeded
    }

    public var code: Code
    /// What went wrong and what to do, in one or two sentences.
    public var message: String
    /// The errno behind a failed system call, if any.
    public var errno: Int32?
    /// The error behind this one, kept for callers that look deeper than the message (a
    /// `RegistryError` with the HTTP status, a transport error).
    public var cause: (any Error)?

    public init(_ code: Code, _ message: String, errno: Int32? = nil, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.errno = errno
        self.cause = cause
    }

    public var description: String {
        guard let errno else { return message }
        return "\(message): \(String(cString: strerror(errno)))"
    }

    /// A failed system call: `call` names the call and its object (`mount(overlay) on /x`).
    public static func system(_ call: String, _ errno: Int32 = Glibc.errno) -> SandboxError {
        SandboxError(.systemCall, call, errno: errno)
    }
}
