import ArgumentParser
import FoundationEssentials
import Glibc
import ImageStore
import Registry
import Sandbox
import SystemSupport
import VirtualMachine

/// Options every command that touches the store shares.
struct StoreOptions: ParsableArguments {
    @Option(name: .long, help: "The store directory (default: $CONTREE_HOME or ~/.local/share/contree).")
    var home: String?

    func open() throws -> Store {
        try Store(root: home ?? Store.defaultRoot)
    }
}

extension ImageSources {
    /// What the commands import from: layouts and archives, and registry references
    /// (docker://…) wherever an image is named.
    static let commands = RegistryImporter.imageSource()
}

/// Prints an error the way every command does and picks the exit code: 2 for input the user
/// can fix, 1 for everything else.
func fail(_ error: Error) -> ExitCode {
    if let error = error as? SandboxError {
        printError("error: \(error)")
        switch error.code {
        case .invalidArgument, .pathEscapes, .notFound, .conflict: return ExitCode(2)
        default: return ExitCode(1)
        }
    }
    if error is ExitCode { return error as! ExitCode }
    printError("error: \(error)")
    return ExitCode(1)
}

/// Runs `body`, turning thrown errors into a message and an exit code.
func reportingErrors<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch let error as ExitCode { throw error } catch { throw fail(error) }
}

func reportingErrors<T>(_ body: () async throws -> T) async throws -> T {
    do { return try await body() } catch let error as ExitCode { throw error } catch { throw fail(error) }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    encoder.dateEncodingStrategy = .iso8601
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

enum Format {
    static func date(_ date: Date) -> String {
        date.formatted(.iso8601)
    }

    /// Parses an age: `90s`, `30m`, `12h`, `7d`, `2w`, `1d12h`, or a number of seconds.
    static func parseAge(_ text: String) -> Double? {
        Units.seconds(text.trimmingCharacters(in: .whitespaces), days: true)
    }

    /// Renders rows as aligned columns.
    static func table(_ header: [String], _ rows: [[String]]) -> String {
        var widths = header.map(\.count)
        for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in
                i == cells.count - 1 ? c : c + String(repeating: " ", count: widths[i] - c.count)
            }
            .joined(separator: "  ")
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }
}

func printError(_ message: String) {
    let bytes = Array((message + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

extension SandboxEngine {
    /// The engine with both isolation backends: containers, and QEMU microvms (whose guest kit
    /// is prepared on first use).
    static func withAllBackends(
        store: Store, progress: ProgressReporter? = nil, sources: ImageSources = .commands
    ) -> SandboxEngine {
        SandboxEngine(
            store: store, backends: [ContainerBackend(), VMBackend(progress: progress)], progress: progress,
            sources: sources)
    }
}
