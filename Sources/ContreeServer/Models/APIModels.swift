import Foundation

// The wire types of the ConTree API (openapi.yaml), with the clients' observed tolerances.

/// `{value, encoding: ascii|base64, truncated}`.
struct StreamValue: Codable, Sendable, Equatable {
    var value: String
    var encoding: String
    var truncated: Bool?

    /// ASCII when every byte is printable or `\n` `\r` `\t`, base64 otherwise.
    init(_ bytes: [UInt8], truncated: Bool? = nil) {
        let printable = bytes.allSatisfy { ($0 >= 0x20 && $0 < 0x7f) || $0 == 0x0a || $0 == 0x0d || $0 == 0x09 }
        if printable {
            value = String(decoding: bytes, as: UTF8.self)
            encoding = "ascii"
        } else {
            value = Data(bytes).base64EncodedString()
            encoding = "base64"
        }
        self.truncated = truncated
    }

    init(value: String, encoding: String, truncated: Bool?) {
        self.value = value
        self.encoding = encoding
        self.truncated = truncated
    }
}

/// The stdin payload of a spawn or of `subprocesses/{spid}/stdin`.
struct StdinPayload: Codable, Sendable, Equatable {
    var value: String
    var encoding: String?
    var close: Bool?

    /// The bytes it carries.
    func bytes() throws -> [UInt8] {
        switch encoding ?? "ascii" {
        case "ascii", "utf-8", "utf8": return Array(value.utf8)
        case "base64":
            guard let data = Data(base64Encoded: value) else {
                throw APIError(.badRequest, "stdin.value is not valid base64")
            }
            return Array(data)
        default: throw APIError(.badRequest, "stdin.encoding must be ascii or base64, not \(encoding ?? "")")
        }
    }
}

/// One entry of a spawn's `files` map.
struct FileMappingRequest: Codable, Sendable, Equatable {
    var uuid: String
    var mode: FlexibleMode?
    var uid: Int?
    var gid: Int?
}

/// A file mode sent as `"0644"`, `"0o100644"`, `"644"` or a number.
struct FlexibleMode: Codable, Sendable, Equatable {
    var bits: UInt32
    var text: String

    init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let number = try? container.decode(UInt32.self) {
            // A JSON number is the mode's value (420 for 0644).
            bits = number & 0o7777
            text = "0" + String(number & 0o7777, radix: 8)
            return
        }
        let raw = try container.decode(String.self)
        var digits = raw.lowercased()
        if digits.hasPrefix("0o") { digits.removeFirst(2) }
        guard let value = UInt32(digits, radix: 8) else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "file mode '\(raw)' is not octal")
        }
        bits = value & 0o7777
        text = raw
    }

    func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(text)
    }
}

struct NetworkingRequest: Codable, Sendable, Equatable {
    var enabled: Bool?
}

struct ResourceLimitsRequest: Codable, Sendable, Equatable {
    var maxLayerBytes: Int64?

    enum CodingKeys: String, CodingKey {
        case maxLayerBytes = "max_layer_bytes"
    }
}

/// `POST /v1/instances`.
struct SpawnRequest: Codable, Sendable {
    var command: String
    /// Required by `POST /v1/instances`; the resume extension names the image in its path.
    var image: String?
    var args: [String]?
    var shell: Bool?
    var env: [String: String?]?
    var cwd: String?
    var timeout: Int?
    var hostname: String?
    var files: [String: FileMappingRequest]?
    var stdin: StdinPayload?
    var disposable: Bool?
    var resourcesLimits: ResourceLimitsRequest?
    var truncateOutputAt: Int?
    var networking: NetworkingRequest?
    var uid: Int?
    var gid: Int?
    var preserveEnv: Bool?
    var preserveCwd: Bool?

    enum CodingKeys: String, CodingKey {
        case command, image, args, shell, env, cwd, timeout, hostname, files, stdin, disposable
        case resourcesLimits = "resources_limits"
        case truncateOutputAt = "truncate_output_at"
        case networking, uid, gid
        case preserveEnv = "preserve_env"
        case preserveCwd = "preserve_cwd"
    }
}

/// `POST /v1/operations/{id}/subprocesses`.
struct ExecRequestBody: Codable, Sendable {
    var command: String
    var args: [String]?
    var shell: Bool?
    var env: [String: String?]?
    var cwd: String?
    var stdin: StdinPayload?
    var truncateOutputAt: Int?
    var uid: Int?
    var gid: Int?

    enum CodingKeys: String, CodingKey {
        case command, args, shell, env, cwd, stdin
        case truncateOutputAt = "truncate_output_at"
        case uid, gid
    }
}

/// `POST /v1/images/import`.
struct ImportRequest: Decodable, Sendable {
    struct RegistrySpec: Decodable, Sendable {
        struct Credentials: Decodable, Sendable {
            var username: String
            var password: String
        }
        var url: String
        var credentials: Credentials?
    }
    var registry: RegistrySpec
    var tag: String?
    var timeout: Int?
}
