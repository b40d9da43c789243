import ArgumentParser
import ContreeServer
import Glibc
import Registry
import Sandbox
import SystemSupport

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve the ConTree REST API (/v1) on this machine's engine.",
        discussion: """
            The official ConTree clients (Python SDK, `contree` CLI, MCP server) work against it \
            unchanged: point them at http://HOST:PORT with a token from the tokens file. Each \
            token is its own namespace of images, files and operations; built-in images are \
            shared. The tokens file holds one `NAME TOKEN [max_concurrency=N] [max_timeout=S] \
            [max_layer_bytes=N] [import=1] [allow_egress=1]` per line; `serve` creates it with one random token on \
            first start. Imports reach only the registries named with --registry.
            """)

    @OptionGroup var storeOptions: StoreOptions
    @Option(help: "Address to listen on, HOST:PORT (port 0 picks a free one).") var listen = "127.0.0.1:8080"
    @Option(help: "The tokens file (default: serve-tokens in the store).") var tokens: String?
    @Option(help: "Where instances run: container (default) or vm (QEMU microvms).")
    var isolation: IsolationKind = .container
    @Option(
        name: .customLong("registry"),
        help: """
            A registry imports may reach, HOST[:PORT] (https; http on loopback) or http://HOST[:PORT] \
            (repeatable; none by default). Tokens import only with import=1 in the tokens file.
            """)
    var registries: [String] = []
    @Flag(
        help: """
            Instances spawned with networking enabled (the API's default) get egress, a NAT uplink \
            to the outside (pasta); without it, only tokens whose line says allow_egress=1 do, and \
            the others get loopback only.
            """)
    var allowEgress = false
    @Flag(
        help: """
            Serve Prometheus metrics at /metrics beside the API (operations by status, instance \
            durations, CPU and memory, images, store bytes, queues). Unauthenticated only when \
            listening on loopback; elsewhere it needs --metrics-token.
            """)
    var metrics = false
    @Option(help: "A scraper must send Authorization: Bearer TOKEN to /metrics (or $CONTREE_METRICS_TOKEN).")
    var metricsToken: String?

    func run() async throws {
        do {
            guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]),
                (0...65535).contains(port)
            else {
                throw SandboxError(.invalidArgument, "--listen \(listen) must be HOST:PORT, e.g. 127.0.0.1:8080")
            }
            let host = String(listen[..<colon]).trimmingCharacters(in: ["[", "]"])
            var metricsOptions: MetricsOptions?
            if metrics {
                let token = metricsToken ?? getenv("CONTREE_METRICS_TOKEN").map { String(cString: $0) }
                let loopback = ["127.0.0.1", "::1", "localhost"].contains(host) || host.hasPrefix("127.")
                if token == nil && !loopback {
                    printError(
                        "error: serve --metrics on \(host), which is not loopback, needs --metrics-token TOKEN (or $CONTREE_METRICS_TOKEN): the metrics name every namespace"
                    )
                    throw ExitCode(2)
                }
                if let token, token.count < 16 {
                    printError("error: --metrics-token is shorter than 16 characters; use a long random one")
                    throw ExitCode(2)
                }
                metricsOptions = MetricsOptions(token: token, version: ContreePipeline.version)
            }
            let store = try storeOptions.open()
            // Registry references only through the server's own path (the operator's allowlist,
            // import=1 tokens), never the commands' open registry source.
            let engine = SandboxEngine.withAllBackends(store: store, progress: ProgressReporter(), sources: .builtIn)
            let path = tokens ?? APIServer.defaultTokensPath(store: store)
            let server = try APIServer(
                engine: engine, tokensPath: path, isolation: isolation,
                registries: try RegistryAccess.allowlist(registries), allowEgress: allowEgress,
                metrics: metricsOptions)
            var st = stat()
            if server.createdTokens {
                printError(
                    "created the tokens file \(path) with one new token (namespace 'default'); read it from there")
            } else if stat(path, &st) == 0, st.st_mode & 0o077 != 0 {
                printError(
                    "warning: the tokens file \(path) can be read by other users (mode \(String(st.st_mode & 0o777, radix: 8))); run `chmod 600 \(path)`"
                )
            }
            let metricsServed = metricsOptions != nil
            try await server.run(host: host, port: port) { bound in
                print(
                    "serving the ConTree API on http://\(host):\(bound) (tokens: \(path))"
                        + (!metricsServed ? "" : "; Prometheus metrics at http://\(host):\(bound)/metrics"))
                fflush(nil)
            }
        } catch {
            throw fail(error)
        }
    }
}
