import Synchronization

/// The results of a run so far, shared by the scheduler and every node it starts. A node reads
/// what ended before it started (what it depends on); what ends later is added beside it and
/// never changes what it read. A reference, so that starting one of 5,000 nodes copies nothing:
/// a dictionary handed to each running node was copied whole at every later result.
public final class ResultTable: Sendable, ExpressibleByDictionaryLiteral {
    private let storage: Mutex<[String: NodeResult]>

    public init(_ results: [String: NodeResult] = [:]) { storage = Mutex(results) }

    public convenience init(dictionaryLiteral elements: (String, NodeResult)...) {
        self.init(Dictionary(elements, uniquingKeysWith: { $1 }))
    }

    public subscript(id: String) -> NodeResult? { storage.withLock { $0[id] } }

    func set(_ result: NodeResult) { storage.withLock { $0[result.node] = result } }

    /// Every result, as a dictionary (a copy).
    public var all: [String: NodeResult] { storage.withLock { $0 } }
}
