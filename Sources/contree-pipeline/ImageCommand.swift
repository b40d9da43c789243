import ArgumentParser
import FoundationEssentials
import Glibc
import ImageFormats
import ImageStore
import Registry
import Sandbox
import SystemSupport
import VirtualMachine

struct ImageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "List, tag, import, compare and remove images.",
        subcommands: [
            List.self, Tag.self, Untag.self, Log.self, Diff.self, Remove.self, Import.self, Export.self, Push.self,
            Build.self,
        ])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List images, oldest first.")
        @OptionGroup var storeOptions: StoreOptions
        @Flag(help: "Print JSON.") var json = false
        @Flag(help: "Only tagged images.") var tagged = false

        func run() throws {
            try reportingErrors {
                let images = try storeOptions.open().listImages().filter { !tagged || !$0.tags.isEmpty }
                if json { return try printJSON(images) }
                print(
                    Format.table(
                        ["UUID", "TAGS", "PARENT", "LAYERS", "SIZE", "CREATED", "ORIGIN"],
                        images.map {
                            [
                                $0.uuid, $0.tags.joined(separator: ","), $0.parent.map { String($0.prefix(8)) } ?? "-",
                                String($0.layers.count), ByteCount.format($0.size), Format.date($0.created), $0.origin,
                            ]
                        }))
            }
        }
    }

    struct Tag: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "tag", abstract: "Point a tag at an image (moving it if it exists).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The image.") var image: String
        @Argument(help: "The tag.") var name: String

        func run() throws {
            try reportingErrors {
                let store = try storeOptions.open()
                let record = try BaseImages(store: store, progress: ProgressReporter(), sources: .commands).resolve(
                    image)
                try store.tag(name, image: record.uuid)
                print("\(name) -> \(record.uuid)")
            }
        }
    }

    struct Untag: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "untag", abstract: "Remove a tag (the image stays).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The tag.") var name: String

        func run() throws {
            try reportingErrors {
                let image = try storeOptions.open().untag(name)
                print("untagged \(name) (image \(image) stays)")
            }
        }
    }

    struct Log: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "log", abstract: "Show an image and its ancestors, newest first.")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The image.") var image: String
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            try reportingErrors {
                let store = try storeOptions.open()
                let record = try store.resolveImage(image)
                let (chain, missing) = try store.ancestry(record.uuid)
                if json { return try printJSON(chain) }
                for item in chain {
                    let tags = item.tags.isEmpty ? "" : " (\(item.tags.joined(separator: ", ")))"
                    print("image \(item.uuid)\(tags)")
                    print(
                        "  created \(Format.date(item.created))  \(item.origin)  \(Plural.count(item.layers.count, "layer"))  \(ByteCount.format(item.size))"
                    )
                }
                if let missing { print("image \(missing) (removed)") }
            }
        }
    }

    struct Diff: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "diff",
            abstract: "List the paths that differ between two images (A added, D deleted, M modified).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The old image.") var from: String
        @Argument(help: "The new image.") var to: String
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            try reportingErrors {
                let store = try storeOptions.open()
                let changes = try ImageDiff.changes(
                    from: try store.resolveImage(from), to: try store.resolveImage(to), store: store)
                if json { return try printJSON(changes) }
                for change in changes { print("\(change.kind.rawValue) \(change.path.description)") }
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm", abstract: "Remove images; their layers go when nothing else uses them.")
        @OptionGroup var storeOptions: StoreOptions
        @Flag(help: "Also remove the images' tags.") var force = false
        @Argument(help: "The images.") var images: [String]

        func run() throws {
            try reportingErrors {
                let store = try storeOptions.open()
                for image in images {
                    let record = try store.resolveImage(image)
                    try store.removeImage(record.uuid, force: force)
                    print("removed \(record.uuid)")
                }
                _ = try store.collectGarbage(derived: [ErofsLayers.Files()])
            }
        }
    }

    struct Import: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "import",
            abstract: "Import an OCI or Docker image, or a root file system.",
            discussion: """
                SOURCE is docker://HOST[:PORT]/REPO[:TAG|@sha256:…] (a registry; anonymous, \
                basic or bearer-token auth; plain http only to loopback or with --allow-http), \
                oci:DIR[:TAG] (an OCI image layout), oci-archive:FILE[:TAG], \
                docker-archive:FILE (what `docker save` writes), a directory, or a tar file \
                (.tar, .tar.gz) holding a root file system. Image layers become images that \
                branch like any other; layers the store already holds are not unpacked again.
                """)
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "What to import (see above).") var path: String
        @Option(help: "Tag the new image.") var tag: String?
        @Option(help: "From an image index: OS/ARCH[/VARIANT].") var platform = "linux/amd64"
        @Option(help: "Registry user (or $CONTREE_REGISTRY_USER).") var username: String?
        @Option(help: "Registry password (or $CONTREE_REGISTRY_PASSWORD).") var password: String?
        @Flag(help: "Allow plain http to a registry that is not on this machine.") var allowHTTP = false
        @Option(name: .customLong("env"), help: "KEY=VALUE for a root file system's environment.") var env: [String] =
            []
        @Option(help: "A root file system's working directory.") var workdir = "/"

        func run() throws {
            try reportingErrors {
                let store = try storeOptions.open()
                // Ctrl-C (or SIGTERM) stops a registry or layout import, which removes what it
                // made; a root file system import stops the default way.
                let cancellation = Cancellation()
                let cancellable = RegistryImporter.handles(path) || OCIImporter.handles(path)
                let signals =
                    cancellable
                    ? Termination.onSignal { cancellation.cancel("the import was interrupted; nothing was imported") }
                    : []
                defer { signals.forEach { $0.cancel() } }
                if RegistryImporter.handles(path) {
                    let credentials = registryCredentials(username, password)
                    let image = try interruptible {
                        try RegistryImporter(
                            store: store, credentials: credentials, access: .any(allowHTTP: allowHTTP),
                            progress: ProgressReporter(),
                            cancellation: cancellation
                        ).importImage(path, platform: try OCI.Platform(parsing: platform))
                    }
                    if let tag { try store.tag(tag, image: image.uuid) }
                    print(image.uuid)
                    return
                }
                if OCIImporter.handles(path) {
                    var importer = try OCIImporter(store: store)
                    importer.cancellation = cancellation
                    let image = try interruptible {
                        try importer.importImage(path, platform: try OCI.Platform(parsing: platform))
                    }
                    if let tag { try store.tag(tag, image: image.uuid) }
                    print(image.uuid)
                    return
                }
                var config = ImageConfig(workingDir: workdir)
                for entry in env {
                    let key = entry.prefix { $0 != "=" }
                    config.env.removeAll { $0.hasPrefix(key + "=") }
                    config.env.append(entry)
                }
                let image = try ImageImporter(store: store).importRootfs(from: path, config: config)
                if let tag { try store.tag(tag, image: image.uuid) }
                print(image.uuid)
            }
        }
    }

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "export",
            abstract: "Write an image as a standard image podman, skopeo and Docker use.",
            discussion: """
                DEST is oci:DIR[:TAG] (an OCI image layout, added to what is there), \
                oci-archive:FILE[:TAG], or docker-archive:FILE[:NAME:TAG] (for `docker load`).
                """)
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The image.") var image: String
        @Argument(help: "Where to write it (see above).") var destination: String

        func run() throws {
            try reportingErrors {
                let store = try storeOptions.open()
                let record = try BaseImages(store: store, progress: ProgressReporter(), sources: .commands).resolve(
                    image)
                print(try OCIExporter(store: store).export(record, to: destination))
            }
        }
    }

    struct Push: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "push",
            abstract: "Push an image to a registry (docker://HOST[:PORT]/REPO:TAG).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The image.") var image: String
        @Argument(help: "docker://HOST[:PORT]/REPO:TAG") var destination: String
        @Option(help: "Registry user (or $CONTREE_REGISTRY_USER).") var username: String?
        @Option(help: "Registry password (or $CONTREE_REGISTRY_PASSWORD).") var password: String?
        @Flag(help: "Allow plain http to a registry that is not on this machine.") var allowHTTP = false

        func run() throws {
            try reportingErrors {
                let store = try storeOptions.open()
                let record = try BaseImages(store: store, progress: ProgressReporter(), sources: .commands).resolve(
                    image)
                let credentials = registryCredentials(username, password)
                print(
                    try RegistryPusher(store: store, credentials: credentials, allowHTTP: allowHTTP).push(
                        record, to: destination))
            }
        }
    }

    struct Build: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "build",
            abstract: "Build a built-in base image now (normally built on first use).")
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "busybox, debian:bookworm, or debian:bookworm+PKG,... (one apt layer over debian:bookworm).")
        var name: String

        func run() throws {
            try reportingErrors {
                let store = try storeOptions.open()
                guard BaseImages.isBuiltin(try BaseImages.canonical(name) ?? name) else {
                    throw SandboxError(
                        .invalidArgument,
                        "no built-in image \(name); choose one of \(BaseImages.names.joined(separator: ", ")), or debian:bookworm+PKG,PKG"
                    )
                }
                print(try BaseImages(store: store, progress: ProgressReporter(), sources: .commands).resolve(name).uuid)
            }
        }
    }
}

/// Runs an import that a signal may cancel: cancelled, it says so and exits 130.
func interruptible<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let error as SandboxError where error.code == .cancelled {
        printError("error: \(error.message)")
        throw ExitCode(130)
    }
}

/// Registry credentials from the options, or from CONTREE_REGISTRY_USER / _PASSWORD.
func registryCredentials(_ username: String?, _ password: String?) -> RegistryCredentials? {
    let user = username ?? getenv("CONTREE_REGISTRY_USER").map { String(cString: $0) }
    let secret = password ?? getenv("CONTREE_REGISTRY_PASSWORD").map { String(cString: $0) }
    return user.map { RegistryCredentials(username: $0, password: secret ?? "") }
}
