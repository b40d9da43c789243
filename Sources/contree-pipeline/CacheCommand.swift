import ArgumentParser
import FoundationEssentials
import ImageStore
import SystemSupport

/// `cache ls | rm NAME | prune --older-than AGE`: the store's dependency caches.
struct CacheCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache",
        abstract: "List and remove dependency caches (pipelines' `caches:`).",
        discussion: """
            A cache is a directory of the store ($CONTREE_HOME/caches/NAME/) that steps listing it \
            mount read-write at its path. It persists across runs and is never part of a snapshot \
            or a key; `gc` leaves caches alone.
            """,
        subcommands: [List.self, Remove.self, Prune.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the caches.")
        @OptionGroup var storeOptions: StoreOptions
        @Flag(help: "Print JSON.") var json = false

        struct Row: Encodable {
            var name: String
            var bytes: Int64
            var files: Int
            var lastUsed: String

            enum CodingKeys: String, CodingKey {
                case name, bytes, files
                case lastUsed = "last_used"
            }
        }

        func run() throws {
            try reportingErrors {
                let caches = try DependencyCaches(store: try storeOptions.open()).list()
                let rows = caches.map {
                    Row(
                        name: $0.name, bytes: $0.bytes, files: $0.files,
                        lastUsed: Date(timeIntervalSince1970: $0.lastUsed).ISO8601Format())
                }
                if json { return try printJSON(rows) }
                if rows.isEmpty { return print("no caches") }
                print(
                    Format.table(
                        ["NAME", "SIZE", "FILES", "LAST USED"],
                        rows.map { [$0.name, ByteCount.format($0.bytes), String($0.files), $0.lastUsed] }))
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Remove caches by name.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "Cache names.") var names: [String]

        func run() throws {
            try reportingErrors {
                let caches = DependencyCaches(store: try storeOptions.open())
                for name in names {
                    try caches.remove(name)
                    print("removed cache \(name)")
                }
            }
        }
    }

    struct Prune: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "prune", abstract: "Remove the caches no step used for a while (those in use stay).")
        @OptionGroup var storeOptions: StoreOptions
        @Option(help: ArgumentHelp("Remove caches unused for AGE (90s, 30m, 12h, 7d, 2w).", valueName: "AGE"))
        var olderThan: String

        func validate() throws {
            if Format.parseAge(olderThan) == nil {
                throw ValidationError(
                    "--older-than takes an age such as 7d, 12h, 30m or a number of seconds, not '\(olderThan)'")
            }
        }

        func run() throws {
            try reportingErrors {
                let caches = DependencyCaches(store: try storeOptions.open())
                let removed = try caches.prune(olderThan: Format.parseAge(olderThan) ?? 0)
                print(
                    removed.isEmpty
                        ? "no cache unused for \(olderThan)"
                        : "removed \(Plural.count(removed.count, "cache")): \(removed.joined(separator: ", "))")
            }
        }
    }
}
