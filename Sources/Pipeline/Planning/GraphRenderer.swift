/// The plan's DAG as Mermaid or Graphviz DOT text. Solid edges start from a snapshot; dashed
/// edges only wait (`needs`); dashed edges labelled `copy` bring files in (`copy:`). A step
/// with its own `image:` starts from a root of its own.
public enum GraphRenderer {
    public enum Format: String, CaseIterable, Sendable {
        case mermaid, dot
    }

    public static func render(_ plan: PipelinePlan, as format: Format) -> String {
        let edges = RunReport.edges(of: plan)
        var ids: [String: String] = [:]
        for (i, node) in plan.nodes.enumerated() { ids[node.id] = "n\(i)" }
        func label(_ node: PlanNode) -> String {
            let base =
                switch node.kind {
                case .select: "select \(node.id)"
                case .dynamic: "\(node.id) dynamic"
                case .run: node.id
                }
            return base.replacing("\"", with: "'")
        }
        switch format {
        case .mermaid:
            var lines = ["flowchart LR"]
            lines.append("  base([\(plan.definition.image.value.replacing("\"", with: "'"))])")
            let roots = Array(Set(plan.nodes.compactMap { $0.image?.value })).sorted()
            for (i, root) in roots.enumerated() { lines.append("  image\(i)([\(root.replacing("\"", with: "'"))])") }
            func root(_ node: PlanNode) -> String {
                node.image.flatMap { roots.firstIndex(of: $0.value) }.map { "image\($0)" } ?? "base"
            }
            for node in plan.nodes {
                let shape =
                    switch node.kind {
                    case .select: "{{\"\(label(node))\"}}"
                    case .dynamic: "[/\"\(label(node))\"/]"
                    case .run: "[\"\(label(node))\"]"
                    }
                lines.append("  \(ids[node.id]!)\(shape)")
            }
            for node in plan.nodes where node.parent == .image { lines.append("  \(root(node)) --> \(ids[node.id]!)") }
            for edge in edges {
                let arrow = ["needs": "-.->", "copy": "-. copy .->"][edge.kind] ?? "-->"
                lines.append("  \(ids[edge.from]!) \(arrow) \(ids[edge.to]!)")
            }
            return lines.joined(separator: "\n") + "\n"
        case .dot:
            var lines = [
                "digraph \"\(plan.definition.name.replacing("\"", with: "'"))\" {", "  rankdir=LR;",
                "  node [shape=box, style=rounded];",
            ]
            lines.append("  base [label=\"\(plan.definition.image.value.replacing("\"", with: "'"))\", shape=ellipse];")
            let roots = Array(Set(plan.nodes.compactMap { $0.image?.value })).sorted()
            for (i, root) in roots.enumerated() {
                lines.append("  image\(i) [label=\"\(root.replacing("\"", with: "'"))\", shape=ellipse];")
            }
            func root(_ node: PlanNode) -> String {
                node.image.flatMap { roots.firstIndex(of: $0.value) }.map { "image\($0)" } ?? "base"
            }
            for node in plan.nodes {
                lines.append(
                    "  \(ids[node.id]!) [label=\"\(label(node))\"\(["select": ", shape=hexagon", "dynamic": ", style=\"rounded,dashed\""]["\(node.kind)"] ?? "")];"
                )
            }
            for node in plan.nodes where node.parent == .image { lines.append("  \(root(node)) -> \(ids[node.id]!);") }
            for edge in edges {
                let style = ["needs": " [style=dashed]", "copy": " [style=dashed, label=\"copy\"]"][edge.kind] ?? ""
                lines.append("  \(ids[edge.from]!) -> \(ids[edge.to]!)\(style);")
            }
            lines.append("}")
            return lines.joined(separator: "\n") + "\n"
        }
    }
}
