"""Campaign ``kill9``: SIGKILL ``sidecar serve`` (service and receivers) at random moments
under load, restart, and check that nothing acknowledged was lost or changed."""

from __future__ import annotations

import random
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torture.node import HarnessError, Node, free_port
from torture.traffic import Instance, SendLog, dataset_sha256, senders, write_series


@dataclass
class Kill9Report:
    cycles: int = 0
    sent: int = 0
    acknowledged: int = 0
    lost: int = 0
    changed: int = 0
    crashes: int = 0  # starts that failed, and nodes that died before the kill
    temporaries_after_restart: int = 0
    orphans: int = 0
    missing_rows: int = 0
    pending_after: int = 0
    index_vectors: int | None = None
    catalogue_vectors: int | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [
            f"kill9: {self.cycles} cycles, {self.sent} instances sent, {self.acknowledged} "
            f"acknowledged, {self.lost} lost, {self.changed} changed, {self.crashes} crashes",
            f"kill9: after the last restart: {self.temporaries_after_restart} temporaries, "
            f"{self.orphans} orphan files, {self.missing_rows} rows without a file, "
            f"{self.pending_after} instances left pending, index {self.index_vectors} vectors "
            f"vs catalogue {self.catalogue_vectors}",
            f"kill9: {self.seconds:.0f} s; " + ("OK" if self.ok else
                                                 "FAILED: " + "; ".join(self.problems[:10])),
        ]


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def _check_files(node: Node, acked: dict[str, Instance], report: Kill9Report) -> None:
    files = node.stored_files()
    lost = [uid for uid in acked if uid not in files]
    changed = [uid for uid, inst in acked.items()
               if uid in files and dataset_sha256(files[uid].read_bytes()) != inst.sha256]
    report.lost, report.changed = len(lost), len(changed)
    if lost:
        report.problems.append(f"{len(lost)} acknowledged instance(s) lost, e.g. {lost[0]}")
    if changed:
        report.problems.append(f"{len(changed)} acknowledged instance(s) changed, e.g. "
                               f"{changed[0]}")


def run(root: Path, *, cycles: int, per_cycle: int = 60, associations: int = 3,
        seed: int = 0, max_kill_after: float = 3.0, embed: bool = True,
        log: Any = print) -> Kill9Report:
    """``cycles`` times: start, send from ``associations`` senders, SIGKILL at a random moment."""
    t0 = time.monotonic()
    rng = random.Random(seed)
    http_port = free_port()
    node = Node(root / "node", overrides={
        "dicom": {"receiver_processes": 2},
        "worker": {"enabled": embed, "interval": 0.5},
        "index": {"save_interval": 1.0},
        "http": {"enabled": True, "port": http_port},
    })
    instances = write_series(root / "files", studies=max(1, cycles * per_cycle // 10),
                             per_series=10, seed=seed)
    report = Kill9Report()
    acked: dict[str, Instance] = {}
    by_uid = {i.sop_instance_uid: i for i in instances}
    pos = 0
    for cycle in range(cycles):
        batch = instances[pos:pos + per_cycle]
        pos += per_cycle
        try:
            node.start()
        except HarnessError as exc:
            report.crashes += 1
            report.problems.append(f"cycle {cycle}: start failed: {exc}")
            break
        groups = [batch[i::associations] for i in range(associations)]
        sendlog, stop = SendLog(), threading.Event()
        threads = senders(node.port, groups, sendlog, stop)
        time.sleep(rng.uniform(0.05, max_kill_after))
        if not node.alive():
            report.crashes += 1
            report.problems.append(f"cycle {cycle}: the node died by itself:\n{node.tail()}")
        node.kill9()
        stop.set()
        for t in threads:
            t.join(60)
        report.cycles += 1
        report.sent += len(batch)
        for uid in sendlog.acknowledged():
            acked[uid] = by_uid[uid]
        if log is not None and (cycle + 1) % 10 == 0:
            log(f"kill9: cycle {cycle + 1}/{cycles}, {len(acked)} acknowledged so far")
    report.acknowledged = len(acked)
    # the last restart: the node must come up clean, keep everything and finish its work
    try:
        node.start()
    except HarnessError as exc:
        report.crashes += 1
        report.problems.append(f"final start failed: {exc}")
        report.seconds = time.monotonic() - t0
        return report
    try:
        report.temporaries_after_restart = len(node.temporaries())
        _check_files(node, acked, report)
        if embed:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                status = node.cli_json("status")
                if status["instances"]["pending"] == 0:
                    break
                time.sleep(1.0)
            time.sleep(2.0)  # one more save interval
            report.index_vectors = int(metric(http_port, "sidecar_index_vectors") or 0)
    finally:
        node.stop()
    status = node.cli_json("status")
    report.pending_after = int(status["instances"]["pending"])
    model = status.get("active_model_id")
    if model is not None:
        report.catalogue_vectors = int(status["vectors_by_model"].get(model, 0))
    verify = node.cli_json("verify", "--min-age", "0")
    report.orphans = len(verify["orphans"])
    report.missing_rows = len(verify["missing"])
    if report.temporaries_after_restart:
        report.problems.append(f"{report.temporaries_after_restart} temporaries left after "
                               "restart")
    if report.orphans or report.missing_rows or verify["damaged"]:
        report.problems.append(f"verify: {report.orphans} orphans, {report.missing_rows} "
                               f"missing, {verify['damaged']} damaged")
    if embed and report.pending_after:
        report.problems.append(f"{report.pending_after} instances still pending (stuck work?)")
    if embed and report.index_vectors != report.catalogue_vectors:
        report.problems.append(f"index has {report.index_vectors} vectors, the catalogue "
                               f"{report.catalogue_vectors}")
    if status["instances_total"] < len(acked):
        report.problems.append(f"catalogue has {status['instances_total']} instances, "
                               f"{len(acked)} were acknowledged")
    report.seconds = time.monotonic() - t0
    return report
