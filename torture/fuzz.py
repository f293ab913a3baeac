"""Campaign ``fuzz``: malformed datasets (a mutation fuzzer over real files) and malformed
PDUs sent to ``sidecar serve`` while a valid transfer runs beside them."""

from __future__ import annotations

import collections
import io
import random
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.ingest import dataset_offset
from torture.node import HarnessError, Node
from torture.traffic import SendLog, send_files, write_series

# Statuses that say what was wrong (PS3.4 B.2.3 and PS3.7 C): anything else is a finding.
SPECIFIC = {0x0000, 0x0107, 0x0111, 0x0116, 0x0117, 0x0122, 0x0124, 0xB000, 0xB006, 0xB007}
SPECIFIC_RANGES = ((0xA700, 0xA7FF), (0xA900, 0xA9FF), (0xC000, 0xCFFF))
# Real files with pixel data: seeds for the mutations (pydicom's own test files).
SEEDS = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "US1_J2KR.dcm",
    "emri_small.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "MR_small_bigendian.dcm", "rtplan.dcm", "JPEG-LL.dcm", "liver.dcm",
)


def _seed_files(extra: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for name in SEEDS:
        try:
            out.append(Path(get_testdata_file(name, download=False)))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            continue
    out.extend(p for p in extra if p.is_file() and p.stat().st_size < 4_000_000)
    good: list[Path] = []
    for p in out:
        try:
            ds = dcmread(p, stop_before_pixels=True)
            if "TransferSyntaxUID" in ds.file_meta and "SOPInstanceUID" in ds:
                good.append(p)
        except Exception:  # noqa: BLE001, S112 - an unreadable seed is skipped
            continue
    return good


# ------------------------------------------------------------------ mutations
def _flip(data: bytearray, start: int, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(start, len(data))
        data[i] ^= 1 << rng.randrange(8)
    return "bit flips"


def _truncate(data: bytearray, start: int, rng: random.Random) -> str:
    del data[rng.randrange(start, len(data)):]
    return "truncated"


def _find_tag(data: bytearray, start: int, group: int, elem: int) -> int:
    return bytes(data).find(struct.pack("<HH", group, elem), start)


def _huge_length(data: bytearray, start: int, rng: random.Random) -> str:
    # Overwrite the length of an element with a huge or wrong value (explicit or implicit VR).
    positions = [i for i in range(start, len(data) - 8, 2)
                 if data[i + 1] == 0x00 and data[i] in (0x08, 0x10, 0x18, 0x20, 0x28)][:2000]
    if not positions:
        return _flip(data, start, rng)
    i = rng.choice(positions)
    value = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, len(data) * 4, rng.randrange(1 << 32)])
    if bytes(data[i + 4:i + 6]).isalpha():  # explicit VR: 2-byte length (or 4 after OB/SQ...)
        data[i + 6:i + 8] = struct.pack("<H", value & 0xFFFF)
    else:
        data[i + 4:i + 8] = struct.pack("<I", value)
    return "wrong length field"


def _bad_vr(data: bytearray, start: int, rng: random.Random) -> str:
    positions = [i for i in range(start, len(data) - 6, 2) if bytes(data[i + 4:i + 6]).isalpha()
                 and bytes(data[i + 4:i + 6]).isupper()][:2000]
    if not positions:
        return _flip(data, start, rng)
    i = rng.choice(positions)
    data[i + 4:i + 6] = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2))
    return "bad VR"


def _bad_uid(data: bytearray, start: int, rng: random.Random) -> str:
    for group, elem in ((0x0008, 0x0018), (0x0020, 0x000D), (0x0020, 0x000E), (0x0008, 0x0016)):
        i = _find_tag(data, start, group, elem)
        if i > 0 and bytes(data[i + 4:i + 6]) == b"UI":
            n = struct.unpack("<H", data[i + 6:i + 8])[0]
            junk = rng.choice([b"../../etc/passwd", b"1.2.abc.4", b"\x00" * 8, b"1..2",
                               b"9" * 200, b"1.2.3/4"])
            data[i + 8:i + 8 + n] = (junk * (n // max(len(junk), 1) + 1))[:n]
            return "bad UID"
    return _flip(data, start, rng)


def _deep_sequence(data: bytearray, start: int, rng: random.Random) -> str:
    # Append nested undefined-length sequences, optionally never closed.
    depth = rng.choice([64, 200, 1000])
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    seq = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF)
    nested = (seq + item) * depth
    if rng.random() < 0.5:
        close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        nested += close * depth
    i = _find_tag(data, start, 0x7FE0, 0x0010)
    at = i if i > 0 else len(data)
    data[at:at] = nested
    return f"nested sequences ({depth})"


def _broken_fragments(data: bytearray, start: int, rng: random.Random) -> str:
    i = _find_tag(data, start, 0x7FE0, 0x0010)
    items = [j for j in range(max(i, start), len(data) - 8)
             if data[j:j + 4] == b"\xfe\xff\x00\xe0"] if i > 0 else []
    if not items:
        return _truncate(data, start, rng)
    j = rng.choice(items)
    choice = rng.randrange(3)
    if choice == 0:
        data[j + 4:j + 8] = struct.pack("<I", rng.choice([0xFFFFFFF0, len(data), 3]))
        return "fragment length broken"
    if choice == 1:
        data[j:j + 4] = b"\xfe\xff\x00\xe1"
        return "fragment item tag broken"
    k = min(len(data), j + 8 + rng.randrange(1, 64))
    for x in range(j + 8, k):
        data[x] = rng.randrange(256)
    return "fragment bytes garbled"


MUTATIONS: tuple[Callable[[bytearray, int, random.Random], str], ...] = (
    _flip, _truncate, _huge_length, _bad_vr, _bad_uid, _deep_sequence, _broken_fragments,
)


def with_new_uid(data: bytes, rng: random.Random) -> bytes:
    """The same file under a new SOP Instance UID (dataset and file meta), so that its
    mutation is stored and embedded rather than answered as a duplicate of the seed."""
    ds = dcmread(io.BytesIO(data), force=True)
    uid = generate_uid(entropy_srcs=[str(rng.random())])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A mutated copy of a Part-10 file image (its File Meta kept so that it can be sent)."""
    start = dataset_offset(data)
    out = bytearray(data)
    how = rng.choice(MUTATIONS)(out, start, rng)
    return bytes(out), how


# ------------------------------------------------------------------ report
@dataclass
class FuzzReport:
    inputs: int = 0
    by_status: collections.Counter[str] = field(default_factory=collections.Counter)
    by_mutation: collections.Counter[str] = field(default_factory=collections.Counter)
    unsendable: int = 0  # mutations pynetdicom would not send (not counted in ``inputs``)
    unanswered: int = 0
    unspecific: int = 0
    worker_states: dict[str, int] = field(default_factory=dict)
    worker_failure: str = ""  # one failed instance's message
    pdus: int = 0
    pdu_problems: int = 0
    valid_sent: int = 0
    valid_ok: int = 0
    crashes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        top = ", ".join(f"{k}: {v}" for k, v in self.by_status.most_common(8))
        return [
            f"fuzz: {self.inputs} malformed datasets, {self.unanswered} unanswered, "
            f"{self.unspecific} without a specific status, {self.crashes} crashes",
            f"fuzz: statuses {top}",
            f"fuzz: {self.unsendable} more mutations pynetdicom would not send (not counted)",
            f"fuzz: the embedding worker on what was stored: {self.worker_states}, e.g. "
            f"{self.worker_failure[:120]!r}",
            f"fuzz: {self.pdus} malformed PDUs/associations, {self.pdu_problems} problems; "
            f"valid transfer beside them: {self.valid_ok}/{self.valid_sent} stored",
            f"fuzz: {self.seconds:.0f} s; " + ("OK" if self.ok else
                                               "FAILED: " + "; ".join(self.problems[:10])),
        ]


def _specific(code: int) -> bool:
    return code in SPECIFIC or any(lo <= code <= hi for lo, hi in SPECIFIC_RANGES)


def _send_one(port: int, path: Path, timeout: float) -> tuple[int | None, str]:
    meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(UID(str(meta.MediaStorageSOPClassUID)),
                             UID(str(meta.TransferSyntaxUID)))
    assoc = ae.associate("127.0.0.1", port, ae_title="SIDECAR")
    if not assoc.is_established:
        return None, "association not established"
    try:
        status = assoc.send_c_store(path)
    except Exception as exc:  # noqa: BLE001 - our side failed to encode: not a finding
        assoc.abort()
        return -2, f"{type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return None, "no answer"
    return int(status.Status), str(status.get("ErrorComment", ""))


# ------------------------------------------------------------------ PDUs
def _raw(port: int, payload: bytes, *, close_after: float = 0.2) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        time.sleep(close_after)
        s.settimeout(2)
        try:
            return s.recv(65536)
        except (TimeoutError, ConnectionError):
            return b""


def _pdus(rng: random.Random) -> list[tuple[str, bytes]]:
    rq_head = struct.pack(">BBI", 0x01, 0, 68) + struct.pack(">HH", 1, 0)
    called, calling = b"SIDECAR".ljust(16), b"PDUFUZZ".ljust(16)
    out = [
        ("unknown PDU type", struct.pack(">BBI", 0x09, 0, 4) + b"abcd"),
        ("huge PDU length", struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + b"x" * 100),
        ("zero length A-ASSOCIATE-RQ", struct.pack(">BBI", 0x01, 0, 0)),
        ("short A-ASSOCIATE-RQ", rq_head + called + calling),
        ("P-DATA before association", struct.pack(">BBI", 0x04, 0, 6) + b"\x00" * 6),
        ("garbage", bytes(rng.randrange(256) for _ in range(300))),
        ("A-ABORT before association", struct.pack(">BBI", 0x07, 0, 4) + b"\x00" * 4),
    ]
    return out


def _mid_transfer_abort(port: int, path: Path) -> None:
    """Associate, send half a C-STORE's data, then drop the connection."""
    meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae = AE(ae_title="HALFWAY")
    ae.add_requested_context(UID(str(meta.MediaStorageSOPClassUID)),
                             UID(str(meta.TransferSyntaxUID)))
    ae.maximum_pdu_size = 4096
    assoc = ae.associate("127.0.0.1", port, ae_title="SIDECAR")
    if not assoc.is_established:
        return
    sock = assoc.dul.socket
    threading.Timer(0.02, lambda: sock.close() if sock is not None else None).start()
    try:
        assoc.send_c_store(path)
    except Exception:  # noqa: BLE001, S110 - the connection is dropped on purpose
        pass
    assoc.abort()


def run(root: Path, *, inputs: int, seed: int = 0, extra_seeds: Sequence[Path] = (),
        timeout: float = 30.0, log: Any = print) -> FuzzReport:
    t0 = time.monotonic()
    rng = random.Random(seed)
    seeds = _seed_files(extra_seeds)
    if not seeds:
        raise HarnessError("no seed files")
    node = Node(root / "node", overrides={"worker": {"interval": 0.5},
                                          "dicom": {"receiver_processes": 2}})
    report = FuzzReport()
    valid = write_series(root / "valid", studies=max(1, inputs // 100), per_series=10, seed=seed)
    mutated_dir = root / "mutated"
    mutated_dir.mkdir(parents=True, exist_ok=True)
    node.start()
    valid_log, stop = SendLog(), threading.Event()
    beside = threading.Thread(target=send_files, args=(node.port, valid, valid_log),
                              kwargs={"stop": stop, "calling": "VALID"}, daemon=True)
    beside.start()
    try:
        n = -1
        seed_bytes: dict[Path, bytes] = {}
        while report.inputs < inputs and n < 3 * inputs:  # ``inputs`` that reach the node
            n += 1
            seed_path = rng.choice(seeds)
            original = seed_bytes.setdefault(seed_path, seed_path.read_bytes())
            if rng.random() < 0.75:  # most under a new UID: stored, so the worker meets them
                original = with_new_uid(original, rng)
            data, how = mutate(original, rng)
            path = mutated_dir / f"{n:05d}.dcm"
            path.write_bytes(data)
            started = time.monotonic()
            try:
                code, comment = _send_one(node.port, path, timeout)
            except Exception as exc:  # noqa: BLE001 - the file meta itself broke: skip it
                code, comment = -2, f"{type(exc).__name__}: {exc}"
            if code == -2:
                report.unsendable += 1
                path.unlink()
                continue  # pynetdicom would not send it: nothing reached the node
            report.inputs += 1
            report.by_mutation[how] += 1
            if code is None:
                report.unanswered += 1
                report.problems.append(f"input {n} ({how}, seed {seed_path.name}): {comment} "
                                       f"after {time.monotonic() - started:.1f} s")
                path.rename(path.with_suffix(".unanswered.dcm"))
            else:
                report.by_status[f"0x{code:04X}"] += 1
                if not _specific(code) or (code != 0 and not comment):
                    report.unspecific += 1
                    report.problems.append(f"input {n} ({how}): status 0x{code:04X} "
                                           f"{comment!r}")
                    path.rename(path.with_suffix(".unspecific.dcm"))
                else:
                    path.unlink()
            if not node.alive():
                report.crashes += 1
                report.problems.append(f"the node died after input {n}:\n{node.tail()}")
                break
            if log is not None and report.inputs % 250 == 0:
                log(f"fuzz: {report.inputs}/{inputs} inputs")
        for name, payload in _pdus(rng):
            report.pdus += 1
            try:
                _raw(node.port, payload)
            except OSError as exc:
                report.pdu_problems += 1
                report.problems.append(f"PDU {name}: {exc}")
        for _ in range(5):
            report.pdus += 1
            _mid_transfer_abort(node.port, rng.choice(seeds))
        # the node still answers a plain association
        ae = AE(ae_title="AFTER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SIDECAR")
        if not assoc.is_established or int(assoc.send_c_echo().Status) != 0:
            report.problems.append("C-ECHO after the campaign failed")
        if assoc.is_established:
            assoc.release()
        beside.join(300)
        if beside.is_alive():
            report.problems.append("the valid transfer beside the fuzzing did not finish")
        stop.set()
        report.valid_sent = len(valid)
        report.valid_ok = len(valid_log.acknowledged())
        if report.valid_ok != report.valid_sent:
            report.problems.append(f"valid transfer: {report.valid_ok}/{report.valid_sent} "
                                   "stored with Success")
        # let the worker try the stored malformed files: it must survive them
        deadline = time.monotonic() + 300
        while node.alive() and time.monotonic() < deadline:
            if not node.cli_json("status")["instances"]["pending"]:
                break
            time.sleep(1.0)
        if not node.alive():
            report.crashes += 1
            report.problems.append(f"the node died while embedding:\n{node.tail()}")
    finally:
        stop.set()
        if node.alive():
            node.stop()
    _worker_outcome(node, report)
    log_text = "".join(p.read_text(errors="replace") for p in node.root.glob("serve-*.log"))
    if our_tracebacks(log_text):
        report.problems.append("a traceback in the node's log (see " + str(node.root) + ")")
    report.seconds = time.monotonic() - t0
    return report


def _worker_outcome(node: Node, report: FuzzReport) -> None:
    """The stored instances' embedding states (read from the catalogue): none left pending,
    every failed one with its message."""
    db = node.data_dir / "sidecar.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT state, error FROM instance").fetchall()
    report.worker_states = dict(collections.Counter(str(state) for state, _ in rows))
    failed = [str(err or "") for state, err in rows if state == "failed"]
    report.worker_failure = next((e for e in failed if e), "")
    if report.worker_states.get("pending"):
        report.problems.append(f"{report.worker_states['pending']} stored instances still "
                               "pending: the worker did not get through them")
    if any(not e for e in failed):
        report.problems.append(f"{sum(1 for e in failed if not e)} failed instances without "
                               "a message")


def our_tracebacks(log_text: str) -> int:
    """Tracebacks in the log but those pynetdicom's DUL logs for the malformed PDUs sent
    on purpose ("Unable to decode the received PDU data": its way to report them)."""
    lines = log_text.splitlines()
    return sum(1 for i, line in enumerate(lines) if line.startswith("Traceback")
               and not any("pynetdicom.dul" in prev for prev in lines[max(0, i - 2):i]))
