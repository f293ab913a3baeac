"""Every real-world file of ../shared/data/dicom (and pydicom's edge-case test files)
sent to the node over DICOM.

Each file must be either stored with its dataset bytes intact, or refused with a
specific failure status (never 0xC211, the handler's "unexpected error"). Files
the pynetdicom client itself cannot send (no File Meta, not DICOM at all) are
recorded and skipped: that is not the node's doing. Files INVENTORY.csv lists as
readable, with SOP UIDs and not among EDGE_CASES.csv, are valid DICOM and must be
stored (refusing them is a bug too). Meanwhile a valid transfer
runs on another association and must not be disturbed, and the node must still
answer C-ECHO at the end. A summary table is printed (also without ``-s``).
"""

from __future__ import annotations

import csv
import secrets
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from sidecar.config import Config
from sidecar.db.models import Instance
from sidecar.dicom.statuses import Status
from sidecar.service.app import Sidecar
from tests.conftest import CT_IMAGE_STORAGE, make_ct

pytestmark = pytest.mark.shared_data

VERIFICATION = "1.2.840.10008.1.1"
#: Failure statuses the node documents (README, sidecar/dicom/statuses.py).
SPECIFIC_FAILURES = {
    Status.OUT_OF_RESOURCES,
    Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Status.CANNOT_UNDERSTAND,
    Status.CANNOT_DECODE_DATASET,
    Status.PROCESSING_FAILURE,
    Status.INVALID_SOP_INSTANCE,
}
DEFLATED_IMAGE = "dicomParser-testImages/deflate/image_dfl"
#: Valid files the node refuses today, each with a strict-xfail test of its own.
KNOWN_BUGS: dict[str, str] = {}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MAX_CONTEXTS = 100  # of the 128 an association may propose
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@dataclass
class Sweep:
    """What happened to each file."""

    outcome: Counter[str] = field(default_factory=Counter)
    by_file: dict[str, str] = field(default_factory=dict)
    node_failures: list[str] = field(default_factory=list)
    client_skips: list[str] = field(default_factory=list)
    notes: Counter[str] = field(default_factory=Counter)
    no_uids: set[str] = field(default_factory=set)

    def record(self, name: str, outcome: str) -> None:
        self.outcome[outcome] += 1
        self.by_file[name] = outcome


def files_to_send(shared_data: Path) -> list[tuple[str, Path]]:
    """(display name, path): every file of shared_data/dicom, then pydicom's edge cases."""
    root = shared_data / "dicom"
    out = [(str(p.relative_to(root)), p) for p in sorted(root.rglob("*")) if p.is_file()]
    with (root / "EDGE_CASES.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            rel = row["path"]
            if rel.startswith("pydicom-test_files/"):
                out.append((rel, PYDICOM_TEST_FILES / rel.split("/", 1)[1]))
    return out


def known_good(shared_data: Path) -> set[str]:
    """INVENTORY.csv files pydicom reads, minus those EDGE_CASES.csv lists."""
    root = shared_data / "dicom"
    with (root / "EDGE_CASES.csv").open(newline="") as f:
        edge = {row["path"] for row in csv.DictReader(f)}
    with (root / "INVENTORY.csv").open(newline="") as f:
        return {row["path"] for row in csv.DictReader(f)
                if row["status"].startswith("ok") and row["path"] not in edge}


def after_meta(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def stored_path(app: Sidecar, sop_uid: str) -> Path | None:
    with Session(app.engine) as s:
        rel = s.scalars(
            select(Instance.file_path).where(Instance.sop_instance_uid == sop_uid)
        ).first()
    return None if rel is None else app.store.root / rel


@dataclass(frozen=True)
class Item:
    """One file to send: ``path`` is what goes on the wire, ``source`` the original."""

    name: str
    path: Path
    source: Path
    sop_class: str
    sop_uid: str
    ts: str


def dataset_uids(path: Path) -> tuple[str, str] | None:
    """SOP Class and Instance UID of the dataset itself (not the File Meta)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "")).strip(), str(ds.get("SOPInstanceUID", "")).strip()
    except Exception:  # noqa: BLE001 - the node will judge the dataset
        return None


class CannotSend(Exception):
    """pynetdicom cannot send this file (not Part-10, no transfer syntax)."""


def wire_copy(path: Path, workdir: Path) -> tuple[Path, str, str, str, str]:
    """What to send for ``path``: (file, SOP class, SOP instance, transfer syntax, note).

    pynetdicom's raw (chunked) send takes the command's Affected SOP Class/Instance
    UID from the File Meta. Where that disagrees with the dataset (derived test
    files often keep the original's meta), a PACS would name the dataset's own
    UIDs, so a copy is sent with a corrected File Meta and the dataset bytes
    unchanged; where neither names a UID, the command gets a made-up one (and the
    node must refuse the dataset). The refusal of a real mismatch (0xA900) is
    tested in test_scp.py.
    """
    try:
        meta, offset = split_dataset(path)
    except Exception as exc:  # noqa: BLE001 - not a Part-10 file: cannot be sent raw
        raise CannotSend(f"not Part-10 ({exc.__class__.__name__})") from exc
    ts = str(meta.get("TransferSyntaxUID", "")).strip()
    if not ts:
        raise CannotSend("File Meta has no Transfer Syntax UID")
    in_meta = (str(meta.get("MediaStorageSOPClassUID", "")).strip(),
               str(meta.get("MediaStorageSOPInstanceUID", "")).strip())
    in_dataset = dataset_uids(path) or ("", "")
    if all(in_dataset):
        wanted, note = in_dataset, "File Meta corrected to the dataset's UIDs"
    elif all(in_meta):
        wanted, note = in_meta, ""
    else:
        wanted = (in_meta[0] or in_dataset[0] or SECONDARY_CAPTURE, generate_uid())
        note = "no SOP UIDs anywhere: command UIDs made up"
    if wanted == in_meta:
        return path, *in_meta, ts, ""
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = wanted
    send = workdir / f"{secrets.token_hex(6)}.dcm"
    with send.open("wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(path.read_bytes()[offset:])
    return send, *wanted, ts, note


def prepare(files: list[tuple[str, Path]], workdir: Path, sweep: Sweep) -> list[Item]:
    """What to send for each file; skip (and record) what pynetdicom cannot send."""
    items = []
    for name, path in files:
        if not path.is_file():
            sweep.client_skips.append(f"{name}: file not present")
            sweep.record(name, "client: file absent")
            continue
        try:
            send, sop_class, sop_uid, ts, note = wire_copy(path, workdir)
        except CannotSend as exc:
            sweep.client_skips.append(f"{name}: {exc}")
            sweep.record(name, "client: cannot send")
            continue
        if note:
            sweep.notes[note] += 1
        if note.startswith("no SOP UIDs"):
            sweep.no_uids.add(name)
        items.append(Item(name, send, path, sop_class, sop_uid, ts))
    return items


class Sender:
    """Associations proposing every (SOP class, transfer syntax) pair of a batch, each
    pair as its own context so that each file goes in its own transfer syntax."""

    def __init__(self, app: Sidecar, contexts: list[tuple[str, str]]) -> None:
        self.app, self.contexts = app, contexts
        self.assoc: Association | None = None

    def open(self) -> Association:
        ae = AE(ae_title="SWEEP")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class, ts in self.contexts:
            ae.add_requested_context(sop_class, [ts])
        assert self.app.address is not None
        assoc = ae.associate(*self.app.address, ae_title=self.app.config.dicom.ae_title)
        assert assoc.is_established, "the node refused the sweep's association"
        return assoc

    def send(self, item: Item) -> Dataset | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.open()
        try:
            return self.assoc.send_c_store(item.path)
        except ValueError:  # no accepted context: the node does not take this SOP class/TS
            return None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def check_response(app: Sidecar, item: Item, rsp: Dataset | None, sweep: Sweep) -> None:
    name = item.name
    if rsp is None:
        sweep.record(name, "context not accepted")
        return
    if "Status" not in rsp:
        sweep.node_failures.append(f"{name}: no response (association aborted)")
        sweep.record(name, "NO RESPONSE")
        return
    status = int(rsp.Status)
    comment = str(rsp.get("ErrorComment", ""))
    if status == Status.SUCCESS:
        stored = stored_path(app, item.sop_uid)
        if stored is None or not stored.is_file():
            sweep.node_failures.append(f"{name}: Success but no row/file for {item.sop_uid}")
        elif after_meta(stored) != after_meta(item.source):
            sweep.node_failures.append(f"{name}: Success but stored bytes differ")
        else:
            stored_ts = str(split_dataset(stored)[0].TransferSyntaxUID)
            if stored_ts != item.ts:
                sweep.node_failures.append(f"{name}: stored as {stored_ts}, sent {item.ts}")
        sweep.record(name, "0x0000 stored")
        return
    sweep.record(name, f"0x{status:04X} {comment[:45]}")
    if status == Status.UNHANDLED_EXCEPTION or status not in SPECIFIC_FAILURES:
        sweep.node_failures.append(f"{name}: status 0x{status:04X} {comment}")
    elif not comment.strip():
        sweep.node_failures.append(f"{name}: status 0x{status:04X} without an Error Comment")


def send_all(app: Sidecar, items: list[Item], sweep: Sweep, started: threading.Event) -> None:
    pairs = list(dict.fromkeys((it.sop_class, it.ts) for it in items))
    for lo in range(0, len(pairs), MAX_CONTEXTS):
        batch = set(pairs[lo:lo + MAX_CONTEXTS])
        sender = Sender(app, pairs[lo:lo + MAX_CONTEXTS])
        try:
            for item in items:
                if (item.sop_class, item.ts) in batch:
                    check_response(app, item, sender.send(item), sweep)
                    started.set()
        finally:
            sender.close()


def parallel_transfer(
    app: Sidecar, go: threading.Event, statuses: list[int], errors: list[BaseException],
    first_send: list[float],
) -> None:
    """50 valid instances on one association, started once the sweep is under way."""
    try:
        study = generate_uid()
        datasets = [make_ct(study_uid=study, instance_number=i + 1, seed=i) for i in range(50)]
        ae = AE(ae_title="STEADY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])
        assert app.address is not None
        assoc = ae.associate(*app.address, ae_title=app.config.dicom.ae_title)
        assert assoc.is_established
        try:
            if not go.wait(timeout=60):
                raise TimeoutError("the sweep never started")
            first_send.append(time.monotonic())
            for ds in datasets:
                rsp = assoc.send_c_store(ds)
                statuses.append(int(rsp.Status) if "Status" in rsp else -1)
        finally:
            if assoc.is_established:
                assoc.release()
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(exc)


def summary(sweep: Sweep, total: int, seconds: float) -> str:
    width = max(len(k) for k in sweep.outcome) + 2
    lines = [
        "",
        f"shared-data sweep: {total} files in {seconds:.1f} s",
        *(f"  {note}: {n}" for note, n in sorted(sweep.notes.items())),
        f"{'outcome':<{width}} files",
        f"{'-' * width} -----",
    ]
    for outcome, n in sorted(sweep.outcome.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{outcome:<{width}} {n:5d}")
    if sweep.client_skips:
        lines.append("skipped (the client cannot send them):")
        lines.extend(f"  {s}" for s in sweep.client_skips)
    refused = sorted((n, o) for n, o in sweep.by_file.items()
                     if not o.startswith(("0x0000", "client")))
    if refused:
        lines.append("refused by the node:")
        lines.extend(f"  {o:<50} {n}" for n, o in refused)
    return "\n".join(lines)


def test_every_shared_file_is_stored_intact_or_refused_specifically(
    shared_data: Path,
    config_factory: Callable[..., Config],
    sidecar_factory: Callable[[Config], Sidecar],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # replace: a later file with an already stored SOP Instance UID (the same image
    # in several transfer syntaxes) is stored too, so its bytes can be checked.
    # fsync off: this sweep is about parsing and refusals (durability: test_scp.py).
    app = sidecar_factory(config_factory({
        "dicom": {"duplicate_policy": "replace"},
        "storage": {"fsync": False},
    }))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    files = files_to_send(shared_data)
    assert len(files) >= 250

    go = threading.Event()
    steady: list[int] = []
    errors: list[BaseException] = []
    first_send: list[float] = []
    thread = threading.Thread(
        target=parallel_transfer, args=(app, go, steady, errors, first_send)
    )
    thread.start()

    sweep = Sweep()
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the malformed files
        items = prepare(files, tmp_path, sweep)
        send_all(app, items, sweep, go)
    end = time.monotonic()
    go.set()
    thread.join(timeout=120)

    with capsys.disabled():
        print(summary(sweep, len(files), end - start))

    assert not thread.is_alive()
    assert errors == []
    assert steady == [Status.SUCCESS] * 50
    assert first_send and first_send[0] < end, "the valid transfer did not overlap the sweep"

    ae = AE(ae_title="AFTER")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(*app.address, ae_title=app.config.dicom.ae_title)
    assert assoc.is_established, "node no longer accepts associations after the sweep"
    try:
        rsp = assoc.send_c_echo()
        assert "Status" in rsp and int(rsp.Status) == Status.SUCCESS
    finally:
        assoc.release()

    assert sweep.node_failures == []
    # files the inventory lists as readable and not as edge cases, with SOP UIDs,
    # are valid DICOM: they must be stored, not refused
    must_store = known_good(shared_data) - set(KNOWN_BUGS) - sweep.no_uids
    assert len(must_store) >= 200
    refused_good = sorted(f"{n}: {sweep.by_file.get(n)}" for n in must_store
                          if sweep.by_file.get(n) != "0x0000 stored")
    assert refused_good == []
    assert sum(sweep.outcome.values()) == len(files)



def store_single(app: Sidecar, path: Path, workdir: Path) -> tuple[int, str, str]:
    """Send one file raw on its own association: (status, error comment, SOP Instance UID)."""
    send, sop_class, sop_uid, ts, _ = wire_copy(path, workdir)
    ae = AE(ae_title="EDGE")
    ae.add_requested_context(sop_class, [ts])
    assert app.address is not None
    assoc = ae.associate(*app.address, ae_title=app.config.dicom.ae_title)
    assert assoc.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rsp = assoc.send_c_store(send)
    finally:
        assoc.release()
    return int(rsp.Status), str(rsp.get("ErrorComment", "")), sop_uid


def test_pydicom_truncated_rtplan_is_refused(
    config_factory: Callable[..., Config],
    sidecar_factory: Callable[[Config], Sidecar],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """EDGE_CASES.csv: rtplan_truncated.dcm ends in the middle of its Beam Sequence
    (declared 976 bytes from offset 1418, the file has 2129). It cannot be read whole,
    so it may not be acknowledged (0xC210 cannot decode)."""
    path = PYDICOM_TEST_FILES / "rtplan_truncated.dcm"
    if not path.is_file():
        pytest.skip("pydicom test file rtplan_truncated.dcm not installed")
    app = sidecar_factory(config_factory())
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    status, comment, sop_uid = store_single(app, path, tmp_path)
    assert status in (0xA900, 0xC210), (hex(status), comment)
    assert stored_path(app, sop_uid) is None


def test_pydicom_truncated_pixels_are_refused(
    config_factory: Callable[..., Config],
    sidecar_factory: Callable[[Config], Sidecar],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """EDGE_CASES.csv: MR_truncated.dcm ends 62 bytes short of its Pixel Data
    (8130 of 8192): README promises 0xA900 for native pixels shorter than the image."""
    path = PYDICOM_TEST_FILES / "MR_truncated.dcm"
    if not path.is_file():
        pytest.skip("pydicom test file MR_truncated.dcm not installed")
    app = sidecar_factory(config_factory())
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    status, comment, sop_uid = store_single(app, path, tmp_path)
    assert status in (0xA900, 0xC210), (hex(status), comment)
    assert stored_path(app, sop_uid) is None


def test_deflated_shared_image_is_stored(
    shared_data: Path,
    config_factory: Callable[..., Config],
    sidecar_factory: Callable[[Config], Sidecar],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    path = shared_data / "dicom" / DEFLATED_IMAGE
    app = sidecar_factory(config_factory())
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    status, comment, sop_uid = store_single(app, path, tmp_path)
    assert status == Status.SUCCESS, (hex(status), comment)
    stored = stored_path(app, sop_uid)
    assert stored is not None and after_meta(stored) == after_meta(path)
