/// The scheduler as a state machine: given the plan and the results so far, it says which
/// nodes start, which are settled without running (skipped, cancelled), and when fail-fast
/// must stop the running ones. It runs nothing and keeps no clock: `PipelineRunner.drive`
/// carries its decisions out, running each started node with the function it is given, and
/// tests drive it by hand.
struct Schedule {
    /// Grows as dynamic matrices expand (`expand`).
    private(set) var plan: PipelinePlan
    /// Nodes running at once.
    let jobs: Int
    /// After a failure, run every branch that does not depend on it.
    let keepGoing: Bool
    /// The pipeline's image: what a skipped first step passes on.
    let baseImage: String
    /// Steps' own `image:` references, resolved to image UUIDs.
    var stepImages: [String: String] = [:]
    private(set) var preparer: StepPreparer
    /// What the run should say about its expansions (an empty matrix).
    private(set) var notes: [String] = []

    /// Every result so far; `results` is a copy of it.
    let table = ResultTable()
    var results: [String: NodeResult] { table.all }
    private(set) var running: Set<String> = []
    /// Not started nor settled, and waiting for these many of their dependencies (by id).
    private var waiting: [String: Int] = [:]
    /// The nodes waiting for a node (by the id of the node waited for).
    private var waiters: [String: [String]] = [:]
    /// Plan positions of nodes whose dependencies all ended and that neither started nor
    /// were settled: the next to decide on is the first in plan order.
    private var ready = PositionHeap()
    /// Each node's position in the plan.
    private var positions: [String: Int] = [:]
    /// A failure stopped the run (fail-fast): what has not started is skipped.
    private(set) var stopping = false
    /// `advance` settled a failure that stops the run: the running nodes must be stopped
    /// (`PipelineRunner.drive` does it and clears this).
    var failFastRequested = false

    init(plan: PipelinePlan, jobs: Int, keepGoing: Bool, baseImage: String) {
        self.plan = plan
        self.jobs = max(1, jobs)
        self.keepGoing = keepGoing
        self.baseImage = baseImage
        self.preparer = StepPreparer(plan: plan)
        index()
    }

    /// Rebuilds what waits for what from the plan and the results so far (at the start, and
    /// when an expansion adopts a new plan). Linear in the plan's nodes and edges.
    private mutating func index() {
        waiting = [:]
        waiters = [:]
        ready = PositionHeap()
        positions = [:]
        for (position, node) in plan.nodes.enumerated() {
            positions[node.id] = position
            guard table[node.id] == nil && !running.contains(node.id) else { continue }
            let missing = Set(node.dependencies).filter { table[$0] == nil }
            if missing.isEmpty {
                ready.insert(position)
            } else {
                waiting[node.id] = missing.count
                for dependency in missing { waiters[dependency, default: []].append(node.id) }
            }
        }
    }

    /// Records a result and readies the nodes that waited for it alone.
    private mutating func settle(_ result: NodeResult) {
        table.set(result)
        for id in waiters.removeValue(forKey: result.node) ?? [] {
            guard let count = waiting[id] else { continue }
            if count > 1 {
                waiting[id] = count - 1
            } else {
                waiting[id] = nil
                if let position = positions[id] { ready.insert(position) }
            }
        }
    }

    /// Nothing runs.
    var isIdle: Bool { running.isEmpty }

    /// Decides what can be decided now: nodes settled without running (in the order decided)
    /// and nodes to start (at most `jobs` running in all). Call it after every `finish`.
    /// - Parameter cancelled: the run was cancelled (Ctrl-C): what has not started is cancelled,
    ///   except steps that react to failures.
    mutating func advance(cancelled: Bool) -> (start: [PlanNode], settled: [NodeResult]) {
        var start: [PlanNode] = []
        var settled: [NodeResult] = []
        // The first ready node in plan order each time (a decision may ready earlier ones).
        while let position = ready.first {
            let node = plan.nodes[position]
            if let verdict = verdict(node, cancelled: cancelled) {
                _ = ready.removeFirst()
                settle(verdict)
                settled.append(verdict)
                continue
            }
            if node.kind == .dynamic {
                _ = ready.removeFirst()
                if let failure = expand(node) {
                    settle(failure)
                    settled.append(failure)
                    // As a step that failed: fail-fast stops the others.
                    if failure.failsPipeline && !keepGoing && !stopping {
                        stopping = true
                        failFastRequested = true
                    }
                }
                continue
            }
            guard running.count < jobs else { break }
            _ = ready.removeFirst()
            running.insert(node.id)
            start.append(node)
        }
        return (start, settled)
    }

    /// Goes on with `next`, a plan that holds every node of this one but a dynamic node it
    /// expanded (and what came after that node): what has not started is what `next` has
    /// and neither ran nor runs.
    mutating func adopt(_ next: PipelinePlan) {
        let before = Set(plan.nodes.map(\.step))
        plan = next
        preparer = StepPreparer(plan: next)
        index()
        for step in before.subtracting(next.nodes.map(\.step)).sorted() {
            notes.append(
                "\(step) has no instances: its dynamic matrix (or one it comes from) expanded to an empty list")
        }
    }

    /// Records a node that ran. - Returns: whether fail-fast must stop the nodes running now
    /// (those that do not react to failures).
    mutating func finish(_ result: NodeResult) -> Bool {
        running.remove(result.node)
        settle(result)
        guard result.failsPipeline && !keepGoing && !stopping else { return false }
        stopping = true
        return true
    }

    /// Once nothing runs: the nodes never reached (cancelled when the run was).
    mutating func unreached(cancelled: Bool) -> [NodeResult] {
        let left = plan.nodes.filter { table[$0.id] == nil && !running.contains($0.id) }
        waiting = [:]
        waiters = [:]
        ready = PositionHeap()
        return left.map { node in
            let verdict = NodeResult(node: node, status: cancelled ? .cancelled : .skipped, reason: "not reached")
            table.set(verdict)
            return verdict
        }
    }

    /// The result of a node that does not run, or nil when it should.
    private func verdict(_ node: PlanNode, cancelled: Bool) -> NodeResult? {
        // Steps whose condition asks about failures (cleanup, reports) still run after a
        // failure or a cancellation, and are not cancelled themselves.
        let exempt = node.reactsToFailure
        if cancelled && !exempt {
            return NodeResult(node: node, status: .cancelled, reason: "the run was cancelled")
        }
        if stopping && !exempt {
            return NodeResult(node: node, status: .skipped, reason: PipelineRunner.failFastReason)
        }
        if node.kind == .select {
            // A selection runs once its variants ended, unless none of them ran.
            let variants = node.variantNodes.compactMap { table[$0] }
            guard variants.allSatisfy({ $0.status == .skipped || $0.status == .cancelled }) else { return nil }
            let status: NodeStatus = variants.contains { $0.status == .cancelled } ? .cancelled : .skipped
            return NodeResult(node: node, status: status, reason: "none of its variants ran")
        }
        let scope = NodeScope(
            node: node, plan: plan, results: table, env: preparer.environment(node, results: table),
            pipelineName: plan.definition.name, cancelled: cancelled)
        var judged = node
        if node.kind == .dynamic, node.condition?.references.contains(where: { $0.0.first == "matrix" }) == true {
            // A condition on matrix values is each instance's: the dynamic node only needs what
            // it depends on to have succeeded (or, for always()/failure(), nothing).
            if node.reactsToFailure { return nil }
            judged.condition = nil
        }
        guard !PipelineRunner.conditionHolds(judged, in: scope) else { return nil }
        if node.condition == nil {
            return NodeResult(node: node, status: .skipped, reason: "a step it depends on did not succeed")
        }
        var skipped = NodeResult(
            node: node, status: .skipped,
            reason: "its condition is false: \(plan.definition.step(node.step)?.conditionText ?? "")")
        // Skipped by its own condition while what it depends on succeeded: it leaves the
        // workspace as it was, passing its parent's snapshot on.
        if scope.status("success") {
            let start = plan.startingPoint(node, results: table, base: baseImage, stepImages: stepImages)
            skipped.parentImage = start.image
            skipped.resultImage = start.image
        }
        return skipped
    }
}

extension PipelinePlan {
    /// The snapshot a node starts from: its parent's or, when the parent left none (cancelled,
    /// killed, or failed before it ran), the nearest one along the chain of `from` steps, down
    /// to the pipeline's image. `from` names the node whose snapshot it is (nil: the image).
    ///
    /// A chain that ends at a step with its own `image:` ends at that image (`stepImages` maps
    /// the reference to a UUID).
    func startingPoint(
        _ node: PlanNode, results: ResultTable, base: String, stepImages: [String: String] = [:]
    ) -> (
        image: String, from: String?
    ) {
        var current = node
        while case .node(let id) = current.parent {
            if let image = results[id]?.resultImage { return (image, id) }
            guard let next = self.node(id) else { return (base, nil) }
            current = next
        }
        return (current.image.flatMap { stepImages[$0.value] } ?? base, nil)
    }
}

/// A min-heap of plan positions: the ready nodes, first in plan order on top.
struct PositionHeap {
    private var items: [Int] = []

    var first: Int? { items.first }

    mutating func insert(_ value: Int) {
        items.append(value)
        var child = items.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[child] < items[parent] else { break }
            items.swapAt(child, parent)
            child = parent
        }
    }

    mutating func removeFirst() -> Int? {
        guard let top = items.first else { return nil }
        let last = items.removeLast()
        guard !items.isEmpty else { return top }
        items[0] = last
        var parent = 0
        while true {
            let left = 2 * parent + 1
            let right = left + 1
            var smallest = parent
            if left < items.count && items[left] < items[smallest] { smallest = left }
            if right < items.count && items[right] < items[smallest] { smallest = right }
            guard smallest != parent else { return top }
            items.swapAt(parent, smallest)
            parent = smallest
        }
    }
}
