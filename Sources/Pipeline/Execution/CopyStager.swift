import Glibc
import ImageFormats
import ImageStore
import SystemSupport

/// What a node's `copy:` brings in, staged as one layer directory in a lease's work directory:
/// each source path copied out of its node's snapshot with modes and owners kept and every
/// time set to the epoch, so that the same files give the same layer digest even when a rerun
/// of the source wrote them again. The digest (not the source snapshots) is what the step's key
/// takes: a change elsewhere in the source leaves the step cached.
struct StagedCopies {
    let lease: Lease
    let directory: String
    /// The staged layer's digest.
    let digest: String
    /// `TO <- NODE:PATH`, in order: what the key's `copies` lists beside the digest.
    let entries: [String]

    /// The key component: the entries and the layer's digest.
    var keyComponent: [String] { entries + ["layer " + digest] }
}

struct CopyStager {
    let store: Store
    let plan: PipelinePlan

    /// Stages `node`'s copies; nil when it has none.
    /// - Throws: `PipelineError` naming the copy when a source left no snapshot or lacks the path.
    func stage(_ node: PlanNode, results: ResultTable) throws -> StagedCopies? {
        guard !node.copies.isEmpty else { return nil }
        var sources: [(copy: CopyDefinition, source: PlanNode, image: ImageRecord)] = []
        for copy in node.copies {
            if copy.sources.isEmpty {
                throw PipelineError(
                    .failed, "copy from \(copy.definition.from.value): no node of \(copy.definition.step) matches",
                    at: copy.definition.location)
            }
            for id in copy.sources {
                guard let source = plan.node(id), let uuid = results[id]?.resultImage, let image = try store.image(uuid)
                else {
                    throw PipelineError(
                        .failed, "copy from \(id): it left no snapshot to copy \(copy.definition.path) from",
                        at: copy.definition.location)
                }
                sources.append((copy.definition, source, image))
            }
        }
        let lease = try store.acquireLease(layers: Array(Set(sources.flatMap(\.image.layers))))
        do {
            let directory = lease.workPath + "/copy"
            try FileSystem.makeDirectories(directory)
            var entries: [String] = []
            var madeParents: [String] = []
            for (copy, source, image) in sources {
                let fs = ImageFilesystem(layersTopFirst: image.layers.reversed().map(store.layerPath))
                guard let found = try fs.lookup(copy.path, followFinal: false) else {
                    throw PipelineError(
                        .failed, "copy from \(source.id): its snapshot has no \(copy.path)", at: copy.location)
                }
                let scope = NodeScope(
                    node: source, plan: plan, results: results, env: [:], pipelineName: plan.definition.name,
                    cancelled: false)
                let to = copy.to.render(in: scope)
                let name = copy.path.split(separator: "/").last.map(String.init) ?? ""
                let target = InputResolver.normalize(to.hasSuffix("/") ? to + name : to)
                guard target != "/", !target.split(separator: "/").contains("..") else {
                    throw PipelineError(
                        .failed, "copy to '\(to)' (from \(source.id)) is not a path below /", at: copy.location)
                }
                // Parents the copy needs: root-owned, 0755, at time 0 (the same every time).
                var parent = ""
                for part in target.split(separator: "/").dropLast() {
                    parent += "/" + part
                    if try FileSystem.status(directory + parent) == nil {
                        try FileSystem.makeDirectory(directory + parent, mode: 0o755)
                        madeParents.append(directory + parent)
                    }
                }
                if try FileSystem.status(directory + target) != nil {
                    throw PipelineError(
                        .failed,
                        "copy from \(source.id) to \(target): another copy of this step already put something there; give each its own `to` (e.g. with ${{ matrix.NAME }})",
                        at: copy.location)
                }
                try fs.copyTree(found, to: RawPath(directory + target), time: timespec(tv_sec: 0, tv_nsec: 0))
                entries.append("\(target) <- \(source.id):\(copy.path)")
            }
            for path in madeParents.reversed() {
                var times = [timespec(tv_sec: 0, tv_nsec: 0), timespec(tv_sec: 0, tv_nsec: 0)]
                _ = utimensat(AT_FDCWD, path, &times, AT_SYMLINK_NOFOLLOW)
            }
            let summary = try LayerArchiver.archive(directory: directory)
            return StagedCopies(lease: lease, directory: directory, digest: summary.digest, entries: entries)
        } catch {
            lease.release()
            throw error
        }
    }
}
