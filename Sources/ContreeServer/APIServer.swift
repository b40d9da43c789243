import FoundationEssentials
import Glibc
import Hummingbird
import ImageStore
import Logging
import Registry
import Sandbox
import ServiceLifecycle
import SystemSupport

/// `contree-pipeline serve`: the ConTree REST API over the local engine.
public struct APIServer: Sendable {
    let state: ServerState
    /// Whether the tokens file was created by this start (its token should be shown).
    public let createdTokens: Bool
    public let tokensPath: String

    /// Opens (or creates, with one fresh token) the tokens file, prepares the API tables,
    /// and marks operations a previous server left running as FAILED.
    /// - Parameter registries: what imports may reach (`serve --registry`); none by default.
    /// - Parameter allowEgress: every token's instances with networking enabled get egress
    ///   (`serve --allow-egress`); otherwise only tokens whose line says `allow_egress=1`.
    public init(
        engine: SandboxEngine, tokensPath: String, isolation: IsolationKind = .container,
        registries: RegistryAccess = .allowlistClosed, allowEgress: Bool = false, metrics: MetricsOptions? = nil
    ) throws {
        guard engine.availableBackends.contains(isolation) else {
            throw SandboxError(.unsupported, "the \(isolation.rawValue) backend is not available in this build")
        }
        // One server per store: recovery marks every unfinished operation as failed.
        let lockPath = engine.store.root + "/serve.lock"
        let lock = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard lock >= 0 else { throw SandboxError.system("open(\(lockPath))") }
        guard flock(lock, LOCK_EX | LOCK_NB) == 0 else {
            close(lock)
            throw SandboxError(
                .conflict,
                "another `contree-pipeline serve` already serves the store \(engine.store.root); stop it, or give this one another --home"
            )
        }
        // Held (and the descriptor kept open) until the process ends.
        var (tokens, created) = try TokenFile.loadOrCreate(tokensPath)
        if allowEgress { tokens = tokens.allowingEgress() }
        self.tokensPath = tokensPath
        self.createdTokens = created
        state = try ServerState(
            tokens: tokens, engine: engine, isolation: isolation, registries: registries, metrics: metrics)
        try state.operations.recover()
    }

    /// How long a connection may send nothing (CONTREE_SERVE_IDLE_SECONDS, for tests).
    static let idleSeconds = Int64(ProcessInfo.processInfo.environment["CONTREE_SERVE_IDLE_SECONDS"] ?? "") ?? 10

    /// The tokens file's default place: beside the store.
    public static func defaultTokensPath(store: Store) -> String { store.root + "/serve-tokens" }

    /// Names of the tokens' namespaces.
    public var tokenNames: [String] { state.tokens.tokens.map(\.name) }

    /// Serves until SIGINT or SIGTERM. `onReady` gets the bound port (useful with port 0).
    public func run(host: String, port: Int, onReady: @escaping @Sendable (Int) async -> Void) async throws {
        // The default image is listed from the first request on.
        let base = state.api.baseImages
        _ = try await BlockingPool.shared.run { try base.resolve(BaseImages.defaultImage) }
        var logger = Logger(label: "contree-serve")
        logger.logLevel = .warning
        let app = Application(
            responder: APIResponder(server: state),
            // A connection that sends no complete request part for this long is closed: half-open
            // and trickling clients do not hold the server's connections. A response being written
            // (an event stream) is not idle.
            server: .http1(configuration: .init(idleTimeout: .seconds(APIServer.idleSeconds))),
            configuration: ApplicationConfiguration(
                address: .hostname(host, port: port), serverName: "contree-pipeline"),
            onServerRunning: { channel in await onReady(channel.localAddress?.port ?? port) },
            logger: logger)
        // Shutdown runs backwards: first the operations end (recorded as cancelled, their event
        // streams closed with `completion`), then the HTTP server drains its connections.
        let group = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: [app, OperationsService(operations: state.operations)],
                gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}

/// Ends the running operations when `serve` is asked to stop.
struct OperationsService: Service {
    let operations: OperationManager

    func run() async throws {
        try? await gracefulShutdown()
        await operations.shutdown(reason: "the server (contree-pipeline serve) was stopped")
    }
}
