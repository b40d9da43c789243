import ArgumentParser
import FoundationEssentials
import Glibc
import ImageFormats
import ImageStore
import Sandbox
import SystemSupport

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Read an image's files without starting a sandbox.",
        subcommands: [List.self, Cat.self, Export.self])

    struct Target: ParsableArguments {
        @OptionGroup var storeOptions: StoreOptions
        @Argument(help: "The image.") var image: String
        @Argument(help: "A path inside the image.") var path: String = "/"

        func open() throws -> (Store, ImageFilesystem, ImageFilesystem.Node) {
            let store = try storeOptions.open()
            let record = try BaseImages(store: store, progress: ProgressReporter(), sources: .commands).resolve(image)
            let fs = ImageFilesystem(layersTopFirst: record.layers.reversed().map(store.layerPath))
            guard let node = try fs.lookup(path) else {
                throw SandboxError(.notFound, "\(path) does not exist in image \(record.uuid)")
            }
            return (store, fs, node)
        }
    }

    struct Entry: Encodable {
        var name: String
        var type: String
        var mode: String
        var uid: UInt32
        var gid: UInt32
        var size: Int64
        var mtime: Int
        var target: String?
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List a directory of an image.")
        @OptionGroup var target: Target
        @Flag(name: [.short, .long], help: "Long format: type, mode, owner, size, time.") var long = false
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            try reportingErrors {
                let (_, fs, node) = try target.open()
                let children =
                    node.isDirectory ? try fs.list(node) : [(node.path.isEmpty ? "/" : node.path.lastComponent, node)]
                let entries = try children.map { name, child -> Entry in
                    let st = child.status
                    let type: String
                    switch st.st_mode & S_IFMT {
                    case S_IFDIR: type = "directory"
                    case S_IFLNK: type = "symlink"
                    case S_IFREG: type = "file"
                    case S_IFCHR: type = "char"
                    case S_IFBLK: type = "block"
                    case S_IFIFO: type = "fifo"
                    default: type = "other"
                    }
                    let link = child.isSymlink ? try fs.readLink(child) : nil
                    return Entry(
                        name: json ? name.text : name.description, type: type,
                        mode: String(st.st_mode & 0o7777, radix: 8), uid: st.st_uid,
                        gid: st.st_gid,
                        size: Int64(st.st_size), mtime: st.st_mtim.tv_sec,
                        target: link.map { json ? $0.text : $0.description })
                }
                if json { return try printJSON(entries) }
                for e in entries {
                    if long {
                        let marker =
                            e.type == "directory" ? "d" : e.type == "symlink" ? "l" : e.type == "file" ? "-" : "c"
                        let when = Date(timeIntervalSince1970: Double(e.mtime)).formatted(.iso8601)
                        print(
                            "\(marker)\(e.mode.leftPadded(4)) \(String(e.uid).leftPadded(5)) \(String(e.gid).leftPadded(5)) \(String(e.size).leftPadded(10)) \(when) \(e.name)\(e.target.map { " -> \($0)" } ?? "")"
                        )
                    } else {
                        print(e.name + (e.type == "directory" ? "/" : ""))
                    }
                }
            }
        }
    }

    struct Cat: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "cat", abstract: "Print a file of an image.")
        @OptionGroup var target: Target

        func run() throws {
            try reportingErrors {
                let (_, fs, node) = try target.open()
                guard node.isRegular else {
                    throw SandboxError(.invalidArgument, "\(target.path) is not a regular file in the image")
                }
                let fd = try fs.openFile(node)
                defer { close(fd) }
                var buffer = [UInt8](repeating: 0, count: 1 << 16)
                while true {
                    let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    if n < 0 && errno == EINTR { continue }
                    guard n >= 0 else { throw SandboxError.system("read(\(target.path))") }
                    if n == 0 { break }
                    // A reader that went away (`| head`) ends the output, not with an error.
                    do {
                        try buffer.withUnsafeBytes {
                            try FileSystem.writeAll(fd: 1, UnsafeRawBufferPointer(rebasing: $0[0..<n]), path: "stdout")
                        }
                    } catch { return }
                }
            }
        }
    }

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "export",
            abstract: "Write a path of an image (and everything below it) as a tar file.")
        @OptionGroup var target: Target
        @Argument(help: "The tar file to write, or - for stdout.") var destination: String

        func run() throws {
            try reportingErrors {
                let (_, fs, node) = try target.open()
                let toStdout = destination == "-"
                let temporary = destination + ".partial"
                let fd = toStdout ? 1 : open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                guard fd >= 0 else { throw SandboxError(.systemCall, "open(\(destination))", errno: errno) }
                do {
                    try fs.export(node) { chunk in try FileSystem.writeAll(fd: fd, chunk, path: destination) }
                } catch {
                    if !toStdout {
                        close(fd)
                        unlink(temporary)
                    }
                    throw error
                }
                if !toStdout {
                    fsync(fd)
                    close(fd)
                    guard rename(temporary, destination) == 0 else {
                        throw SandboxError(.systemCall, "rename(\(temporary), \(destination))", errno: errno)
                    }
                }
            }
        }
    }
}

extension String {
    func leftPadded(_ width: Int) -> String {
        count >= width ? self : String(repeating: " ", count: width - count) + self
    }
}
