import ArgumentParser
import Foundation
import Pipeline

/// `diff-runs RUN_A RUN_B`: where two runs went apart.
struct DiffRunsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diff-runs",
        abstract: "Compare two runs: per step, what changed in its key and which files differ between its snapshots.",
        discussion: """
            Names the first step whose snapshot diverged (steps in the order the runs ended them, \
            which follows the DAG). Exit status: 0 when no step diverged, 1 when one did (as diff \
            does), 2 for a run that does not exist.
            """)
    @OptionGroup var storeOptions: StoreOptions
    @Argument(help: "A run id (or a unique prefix); `runs` lists them.") var runA: String
    @Argument(help: "The other run.") var runB: String
    @Flag(help: "Also list the steps that did not change.") var all = false
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let comparison = try reportingErrors {
            let store = try storeOptions.open()
            return try RunComparison(runA, runB, cache: try StepCache(store: store), store: store)
        }
        if json {
            try printJSON(comparison)
        } else {
            print(text(comparison), terminator: "")
        }
        if comparison.firstDivergence != nil { throw ExitCode(1) }
    }

    func text(_ c: RunComparison) -> String {
        var out =
            "A: run \(c.runA.id) of \(c.runA.pipeline) (\(c.runA.status))\nB: run \(c.runB.id) of \(c.runB.pipeline) (\(c.runB.status))\n"
        if c.runA.file != c.runB.file || c.runA.pipeline != c.runB.pipeline {
            out += "note: the runs are of different pipelines (\(c.runA.file), \(c.runB.file))\n"
        }
        if let first = c.firstDivergence {
            let step = c.steps.first { $0.node == first }!
            let why =
                step.statusA == nil || step.statusB == nil
                ? "it is only in run \(step.statusA == nil ? "B" : "A")"
                : !step.sameFiles
                    ? (step.sameKey
                        ? "its key is the same, so the command made other files from the same inputs: not reproducible"
                        : "its key changed")
                    : "its status changed"
            out += "first divergence: \(first) (\(why))\n"
        } else {
            out += "no step diverged: every snapshot holds the same files\n"
        }
        for step in c.steps where all || !step.sameKey || step.diverged {
            let status =
                step.statusA == step.statusB
                ? (step.statusA ?? "") : "\(step.statusA ?? "absent") -> \(step.statusB ?? "absent")"
            out +=
                "\n\(step.node): \(status)\(step.sameKey ? ", same key" : "")\(step.sameFiles ? ", same files" : "")\n"
            for change in step.keyChanges { out += "  key: \(change)\n" }
            for file in step.files ?? [] where !step.sameFiles { out += "  \(file)\n" }
            if let count = step.changedFiles, count > (step.files?.count ?? 0) {
                out += "  … \(count - (step.files?.count ?? 0)) more paths\n"
            }
            if let note = step.note { out += "  \(note)\n" }
        }
        return out
    }
}
