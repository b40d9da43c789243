/// Where an API operation stands, as the ConTree API spells it.
enum OperationStatus: String, Sendable, CaseIterable {
    case pending = "PENDING"
    case assigned = "ASSIGNED"
    case executing = "EXECUTING"
    case success = "SUCCESS"
    case failed = "FAILED"
    case cancelled = "CANCELLED"

    /// Ended: nothing more happens to the operation.
    var isTerminal: Bool { self == .success || self == .failed || self == .cancelled }

    /// The status a row holds (a row from an unknown build reads as failed).
    init(row text: String?) { self = text.flatMap(OperationStatus.init(rawValue:)) ?? .failed }

    /// `'SUCCESS', 'FAILED', 'CANCELLED'`, for SQL.
    static let terminalSQL = allCases.filter(\.isTerminal).map { "'\($0.rawValue)'" }.joined(separator: ", ")
}
