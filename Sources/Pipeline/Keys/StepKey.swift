import Crypto
import Foundation
import ImageStore
import SystemSupport

extension SystemSupport.Digest {
    /// The digest of a value's JSON with sorted keys and slashes as they are: what step and
    /// score keys are (equal values, equal keys; any change, another key).
    static func ofCanonicalJSON<T: Encodable>(_ value: T) -> SystemSupport.Digest {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return sha256((try? encoder.encode(value)) ?? Data())
    }
}

/// Everything that determines a step's result, in a canonical form. The step key is the
/// sha256 of its JSON encoding (sorted keys): equal keys mean the step can be reused.
public struct StepKeyComponents: Codable, Sendable, Equatable {
    /// Bumped when the meaning of a component changes, so old cache entries stop matching.
    public static let currentFormat = 2

    public var format: Int
    /// Content digest of the image the step starts from (its layer chain and config).
    public var parentImage: String
    public var command: [String]
    /// `NAME=value`, sorted; secrets are not here.
    public var env: [String]
    public var workdir: String
    public var user: String
    /// `PATH-IN-SANDBOX mode sha256`, sorted.
    public var inputs: [String]
    /// `NAME=fingerprint` (HMAC-SHA256 with the store's key), sorted.
    public var secrets: [String]
    public var isolation: String
    /// `none`, `loopback`, `egress` or `egress+host-loopback`: what the command could reach
    /// can change what it does.
    public var network: String
    /// What `copy:` brought in: `TO <- NODE:PATH` entries and the staged layer's digest (the
    /// copied subtrees, not the whole source snapshots). Absent (not empty) without `copy:`,
    /// so keys of steps without copies are what they were.
    public var copies: [String]? = nil
    /// The services the step runs beside: `NAME image-digest command env...`. Absent without.
    public var services: [String]? = nil
    /// `memory` for a step that keeps its processes (`persist: memory`). Absent otherwise.
    public var persist: String? = nil
    /// The digest of the memory snapshot the step resumes (its parent's, for a VM step).
    /// Absent when it starts from files.
    public var resumes: String? = nil

    enum CodingKeys: String, CodingKey {
        case format
        case parentImage = "parent_image"
        case command, env, workdir, user, inputs, secrets, isolation, network, copies, services, persist, resumes
    }

    public var key: String { Digest.ofCanonicalJSON(self).description }

    /// Names of the components that differ from `other`, with a short description.
    public func differences(from other: StepKeyComponents) -> [String] {
        var result: [String] = []
        if format != other.format { result.append("format version: \(other.format) -> \(format)") }
        if parentImage != other.parentImage {
            result.append(
                "parent image: \(other.parentImage.prefix(19))… -> \(parentImage.prefix(19))… (an earlier step changed)"
            )
        }
        if command != other.command { result.append("command: the script or shell changed") }
        func listDiff(_ name: String, _ mine: [String], _ theirs: [String], key: (String) -> String) {
            let a = Dictionary(mine.map { (key($0), $0) }, uniquingKeysWith: { $1 })
            let b = Dictionary(theirs.map { (key($0), $0) }, uniquingKeysWith: { $1 })
            for k in Set(a.keys).union(b.keys).sorted() where a[k] != b[k] {
                switch (b[k], a[k]) {
                case (nil, _): result.append("\(name): \(k) added")
                case (_, nil): result.append("\(name): \(k) removed")
                default: result.append("\(name): \(k) changed")
                }
            }
        }
        listDiff("env", env, other.env) { String($0.prefix { $0 != "=" }) }
        if workdir != other.workdir { result.append("workdir: \(other.workdir) -> \(workdir)") }
        if user != other.user { result.append("user: \(other.user) -> \(user)") }
        listDiff("input", inputs, other.inputs) { String($0.prefix { $0 != " " }) }
        listDiff("secret", secrets, other.secrets) { String($0.prefix { $0 != "=" }) }
        if isolation != other.isolation { result.append("isolation: \(other.isolation) -> \(isolation)") }
        if network != other.network { result.append("network: \(other.network) -> \(network)") }
        if persist != other.persist { result.append("persist: \(other.persist ?? "files") -> \(persist ?? "files")") }
        if resumes != other.resumes {
            result.append(
                "resumed memory snapshot: \(other.resumes.map { String($0.prefix(19)) + "…" } ?? "none") -> \(resumes.map { String($0.prefix(19)) + "…" } ?? "none") (the parent's processes changed)"
            )
        }
        listDiff("service", services ?? [], other.services ?? []) { String($0.prefix { $0 != " " }) }
        if copies != other.copies {
            let changed = (copies ?? []).last != (other.copies ?? []).last
            result.append(
                changed ? "copies: the copied files changed" : "copies: what `copy:` brings in moved or was renamed")
        }
        return result
    }

    /// The content digest of an image: its layers in order plus its config. Two images with
    /// the same files and config have the same digest, whatever their UUIDs.
    public static func imageDigest(_ image: ImageRecord) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let config = (try? encoder.encode(image.config)) ?? Data()
        var hasher = Digest.Hasher()
        for layer in image.layers { hasher.update(Array((layer + "\n").utf8)) }
        hasher.update(Array(config))
        return hasher.finalize().description
    }

    /// A keyed fingerprint of a secret's value: equal values give equal fingerprints in this
    /// store, and nothing about the value can be learned from it.
    public static func fingerprint(_ value: String, key: [UInt8]) -> String {
        let mac = HMAC<SHA256>.authenticationCode(for: Data(value.utf8), using: SymmetricKey(data: key))
        return "hmac-sha256:" + Hex.encode(mac)
    }
}
