"""Campaign ``resources``: a disk that fills up, and connections that never finish.

Disk (on a small filesystem the harness mounts and removes, ``torture.smallfs``; the data
directory, catalogue included, lives on it; ballast files take its room):

a. with ``storage.min_free_mb`` above what is left, stores are refused out of resources
   (0xA7xx) while the disk still has that much free;
b. with ``min_free_mb: 0`` the real ENOSPC (file or database) answers 0xA7xx too, leaves no
   half-written file, temporary or row, and the node goes on answering;
c. once the ballast is removed, stores succeed again.

Connections (no mount needed): silent TCP connections, half an A-ASSOCIATE-RQ and idle
established associations are dropped after ``dicom.acse_timeout`` /
``dicom.network_timeout``, and a pynetdicom sender and DCMTK ``storescu`` (when installed)
are served meanwhile.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from torture.fuzz import our_tracebacks
from torture.kill9 import metric
from torture.node import Node, free_port
from torture.smallfs import FsKind, MountUnavailable, small_filesystem
from torture.traffic import CT_IMAGE_STORAGE, SUCCESS, Instance, dataset_sha256, write_series

MIB = 2**20


def _out_of_resources(code: int | None) -> bool:
    return code is not None and 0xA700 <= code <= 0xA7FF


@dataclass
class Sent:
    uid: str
    status: int | None  # None: no answer
    comment: str


@dataclass
class ResourcesReport:
    fs: str = ""
    skipped: str = ""  # why the disk part did not run
    instance_kib: int = 0
    watermark_mib: int = 0
    # a. the watermark
    a_stored: int = 0
    a_refused: int = 0
    a_free_at_refusal_mib: float = 0.0
    a_comment: str = ""
    # b. the real ENOSPC
    b_stored: int = 0
    b_refused: int = 0
    b_small: int = 0
    b_free_after_kib: float = 0.0
    b_comments: list[str] = field(default_factory=list)
    # c. after freeing
    c_stored: int = 0
    c_sent: int = 0
    files: int = 0
    rows: int = 0
    temporaries: int = 0
    pending: int | None = None
    states: dict[str, int] = field(default_factory=dict)
    index_vectors: int | None = None
    catalogue_vectors: int | None = None
    log_errors_while_full: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    # d. connections
    silent: int = 0
    half: int = 0
    idle: int = 0
    served_meanwhile: list[str] = field(default_factory=list)
    dropped_silent_s: float | None = None
    dropped_half_s: float | None = None
    dropped_idle_s: float | None = None
    acse_timeout: float = 0.0
    network_timeout: float = 0.0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = []
        if self.skipped:
            out.append(f"resources: disk part NOT RUN: {self.skipped}")
        else:
            sts = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
            out += [
                f"resources: {self.fs}, data directory on it, {self.instance_kib} KiB "
                f"instances; statuses {sts}",
                f"resources: (a) watermark {self.watermark_mib} MiB: {self.a_stored} stored, "
                f"then {self.a_refused} refused 0xA7xx with {self.a_free_at_refusal_mib:.1f} "
                f"MiB still free ({self.a_comment!r})",
                f"resources: (b) watermark 0: {self.b_stored} stored ({self.b_small} of them "
                f"small, after the first refusal), {self.b_refused} refused 0xA7xx by the real "
                f"ENOSPC ({', '.join(map(repr, self.b_comments))}), "
                f"{self.b_free_after_kib:.0f} KiB left",
                f"resources: (c) ballast removed: {self.c_stored}/{self.c_sent} stored; "
                f"{self.files} files, {self.rows} rows, {self.temporaries} temporaries; "
                f"index {self.index_vectors} vectors vs catalogue {self.catalogue_vectors}, "
                f"instances {self.states}; {self.log_errors_while_full} log lines at ERROR "
                "other than the refusals",
            ]
        if self.silent or self.half or self.idle:
            def s(x: float | None) -> str:
                return "never" if x is None else f"{x:.1f} s"
            out.append(
                f"resources: (d) {self.silent} silent + {self.half} half A-ASSOCIATE-RQ "
                f"connections + {self.idle} idle associations; served meanwhile: "
                f"{', '.join(self.served_meanwhile) or 'nothing'}; dropped after: silent "
                f"{s(self.dropped_silent_s)}, half {s(self.dropped_half_s)} (acse_timeout "
                f"{self.acse_timeout:g} s), idle {s(self.dropped_idle_s)} (network_timeout "
                f"{self.network_timeout:g} s)")
        out.append(f"resources: {self.seconds:.0f} s; " + (
            "OK" if self.ok else "FAILED: " + "; ".join(self.problems[:10])))
        return [line for line in out if line]


# ------------------------------------------------------------------ sending
def _ae(timeout: float = 30.0) -> AE:
    ae = AE(ae_title="RESOURCES")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def send(port: int, instances: Sequence[Instance], timeout: float = 30.0) -> list[Sent]:
    """Send over one association; each instance's status and Error Comment."""
    out: list[Sent] = []
    assoc = _ae(timeout).associate("127.0.0.1", port, ae_title="SIDECAR")
    if not assoc.is_established:
        return [Sent(i.sop_instance_uid, None, "association not established") for i in instances]
    try:
        for inst in instances:
            st = assoc.send_c_store(inst.path)
            if "Status" not in st:
                out.append(Sent(inst.sop_instance_uid, None, "no answer"))
                break
            out.append(Sent(inst.sop_instance_uid, int(st.Status),
                            str(st.get("ErrorComment", ""))))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _echo(port: int) -> bool:
    assoc = _ae(10.0).associate("127.0.0.1", port, ae_title="SIDECAR")
    if not assoc.is_established:
        return False
    try:
        st = assoc.send_c_echo()
        return "Status" in st and int(st.Status) == SUCCESS
    finally:
        assoc.release()


def _storescu(port: int, path: Path) -> bool | None:
    """DCMTK ``storescu`` of one file: whether it got Success (``None``: not installed)."""
    exe = shutil.which("storescu")
    if exe is None:
        return None
    res = subprocess.run([exe, "-v", "-aet", "STORESCU", "-aec", "SIDECAR", "127.0.0.1",
                          str(port), str(path)], capture_output=True, text=True, timeout=60,
                         check=False)
    return res.returncode == 0 and "(Success)" in res.stdout + res.stderr


# ------------------------------------------------------------------ disk
def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _ballast(path: Path, size: int) -> None:
    """A file that takes ``size`` bytes of the filesystem for real."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if size > 0:
            os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _tally(report: ResourcesReport, sent: list[Sent]) -> None:
    for s in sent:
        key = "none" if s.status is None else f"0x{s.status:04X}"
        report.statuses[key] = report.statuses.get(key, 0) + 1


def _phase(report: ResourcesReport, name: str, sent: list[Sent], expected: int) -> tuple[
        list[Sent], list[Sent]]:
    """Split into stored and refused; a problem for anything else, and for a Success
    after a refusal (the disk does not get emptier by itself)."""
    _tally(report, sent)
    stored = [s for s in sent if s.status == SUCCESS]
    refused = [s for s in sent if _out_of_resources(s.status)]
    if len(sent) != expected:
        report.problems.append(f"({name}) {expected - len(sent)} instances never answered")
    other = [s for s in sent if s not in stored and s not in refused]
    if other:
        report.problems.append(f"({name}) {len(other)} answered neither Success nor 0xA7xx, "
                               f"e.g. {other[0].status} {other[0].comment!r}")
    first = next((k for k, s in enumerate(sent) if s.status != SUCCESS), len(sent))
    if any(s.status == SUCCESS for s in sent[first:]):
        report.problems.append(f"({name}) a store succeeded after a refusal")
    return stored, refused


def _disk(root: Path, report: ResourcesReport, *, mib: int, watermark_mib: int,
          room: int, kind: FsKind, seed: int, worker: bool, receivers: int, log: Any) -> None:
    report.watermark_mib = watermark_mib
    with small_filesystem(root / "fs", mib, kind) as fs:
        files = write_series(root / "files", studies=max(1, (3 * room + 10) // 20 + 1),
                             per_series=20, seed=seed, rows=256)
        report.instance_kib = round(files[0].path.stat().st_size / 1024)
        size = files[0].path.stat().st_size
        small = write_series(root / "small", studies=2, per_series=20, seed=seed + 2, rows=64)
        report.fs = f"{kind} of {mib} MiB"
        http_port = free_port()
        node = Node(root / "node", data_at=fs / "data", overrides={
            "worker": {"enabled": worker, "interval": 0.5}, "index": {"save_interval": 1.0},
            "http": {"enabled": worker, "port": http_port},
            "dicom": {"receiver_processes": receivers},
            "storage": {"min_free_mb": watermark_mib}})
        node.start()
        try:
            # a. room for ``room`` instances above the watermark, then send twice as many
            _ballast(fs / "ballast-a", _free(fs) - watermark_mib * MIB - room * size)
            batch_a, rest = files[:2 * room], files[2 * room:]
            sent = send(node.port, batch_a)
            stored_a, refused_a = _phase(report, "a", sent, len(batch_a))
            report.a_stored, report.a_refused = len(stored_a), len(refused_a)
            report.a_free_at_refusal_mib = _free(fs) / MIB
            report.a_comment = refused_a[0].comment if refused_a else ""
            if not refused_a:
                report.problems.append("(a) nothing was refused at the watermark")
            if _free(fs) < (watermark_mib * MIB) - 2 * size:
                report.problems.append(f"(a) only {_free(fs) // 1024} KiB free after the "
                                       f"refusals: the watermark of {watermark_mib} MiB let "
                                       "the disk fill")
            if log is not None:
                log(f"resources: (a) {len(stored_a)} stored, {len(refused_a)} refused")
            node.stop()
            # b. the watermark at 0, the room just above ``room`` instances again
            node.configure(storage={"min_free_mb": 0})
            _ballast(fs / "ballast-b", max(0, _free(fs) - room * size))
            node.start()
            batch_b, rest = rest[:2 * room], rest[2 * room:]
            sent = send(node.port, batch_b)
            stored_b, refused_b = _phase(report, "b", sent, len(batch_b))
            # then small instances into what is left, till the file or the database is full
            sent = send(node.port, small)
            stored_s, refused_s = _phase(report, "b, small", sent, len(small))
            stored_b += stored_s
            refused_b += refused_s
            report.b_stored, report.b_refused = len(stored_b), len(refused_b)
            report.b_small = len(stored_s)
            report.b_free_after_kib = _free(fs) / 1024
            report.b_comments = sorted({s.comment.split(":")[0] for s in refused_b})
            if not refused_b or not refused_s:
                report.problems.append("(b) the disk never filled (nothing refused)")
            elif report.b_free_after_kib * 1024 > 2 * size:
                report.problems.append(f"(b) refused with {report.b_free_after_kib:.0f} KiB "
                                       "free: not a full disk")
            if not node.alive() or not _echo(node.port):
                report.problems.append("(b) the node stopped answering on a full disk")
            report.temporaries = len(node.temporaries())
            if report.temporaries:
                report.problems.append(f"(b) {report.temporaries} temporaries left by ENOSPC")
            if log is not None:
                log(f"resources: (b) {len(stored_b)} stored, {len(refused_b)} refused by ENOSPC")
            # c. free the room: stores succeed again (the same node, no restart)
            (fs / "ballast-a").unlink()
            (fs / "ballast-b").unlink()
            batch_c = [f for f in files if f.sop_instance_uid in
                       {s.uid for s in refused_b}][:10] or rest[:10]
            sent = send(node.port, batch_c)
            stored_c, _ = _phase(report, "c", sent, len(batch_c))
            report.c_sent, report.c_stored = len(batch_c), len(stored_c)
            if len(stored_c) != len(batch_c):
                report.problems.append(f"(c) {len(batch_c) - len(stored_c)} of {len(batch_c)} "
                                       "refused after the space was freed")
            if worker:  # the embedding job catches up, and its index agrees with its rows
                deadline = time.monotonic() + 300
                while node.cli_json("status")["instances"]["pending"] and (
                        time.monotonic() < deadline):
                    time.sleep(1.0)
                time.sleep(2.5)  # the next index save
                report.index_vectors = int(metric(http_port, "sidecar_index_vectors") or 0)
        finally:
            node.stop()
        if worker:
            status = node.cli_json("status")
            report.pending = int(status["instances"]["pending"])
            report.states = dict(status["instances"])
            model = status.get("active_model_id")
            report.catalogue_vectors = int(status["vectors_by_model"].get(model, 0))
            if report.pending or report.index_vectors != report.catalogue_vectors:
                report.problems.append(f"(c) {report.pending} instances still pending; index "
                                       f"{report.index_vectors} vectors, catalogue "
                                       f"{report.catalogue_vectors}")
        _check_catalogue(node, report, files + small, stored_a + stored_b + stored_c,
                         refused_a + [s for s in refused_b
                                      if s.uid not in {c.uid for c in stored_c}])


def _check_catalogue(node: Node, report: ResourcesReport, files: list[Instance],
                     stored: list[Sent], refused: list[Sent]) -> None:
    on_disk = node.stored_files()
    by_uid = {f.sop_instance_uid: f for f in files}
    report.files = len(on_disk)
    verify = node.cli_json("verify", "--min-age", "0")
    report.rows = int(verify["rows"])
    if report.files != len(stored) or report.rows != len(stored):
        report.problems.append(f"{len(stored)} acknowledged: {report.files} files, "
                               f"{report.rows} rows")
    kept_refused = [s.uid for s in refused if s.uid in on_disk]
    if kept_refused:
        report.problems.append(f"{len(kept_refused)} refused instances have a file")
    changed = [s.uid for s in stored if s.uid in on_disk
               and dataset_sha256(on_disk[s.uid].read_bytes()) != by_uid[s.uid].sha256]
    if changed:
        report.problems.append(f"{len(changed)} stored files differ from what was sent "
                               "(half-written?)")
    if not verify["clean"]:
        report.problems.append(f"verify not clean: {len(verify['orphans'])} orphans, "
                               f"{len(verify['missing'])} missing, {verify['damaged']} damaged, "
                               f"{len(verify['stale_temporaries'])} temporaries")
    logs = "\n".join(p.read_text(errors="replace") for p in node.root.glob("serve-*.log"))
    if our_tracebacks(logs):
        report.problems.append(f"a traceback in the node's log ({node.root})")
    report.log_errors_while_full = sum(1 for line in logs.splitlines() if " ERROR " in line
                                       and "refused:" not in line)


# ------------------------------------------------------------------ connections
def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.005)
    try:
        while s.recv(65536):
            pass  # an A-ABORT or A-ASSOCIATE-RJ: read on till the close
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


@dataclass
class _Watched:
    """A connection the node must drop: when it was opened and when it was found closed."""

    kind: str
    opened: float
    is_closed: Any  # () -> bool
    closed: float | None = None


def _watch(watched: list[_Watched], lock: threading.Lock, stop: threading.Event) -> None:
    while not stop.wait(0.05):
        with lock:
            for w in watched:
                if w.closed is None and w.is_closed():
                    w.closed = time.monotonic()


def _connections(root: Path, report: ResourcesReport, *, silent: int, half: int, idle: int,
                 acse_timeout: float, network_timeout: float, receivers: int,
                 seed: int) -> None:
    report.silent, report.half, report.idle = silent, half, idle
    report.acse_timeout, report.network_timeout = acse_timeout, network_timeout
    node = Node(root / "node-conn", overrides={
        "worker": {"enabled": False},
        "dicom": {"acse_timeout": acse_timeout, "network_timeout": network_timeout,
                  "dimse_timeout": network_timeout, "receiver_processes": receivers}})
    files = write_series(root / "files-conn", studies=1, per_series=10, seed=seed + 1)
    node.start()
    watched: list[_Watched] = []
    lock, stop = threading.Lock(), threading.Event()
    watcher = threading.Thread(target=_watch, args=(watched, lock, stop), daemon=True)
    watcher.start()
    socks: list[socket.socket] = []
    idle_assocs: list[Any] = []
    try:
        ae = _ae(timeout=600.0)
        for _ in range(idle):  # established, then nothing: dropped after network_timeout
            a = ae.associate("127.0.0.1", node.port, ae_title="SIDECAR")
            if a.is_established:
                idle_assocs.append(a)
                with lock:
                    watched.append(_Watched("idle", time.monotonic(),
                                            lambda a=a: not a.is_established))
        if len(idle_assocs) != idle:
            report.problems.append(f"(d) only {len(idle_assocs)} of {idle} idle associations "
                                   "established")
        for n in range(silent + half):
            s = socket.create_connection(("127.0.0.1", node.port))
            if n >= silent:  # 20 bytes of a 200-byte A-ASSOCIATE-RQ, then nothing
                s.sendall(struct.pack(">BBI", 1, 0, 200) + b"\0" * 14)
            socks.append(s)
            with lock:
                watched.append(_Watched("silent" if n < silent else "half", time.monotonic(),
                                        lambda s=s: _closed_by_peer(s)))
        time.sleep(1.0)
        t0 = time.monotonic()
        got = send(node.port, files[:5], timeout=20.0)
        ok = sum(1 for g in got if g.status == SUCCESS)
        report.served_meanwhile.append(f"pynetdicom {ok}/5 in {time.monotonic() - t0:.1f} s")
        if ok != 5:
            report.problems.append(f"(d) a pynetdicom sender got {ok}/5 Success beside the "
                                   f"half-open connections ({got[-1].comment if got else ''})")
        t0 = time.monotonic()
        scu = _storescu(node.port, files[5].path)
        if scu is not None:
            report.served_meanwhile.append(f"storescu {'Success' if scu else 'FAILED'} in "
                                           f"{time.monotonic() - t0:.1f} s")
            if not scu:
                report.problems.append("(d) storescu failed beside the half-open connections")
        deadline = time.monotonic() + max(acse_timeout, network_timeout) + 15.0
        while time.monotonic() < deadline:
            with lock:
                if all(w.closed is not None for w in watched):
                    break
            time.sleep(0.1)
        stop.set()
        watcher.join(10)
        for kind, limit in (("silent", acse_timeout), ("half", acse_timeout),
                            ("idle", network_timeout)):
            mine = [w for w in watched if w.kind == kind]
            took = [w.closed - w.opened for w in mine if w.closed is not None]
            latest = max(took) if took and len(took) == len(mine) else None
            setattr(report, f"dropped_{kind}_s", latest)
            if mine and (latest is None or latest > limit + 10.0):
                report.problems.append(f"(d) {len(mine) - len(took)} of {len(mine)} {kind} "
                                       f"connections not dropped within {limit + 10:g} s "
                                       f"(timeout {limit:g} s)")
            early = [t for t in took if t < limit - 0.5]
            if early:
                report.problems.append(f"(d) {len(early)} {kind} connections dropped after "
                                       f"{min(early):.1f} s, before their timeout of {limit:g} s")
        if not _echo(node.port):
            report.problems.append("(d) C-ECHO failed after the connections were dropped")
    finally:
        stop.set()
        for s in socks:
            s.close()
        for a in idle_assocs:
            if a.is_established:
                a.abort()
        node.stop()
    logs = "\n".join(p.read_text(errors="replace") for p in node.root.glob("serve-*.log"))
    if our_tracebacks(logs):
        report.problems.append(f"(d) a traceback in the node's log ({node.root})")


def run(root: Path, *, mib: int = 64, watermark_mib: int = 16, room: int = 40,
        kind: FsKind = "tmpfs", silent: int = 20, half: int = 5, idle: int = 3,
        acse_timeout: float = 5.0, network_timeout: float = 8.0, seed: int = 0,
        worker: bool = True, receivers: int = 2, disk: bool = True, connections: bool = True,
        log: Any = print) -> ResourcesReport:
    """Both parts; ``room``: instances that fit above the watermark in (a) and in all in (b)."""
    t0 = time.monotonic()
    report = ResourcesReport()
    if disk:
        try:
            _disk(root, report, mib=mib, watermark_mib=watermark_mib, room=room, kind=kind,
                  seed=seed, worker=worker, receivers=receivers, log=log)
        except MountUnavailable as exc:
            report.skipped = f"cannot mount a small filesystem: {exc}"
    else:
        report.skipped = "not asked for"
    if connections:
        _connections(root, report, silent=silent, half=half, idle=idle,
                     acse_timeout=acse_timeout, network_timeout=network_timeout,
                     receivers=receivers, seed=seed)
    report.seconds = time.monotonic() - t0
    return report
