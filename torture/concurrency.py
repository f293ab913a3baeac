"""Campaign ``concurrency``: many associations at once, and the same instances sent by two
associations at the same moment: each instance stored once, every status right."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torture.node import Node
from torture.traffic import SUCCESS, Instance, SendLog, dataset_sha256, send_files, write_series


@dataclass
class ConcurrencyReport:
    associations: int = 0
    instances: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    stored_files: int = 0
    catalogue_instances: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        sts = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return [
            f"concurrency: {self.associations} associations, {self.instances} distinct "
            f"instances, each sent by two associations at once; statuses {sts}",
            f"concurrency: {self.stored_files} files, {self.catalogue_instances} catalogue rows",
            f"concurrency: {self.seconds:.0f} s; " + ("OK" if self.ok else
                                                      "FAILED: " + "; ".join(self.problems[:10])),
        ]


def run(root: Path, *, associations: int = 8, per_association: int = 500, seed: int = 0,
        log: Any = print) -> ConcurrencyReport:
    t0 = time.monotonic()
    node = Node(root / "node", overrides={"worker": {"enabled": False},
                                          "dicom": {"max_associations": 2 * associations}})
    n = associations * per_association // 2  # distinct: each is sent by two associations
    instances = write_series(root / "files", studies=max(1, n // 50), per_series=50, seed=seed)
    report = ConcurrencyReport(associations=associations, instances=len(instances))
    # association 2i and 2i+1 send the same slice of instances, in the same order
    pairs = [instances[i::associations // 2] for i in range(associations // 2)]
    groups: list[list[Instance]] = []
    for p in pairs:
        groups += [p, list(p)]
    logs = [SendLog() for _ in groups]
    node.start()
    try:
        threads = [threading.Thread(target=send_files, args=(node.port, g, lg),
                                    kwargs={"calling": f"CONC{i}"}, daemon=True)
                   for i, (g, lg) in enumerate(zip(groups, logs, strict=True))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1200)
        if any(t.is_alive() for t in threads):
            report.problems.append("a sender did not finish within 20 minutes")
    finally:
        node.stop()
    for lg in logs:
        for st in lg.statuses.values():
            key = f"0x{st:04X}"
            report.statuses[key] = report.statuses.get(key, 0) + 1
        unanswered = sum(1 for _ in lg.errors)
        if unanswered:
            report.problems.append(f"{unanswered} send errors, e.g. {lg.errors[0]}")
    for g, lg in zip(groups, logs, strict=True):
        missing = [i.sop_instance_uid for i in g if i.sop_instance_uid not in lg.statuses]
        if missing:
            report.problems.append(f"{len(missing)} instances never answered, e.g. {missing[0]}")
        bad = {st for st in lg.statuses.values() if st != SUCCESS}
        if bad:
            report.problems.append("statuses other than Success: " +
                                   ", ".join(f"0x{b:04X}" for b in sorted(bad)))
    files = node.stored_files()
    report.stored_files = len(files)
    status = node.cli_json("status")
    report.catalogue_instances = int(status["instances_total"])
    if report.stored_files != len(instances) or report.catalogue_instances != len(instances):
        report.problems.append(f"{len(instances)} distinct instances sent: {report.stored_files} "
                               f"files, {report.catalogue_instances} rows")
    wrong = [i.sop_instance_uid for i in instances if i.sop_instance_uid in files
             and dataset_sha256(files[i.sop_instance_uid].read_bytes()) != i.sha256]
    if wrong:
        report.problems.append(f"{len(wrong)} stored files differ from what was sent")
    verify = node.cli_json("verify", "--min-age", "0")
    if not verify["clean"]:
        report.problems.append(f"verify not clean: {len(verify['orphans'])} orphans, "
                               f"{len(verify['missing'])} missing, "
                               f"{len(verify['stale_temporaries'])} temporaries")
    report.seconds = time.monotonic() - t0
    return report
