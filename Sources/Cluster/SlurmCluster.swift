import Foundation
import SystemSupport

/// What the coordinator asks the cluster before anything runs: that Slurm is there, that
/// its controller answers, that the partition exists, and how many CPUs it has (the run's
/// default `--jobs`).
public enum SlurmCluster {
    public struct Problem: Error, CustomStringConvertible {
        /// 2: this machine is not set up for it (no Slurm, no such partition); 75: the
        /// cluster did not answer (running again may pass).
        public var status: Int32
        public var description: String
    }

    /// The CPUs of `partition` (the default partition when nil).
    public static func cpus(partition: String?, sinfo: String = "sinfo") throws -> Int {
        for tool in [sinfo, "srun", "scancel"] where ChildProcess.lookup(tool) == nil {
            throw Problem(
                status: 2,
                description:
                    "--executor slurm needs Slurm's client tools on this machine and \(tool) is not on PATH: install them (Debian: apt-get install slurm-client) and set SLURM_CONF to the cluster's slurm.conf"
            )
        }
        let output: ChildProcess.Output
        do {
            output = try ChildProcess.run([sinfo, "--noheader", "--format=%P %C"])
        } catch {
            throw Problem(status: 2, description: "sinfo could not run: \(error)")
        }
        guard output.succeeded else {
            throw Problem(
                status: 75,
                description:
                    "the Slurm controller did not answer sinfo (\(output.stderrText.trimmingCharacters(in: .whitespacesAndNewlines))); check SLURM_CONF and that slurmctld is up"
            )
        }
        var rows: [(name: String, isDefault: Bool, cpus: Int)] = []
        for line in String(decoding: output.stdout, as: UTF8.self).split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count == 2 else { continue }
            let name = String(fields[0])
            // %C: allocated/idle/other/total.
            let total = fields[1].split(separator: "/").last.flatMap { Int($0) } ?? 0
            rows.append((name.hasSuffix("*") ? String(name.dropLast()) : name, name.hasSuffix("*"), total))
        }
        if let partition {
            guard let row = rows.first(where: { $0.name == partition }) else {
                throw Problem(
                    status: 2,
                    description:
                        "the cluster has no partition \(partition) (it has: \(rows.map(\.name).joined(separator: ", "))); pass one of those to --slurm-partition"
                )
            }
            return max(1, row.cpus)
        }
        guard let row = rows.first(where: \.isDefault) ?? rows.first else {
            throw Problem(status: 2, description: "the cluster has no partition; pass --slurm-partition")
        }
        return max(1, row.cpus)
    }
}
