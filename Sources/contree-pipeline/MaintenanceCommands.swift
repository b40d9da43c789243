import ArgumentParser
import FoundationEssentials
import Pipeline
import SystemSupport
import VirtualMachine

struct GarbageCollectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Remove what nothing references: unused layers, abandoned work, interrupted commits.",
        discussion: "Images stay unless --prune-untagged names an age; layers a running sandbox uses are kept.")
    @OptionGroup var storeOptions: StoreOptions
    @Option(help: "Also remove untagged images older than this many seconds that no tagged image descends from.")
    var pruneUntagged: Double?
    @Option(
        help: ArgumentHelp(
            "Also drop pipeline step-cache entries older than AGE (90s, 30m, 12h, 7d, 2w) and the snapshots only they kept.",
            valueName: "AGE"))
    var pruneCache: String?
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        if let pruneCache, Format.parseAge(pruneCache) == nil {
            throw ValidationError(
                "--prune-cache takes an age such as 7d, 12h, 30m or a number of seconds, not '\(pruneCache)'")
        }
    }

    func run() throws {
        try reportingErrors {
            let store = try storeOptions.open()
            var pruned: (entries: Int, scores: Int, images: Int)?
            if let age = pruneCache.flatMap(Format.parseAge) {
                pruned = try StepCache(store: store).prune(createdBefore: Date().addingTimeInterval(-age))
            }
            var report = try store.collectGarbage(
                pruneUntaggedOlderThan: pruneUntagged, derived: [ErofsLayers.Files()])
            report.imagesRemoved += pruned?.images ?? 0
            if json {
                try printJSON(report)
            } else {
                if let pruned {
                    print(
                        "step cache: dropped \(Plural.count(pruned.entries, "entry", plural: "entries")) and \(Plural.count(pruned.scores, "score")) older than \(pruneCache ?? ""), removed \(Plural.count(pruned.images, "snapshot")) only they kept"
                    )
                }
                for failure in report.failures { printError("gc: \(failure)") }
                print(
                    "removed \(Plural.count(report.layersRemoved, "layer")), \(Plural.count(report.derivedRemoved, "VM disk image")) of removed layers (\(ByteCount.format(report.bytesFreed)) in all), \(Plural.count(report.imagesRemoved, "image")), \(Plural.count(report.abandonedWork, "abandoned work directory", plural: "abandoned work directories"))"
                )
            }
            // What would not go is reported and the rest went; the exit status says so.
            if !report.failures.isEmpty { throw ExitCode(1) }
        }
    }
}

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fsck",
        abstract: "Prove the store is consistent; exit 1 when it is not.",
        discussion: "Checks the database, every layer's digest against its files, every image's chain and tags.")
    @OptionGroup var storeOptions: StoreOptions
    @Flag(help: "Skip re-hashing layer contents (check structure only).") var quick = false
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let report = try reportingErrors { try storeOptions.open().checkConsistency(verifyContent: !quick) }
        if json {
            try printJSON(report)
        } else {
            for problem in report.problems { print("PROBLEM: \(problem)") }
            for item in report.garbage { print("garbage: \(item)") }
            print(
                "\(report.isConsistent ? "consistent" : "INCONSISTENT"): \(Plural.count(report.imagesChecked, "image")), \(Plural.count(report.layersChecked, "layer")) checked, \(Plural.count(report.problems.count, "problem")), \(Plural.count(report.garbage.count, "garbage item"))"
            )
        }
        if !report.isConsistent { throw ExitCode(1) }
    }
}
