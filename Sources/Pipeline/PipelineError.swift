/// A place in a pipeline file.
public struct SourceLocation: Sendable, Equatable, Codable, CustomStringConvertible {
    public var file: String
    /// 1-based.
    public var line: Int
    /// 1-based, in Unicode scalars.
    public var column: Int

    public init(file: String, line: Int, column: Int) {
        self.file = file
        self.line = line
        self.column = column
    }

    public var description: String { "\(file):\(line):\(column)" }
}

/// A value read from a pipeline file, with where it was written.
public struct Located<Value: Sendable>: Sendable {
    public var value: Value
    public var location: SourceLocation

    public init(_ value: Value, at location: SourceLocation) {
        self.value = value
        self.location = location
    }
}

extension Located: Equatable where Value: Equatable {}

/// The one error type of the `Pipeline` module.
public struct PipelineError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// The pipeline file is wrong: nothing was executed (exit status 2).
        case invalid
        /// A step failed or could not run (exit status 1).
        case failed
        /// The machinery around a step failed, not the step: a cluster node or the registry
        /// between machines (exit status 75, EX_TEMPFAIL: running again may pass).
        case infrastructure
    }

    /// Problems other checks reason about (which to leave out as consequences of others).
    public enum Problem: Sendable, Equatable {
        /// `from` or `needs` names a step the file does not have.
        case unknownStep(String)
        /// The steps depend on each other in a cycle.
        case cycle
        /// A key the mapping does not take, and the one it was likely meant to be.
        case unknownKey(suggestion: String?)
    }

    public var kind: Kind
    /// What is wrong and what to do about it.
    public var message: String
    public var location: SourceLocation?
    public var problem: Problem?
    /// The error behind this one (the engine's, the registry's), for callers that look deeper
    /// than the message.
    public var cause: (any Error)?

    public init(
        _ kind: Kind, _ message: String, at location: SourceLocation? = nil, problem: Problem? = nil,
        cause: (any Error)? = nil
    ) {
        self.kind = kind
        self.message = message
        self.location = location
        self.problem = problem
        self.cause = cause
    }

    public var description: String {
        guard let location else { return "error: \(message)" }
        return "\(location): error: \(message)"
    }
}

/// Every problem found in a pipeline file at once, in file order.
public struct PipelineValidationError: Error, CustomStringConvertible, Sendable {
    public var errors: [PipelineError]

    public init(_ errors: [PipelineError]) {
        self.errors = errors.sorted {
            ($0.location?.line ?? 0, $0.location?.column ?? 0) < ($1.location?.line ?? 0, $1.location?.column ?? 0)
        }
    }

    public var description: String { errors.map(\.description).joined(separator: "\n") }
}
