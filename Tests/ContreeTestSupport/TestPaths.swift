import Glibc
import SystemSupport

// Built for the test targets; a plain `swift build` builds this target too, without Testing.
#if canImport(Testing)
    import Testing

    extension Trait where Self == ConditionTrait {
        /// A test that needs root: namespaces, mounts, cgroups (CI runs as root).
        public static var requiresRoot: Self {
            .enabled(if: geteuid() == 0, "needs root: namespaces, mounts and cgroups")
        }
    }
#endif

/// Where the package and its built binaries are.
public enum Paths {
    /// The package root, from this file's path (Tests/ContreeTestSupport/TestPaths.swift).
    public static let packageRoot: String = {
        var parts = #filePath.split(separator: "/").map(String.init)
        parts.removeLast(3)
        return "/" + parts.joined(separator: "/")
    }()

    /// The CLI binary built next to the tests.
    public static var cli: String {
        for configuration in ["debug", "release"] {
            let path = packageRoot + "/.build/\(configuration)/contree-pipeline"
            if FileSystem.exists(path) { return path }
        }
        return packageRoot + "/.build/debug/contree-pipeline"
    }
}
