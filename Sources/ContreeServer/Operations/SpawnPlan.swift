import FoundationEssentials
import Glibc
import ImageStore
import Registry
import Sandbox
import Synchronization

/// A validated `POST /v1/instances`.
struct SpawnPlan: Sendable {
    enum ImageTarget: Sendable {
        case record(ImageRecord)
        /// A built-in base image not built yet: built when the operation starts.
        case builtin(String)
        /// An image outside the store (`docker://…`, `oci:…`): imported when the operation
        /// starts, and then part of the namespace.
        case external(String)
    }
    var uuid: String
    var token: Token
    var image: ImageTarget
    var command: String
    var args: [String]
    var shell: Bool
    var env: [String: String?]
    var cwd: String?
    var files: [FileMapping]
    var fileRequests: [(path: String, uuid: String, mode: String)]
    var timeout: Int
    var hostname: String
    var disposable: Bool
    var stdin: [UInt8]
    var stdinText: StdinPayload
    var keepStdinOpen: Bool
    var truncateAt: Int
    var network: NetworkMode
    var uid: Int
    var gid: Int
    var preserveEnv: Bool
    var preserveCwd: Bool
    var maxLayerBytes: Int64
    /// Resume the memory snapshot the image holds (`POST /x-contree/images/{uuid}/resume`).
    var resume = false

    var argv: [String] { shell ? ["/bin/sh", "-c", command] : [command] + args }

    /// `metadata` of the operation, without `result`: every field the clients require.
    func metadata(image: String) -> JSON {
        let envJSON = JSON.object(env.sorted { $0.key < $1.key }.map { ($0.key, JSON.optional($0.value)) })
        let filesJSON = JSON.object(
            fileRequests.map { ($0.path, JSON.object([("uuid", .string($0.uuid)), ("mode", .string($0.mode))])) })
        var stdinMembers: [(String, JSON)] = [
            ("value", .string(stdinText.value)), ("encoding", .string(stdinText.encoding ?? "ascii")),
        ]
        stdinMembers.append(("close", .bool(!keepStdinOpen)))
        return .object([
            ("command", .string(command)), ("image", .string(image)), ("args", .array(args.map(JSON.string))),
            ("shell", .bool(shell)), ("env", envJSON), ("cwd", .string(cwd ?? "")), ("timeout", .int(timeout)),
            ("hostname", .string(hostname)), ("files", filesJSON), ("stdin", .object(stdinMembers)),
            ("disposable", .bool(disposable)), ("truncate_output_at", .int(truncateAt)), ("uid", .int(uid)),
            ("gid", .int(gid)), ("preserve_env", .bool(preserveEnv)), ("preserve_cwd", .bool(preserveCwd)),
            ("networking", .object([("enabled", .bool(network != .none))])),
            ("resources_limits", .object([("max_layer_bytes", .int(maxLayerBytes))])),
        ])
    }

    var imageLabel: String {
        switch image {
        case .record(let record): record.uuid
        case .builtin(let name): "tag:" + name
        case .external(let reference): reference
        }
    }
}
