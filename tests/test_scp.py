"""Network-level tests of the DICOM node, with pynetdicom as the client.

Every test talks to a real node on a free port (``running`` / ``sidecar_factory``)
over TCP and then checks what was kept: the files under ``storage/``, the
catalogue rows, the quarantine. No test sleeps to synchronise: waiting is
always polling a condition with a deadline.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from sidecar.config import Config
from sidecar.db.models import Instance, Patient, Series, Study
from sidecar.dicom.statuses import Status
from sidecar.service.app import Sidecar
from tests.conftest import (
    CT_IMAGE_STORAGE,
    SIMILARITY_CREATOR,
    c_find,
    fail_writes,
    file_meta,
    make_ct,
    storage_files,
    wait_for,
)

VERIFICATION = "1.2.840.10008.1.1"
SCU_AE = "TESTSCU"
SECRET_NAME = "Doe^Secret"
SECRET_ID = "PID-SECRET-123"



# --------------------------------------------------------------------- helpers
def make_scu(ae_title: str = SCU_AE, ts: tuple[str, ...] = (ExplicitVRLittleEndian,)) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT_IMAGE_STORAGE, list(ts))
    ae.add_requested_context(VERIFICATION)
    return ae


@contextmanager
def associate(
    app: Sidecar, ae_title: str = SCU_AE, called: str | None = None
) -> Iterator[Association]:
    """An association from a fresh SCU AE to ``app``; released (or aborted) afterwards."""
    assert app.address is not None
    host, port = app.address
    assoc = make_scu(ae_title).associate(
        host, port, ae_title=called or app.config.dicom.ae_title
    )
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


@contextmanager
def established(app: Sidecar, ae_title: str = SCU_AE) -> Iterator[Association]:
    with associate(app, ae_title) as assoc:
        assert assoc.is_established, "association was not accepted"
        yield assoc


@pytest.fixture
def chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make send_c_store(path) send the file's dataset bytes as they are on disk."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def encode_dataset(ds: Dataset) -> bytes:
    """``ds`` encoded in Explicit VR Little Endian, without File Meta."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid UIDs on purpose in some tests
        write_dataset(fp, ds)
    return fp.getvalue()


def write_raw_part10(
    path: Path, body: bytes, sop_uid: str, sop_class: str = CT_IMAGE_STORAGE
) -> Path:
    """A Part-10 file: a valid File Meta header naming ``sop_uid``, then ``body`` as is.

    pynetdicom's chunked send takes the command's Affected SOP Class/Instance UID
    from this header and sends ``body`` unchanged.
    """
    meta = file_meta(sop_class, sop_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(body)
    return path


def write_part10(ds: Dataset, path: Path, command_sop_uid: str | None = None) -> Path:
    """``ds`` as a Part-10 file; the File Meta (hence the command) may name another UID."""
    return write_raw_part10(
        path, encode_dataset(ds), command_sop_uid or str(ds.SOPInstanceUID)
    )


def after_meta(path: Path) -> bytes:
    """The bytes of a Part-10 file after its File Meta group."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def status_of(rsp: Dataset) -> int:
    assert "Status" in rsp, f"no status in response (association aborted?): {rsp}"
    return int(rsp.Status)


def files_under(root: Path) -> list[Path]:
    return storage_files(root)


def rows(app: Sidecar) -> list[dict[str, Any]]:
    """Every instance row joined with its series and study, as plain dicts."""
    with Session(app.engine) as s:
        result = s.execute(
            select(Instance, Series, Study, Patient)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .join(Patient, Study.patient_pk == Patient.id)
        ).all()
        return [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "sop_class_uid": i.sop_class_uid,
                "series_instance_uid": se.series_instance_uid,
                "study_instance_uid": st.study_instance_uid,
                "patient_id": p.patient_id,
                "instance_number": i.instance_number,
                "transfer_syntax_uid": i.transfer_syntax_uid,
                "rows": i.rows,
                "columns": i.columns,
                "file_path": i.file_path,
                "file_size": i.file_size,
                "sha256": i.sha256,
                "calling_ae_title": i.calling_ae_title,
                "calling_host": i.calling_host,
                "state": str(i.state.value),
                "modality": se.modality,
            }
            for i, se, st, p in result
        ]


def row_for(app: Sidecar, sop_uid: str) -> dict[str, Any]:
    found = [r for r in rows(app) if r["sop_instance_uid"] == sop_uid]
    assert len(found) == 1, f"expected one row for {sop_uid}, got {len(found)}"
    return found[0]


def study_row(app: Sidecar, study_uid: str) -> dict[str, Any] | None:
    with Session(app.engine) as s:
        st = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if st is None:
            return None
        return {
            "stable": st.stable,
            "stable_at": st.stable_at,
            "last_received_at": st.last_received_at,
        }


def stable_study(app: Sidecar, study_uid: str) -> dict[str, Any] | None:
    row = study_row(app, study_uid)
    return row if row is not None and row["stable"] else None


def storage_dir(app: Sidecar) -> Path:
    return app.store.root


def quarantine_dir(app: Sidecar) -> Path:
    return app.config.quarantine_dir


# ----------------------------------------------------------------------- echo
def test_echo_success(running: Sidecar) -> None:
    with established(running) as assoc:
        assert status_of(assoc.send_c_echo()) == Status.SUCCESS


# ---------------------------------------------------------------------- store
@pytest.mark.usefixtures("chunked")
def test_store_success_keeps_bytes_and_records_row(running: Sidecar, tmp_path: Path) -> None:
    ds = make_ct(instance_number=7, seed=3)
    src = write_part10(ds, tmp_path / "src" / "ct.dcm")
    with established(running, "MYPACS") as assoc:
        rsp = assoc.send_c_store(src)
    assert status_of(rsp) == Status.SUCCESS

    row = row_for(running, ds.SOPInstanceUID)
    stored = storage_dir(running) / row["file_path"]
    expected = (
        storage_dir(running) / ds.StudyInstanceUID / ds.SeriesInstanceUID
        / f"{ds.SOPInstanceUID}.dcm"
    )
    assert stored == expected
    # the dataset exactly as it went over the wire, behind a File Meta header
    assert after_meta(stored) == after_meta(src)
    meta, _ = split_dataset(stored)
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
    assert row["file_size"] == stored.stat().st_size

    assert row["sop_class_uid"] == CT_IMAGE_STORAGE
    assert row["study_instance_uid"] == ds.StudyInstanceUID
    assert row["series_instance_uid"] == ds.SeriesInstanceUID
    assert row["instance_number"] == 7
    assert (row["rows"], row["columns"]) == (64, 64)
    assert row["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert row["modality"] == "CT"
    assert row["patient_id"] == SECRET_ID
    assert row["calling_ae_title"] == "MYPACS"
    assert row["calling_host"] == "127.0.0.1"
    assert row["state"] == "pending"
    assert files_under(storage_dir(running)) == [stored]


def test_invalid_command_set_is_answered_with_a_failure_status(
    running: Sidecar, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A C-STORE-RQ without a valid Affected SOP Instance UID (the sender took it from a broken
    # file): pynetdicom alone ignores it and the peer waits out its DIMSE timeout; we answer
    # 0xA900 naming what is wrong, and the association goes on.
    ds = make_ct(seed=5)
    src = write_part10(ds, tmp_path / "src" / "ct.dcm")
    uid = str(ds.SOPInstanceUID).encode()
    src.write_bytes(src.read_bytes().replace(uid, b"\0" * len(uid)))  # file meta and data set
    with caplog.at_level(logging.WARNING, logger="sidecar.dicom.strict"):
        with established(running) as assoc:
            rsp = assoc.send_c_store(src)
            assert status_of(rsp) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
            assert "AffectedSOPInstanceUID" in str(rsp.get("ErrorComment", ""))
            assert status_of(assoc.send_c_store(make_ct(seed=6))) == Status.SUCCESS
    assert "invalid C-STORE request" in caplog.text and "AffectedSOPInstanceUID" in caplog.text
    assert rows(running) and all(r["sop_instance_uid"] != str(ds.SOPInstanceUID)
                                 for r in rows(running))


@pytest.mark.usefixtures("chunked")
def test_duplicate_identical_is_noop_success(running: Sidecar, tmp_path: Path) -> None:
    ds = make_ct()
    src = write_part10(ds, tmp_path / "src" / "ct.dcm")
    with established(running) as assoc:
        assert status_of(assoc.send_c_store(src)) == Status.SUCCESS
        first = row_for(running, ds.SOPInstanceUID)
        assert status_of(assoc.send_c_store(src)) == Status.SUCCESS
    with established(running) as assoc:  # and on another association
        assert status_of(assoc.send_c_store(src)) == Status.SUCCESS
    assert len(rows(running)) == 1
    assert row_for(running, ds.SOPInstanceUID) == first
    assert files_under(storage_dir(running)) == [storage_dir(running) / first["file_path"]]


def _send_two_versions(app: Sidecar, tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Store version 1, then version 2 (same UIDs, other pixels); returns files and row 1."""
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_uid": generate_uid()}
    v1 = write_part10(make_ct(seed=1, **uids), tmp_path / "src" / "v1.dcm")
    v2 = write_part10(make_ct(seed=2, **uids), tmp_path / "src" / "v2.dcm")
    assert after_meta(v1) != after_meta(v2)
    with established(app) as assoc:
        assert status_of(assoc.send_c_store(v1)) == Status.SUCCESS
        first = row_for(app, uids["sop_uid"])
        assert status_of(assoc.send_c_store(v2)) == Status.SUCCESS
    return v1, v2, first


@pytest.mark.usefixtures("chunked")
def test_duplicate_different_bytes_keep_first(
    config_factory: Callable[..., Config],
    sidecar_factory: Callable[[Config], Sidecar],
    tmp_path: Path,
) -> None:
    app = sidecar_factory(config_factory({"dicom": {"duplicate_policy": "keep_first"}}))
    v1, _, first = _send_two_versions(app, tmp_path)
    assert len(rows(app)) == 1
    row = rows(app)[0]
    assert row == first
    stored = storage_dir(app) / row["file_path"]
    assert after_meta(stored) == after_meta(v1)
    assert files_under(storage_dir(app)) == [stored]


@pytest.mark.usefixtures("chunked")
def test_duplicate_different_bytes_replace(
    config_factory: Callable[..., Config],
    sidecar_factory: Callable[[Config], Sidecar],
    tmp_path: Path,
) -> None:
    app = sidecar_factory(config_factory({"dicom": {"duplicate_policy": "replace"}}))
    _, v2, first = _send_two_versions(app, tmp_path)
    assert len(rows(app)) == 1
    row = rows(app)[0]
    assert row["sha256"] != first["sha256"]
    stored = storage_dir(app) / row["file_path"]
    assert after_meta(stored) == after_meta(v2)
    # the old copy is gone: exactly one file is left, and it is the new one
    assert files_under(storage_dir(app)) == [stored]
    assert row["state"] == "pending"


# -------------------------------------------------------------- access control
def test_wrong_called_ae_title_is_rejected(running: Sidecar) -> None:
    with associate(running, called="NOTSIDECAR") as assoc:
        assert assoc.is_rejected
        assert not assoc.is_established
    with established(running) as assoc:  # the node still serves the right title
        assert status_of(assoc.send_c_echo()) == Status.SUCCESS


def test_allowed_peers_without_loopback(
    config_factory: Callable[..., Config], sidecar_factory: Callable[[Config], Sidecar]
) -> None:
    app = sidecar_factory(
        config_factory(
            {
                "dicom": {
                    "allow_loopback": False,
                    "allowed_peers": [{"ae_title": "GOODPACS", "host": "127.0.0.1"}],
                }
            }
        )
    )
    with associate(app, "EVIL") as assoc:
        assert assoc.is_rejected
        assert not assoc.is_established
        rj = assoc.acceptor.primitive
        # rejected permanent, by the service user, calling AE title not recognised
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    with associate(app, "GOODPACS") as assoc:
        assert assoc.is_established
        assert status_of(assoc.send_c_echo()) == Status.SUCCESS
        ds = make_ct()
        assert status_of(assoc.send_c_store(ds)) == Status.SUCCESS
    with associate(app, "EVIL") as assoc:  # still refused after a good peer
        assert assoc.is_rejected
    assert [r["calling_ae_title"] for r in rows(app)] == ["GOODPACS"]


def test_allowed_peers_other_network_rejects_loopback(
    config_factory: Callable[..., Config], sidecar_factory: Callable[[Config], Sidecar]
) -> None:
    app = sidecar_factory(
        config_factory(
            {
                "dicom": {
                    "allow_loopback": False,
                    "allowed_peers": [{"ae_title": "GOODPACS", "host": "10.0.0.0/8"}],
                }
            }
        )
    )
    for title in ("GOODPACS", "EVIL"):
        with associate(app, title) as assoc:
            assert assoc.is_rejected, title
            assert not assoc.is_established


def test_permissions_per_peer(
    config_factory: Callable[..., Config], sidecar_factory: Callable[[Config], Sidecar],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = sidecar_factory(
        config_factory(
            {
                "dicom": {
                    "allow_loopback": False,
                    "allowed_peers": [
                        {"ae_title": "ARCHIVE", "host": "127.0.0.1", "permissions": ["store"]},
                        {"ae_title": "VIEWER", "host": "127.0.0.1", "permissions": ["find"]},
                        {"ae_title": "MUTED", "host": "127.0.0.1", "permissions": []},
                    ],
                }
            }
        )
    )
    assert app.address is not None
    ds = make_ct()
    with associate(app, "ARCHIVE") as assoc:
        assert assoc.is_established
        assert status_of(assoc.send_c_store(ds)) == Status.SUCCESS
    with caplog.at_level(logging.WARNING, logger="sidecar.dicom.node"), \
            associate(app, "VIEWER") as assoc:
        assert assoc.is_established
        rsp = assoc.send_c_store(make_ct())
        assert status_of(rsp) == Status.NOT_AUTHORIZED
        assert rsp.ErrorComment == "not authorised: no store permission"
    assert any("lacks the 'store' permission" in m for m in caplog.messages)
    assert [r["calling_ae_title"] for r in rows(app)] == ["ARCHIVE"]

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    found = c_find(app.address, query, calling="VIEWER")
    assert found.status == Status.SUCCESS
    assert found.values("StudyInstanceUID") == [ds.StudyInstanceUID]
    refused = c_find(app.address, query, calling="ARCHIVE")
    assert (refused.status, refused.identifiers) == (Status.NOT_AUTHORIZED, [])
    assert refused.comment == "not authorised: no find permission"

    similar = Dataset()
    similar.QueryRetrieveLevel = "STUDY"
    similar.StudyInstanceUID = ""
    block = similar.private_block(0x0099, SIMILARITY_CREATOR, create=True)
    block.add_new(0x02, "UI", ds.StudyInstanceUID)
    refused = c_find(app.address, similar, calling="VIEWER")
    assert refused.status == Status.NOT_AUTHORIZED
    assert refused.comment == "not authorised: no similarity permission"

    with associate(app, "MUTED") as assoc:  # nothing permitted: no association
        assert assoc.is_rejected


def test_peers_listed_without_permissions_keep_all_and_are_named_at_start(
    config_factory: Callable[..., Config], sidecar_factory: Callable[[Config], Sidecar],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config_factory({"dicom": {"allowed_peers": [
        {"ae_title": "OLDPACS", "host": "10.0.0.7"},
        {"ae_title": "ARCHIVE", "host": "10.0.0.5", "permissions": ["store"]},
    ]}})
    with caplog.at_level(logging.WARNING, logger="sidecar.service.app"):
        sidecar_factory(cfg)
    named = [m for m in caplog.messages if "without permissions" in m]
    assert len(named) == 1
    assert "OLDPACS@10.0.0.7/32 may store, find, similarity and example" in named[0]
    assert "ARCHIVE" not in named[0]


# ------------------------------------------------------------------ watermark
def test_watermark_refuses_with_out_of_resources(
    config_factory: Callable[..., Config],
    sidecar_factory: Callable[[Config], Sidecar],
    tmp_path: Path,
) -> None:
    st = os.statvfs(tmp_path)
    free_mb = st.f_bavail * st.f_frsize // 2**20
    app = sidecar_factory(config_factory({"storage": {"min_free_mb": free_mb + 1_000_000}}))
    with established(app) as assoc:
        rsp = assoc.send_c_store(make_ct())
        assert status_of(rsp) == Status.OUT_OF_RESOURCES
        assert str(rsp.get("ErrorComment", "")).strip()
        assert status_of(assoc.send_c_echo()) == Status.SUCCESS  # association still usable
    assert files_under(storage_dir(app)) == []
    assert files_under(quarantine_dir(app)) == []
    assert rows(app) == []
    # /metrics shows what to alert on before refusals start: free bytes and the watermark
    values = {line.split()[0]: float(line.split()[1])
              for line in app.metrics.render().decode().splitlines()
              if line.startswith("sidecar_disk_")}
    assert values["sidecar_disk_min_free_bytes"] == (free_mb + 1_000_000) * 2**20
    st = os.statvfs(tmp_path)
    assert abs(values["sidecar_disk_free_bytes"] - st.f_bavail * st.f_frsize) < 256 * 2**20
    assert values["sidecar_disk_free_bytes"] < values["sidecar_disk_min_free_bytes"]
    # ... and /healthz says the node cannot do its job
    health = app.health()
    assert health["ok"] is False
    assert health["checks"]["storage"]["ok"] is False
    assert "stores refused below" in health["checks"]["storage"]["detail"]
    assert all(c["ok"] for name, c in health["checks"].items() if name != "storage"), health


# -------------------------------------------------------------- bad datasets
def _quarantined(app: Sidecar) -> list[tuple[Path, str]]:
    """(dcm file, note text) pairs in the quarantine."""
    out = []
    for dcm in sorted(quarantine_dir(app).glob("*.dcm")):
        note = dcm.with_suffix(".txt")
        assert note.is_file(), f"no note beside {dcm.name}"
        out.append((dcm, note.read_text()))
    return out


TRAVERSAL = ["../../../tmp/evil", "1.2/../../evil", "..", "/tmp/evil", "1.2.3\\..\\evil"]


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


INVALID_UI_WARNING = "ignore:Invalid value for VR UI:UserWarning"


@pytest.mark.filterwarnings(INVALID_UI_WARNING)
@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize("attr", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_path_traversal_uids_are_refused(running: Sidecar, tmp_path: Path, attr: str) -> None:
    """A UID that is not digits and dots never becomes a path: 0x0117 and quarantine.

    The command's Affected SOP Instance UID is valid (from the File Meta); the
    dataset's UID is the hostile one, which is what reaches the handler.
    """
    src_dir = tmp_path / "src"
    sources = []
    for i, bad in enumerate(TRAVERSAL):
        sop = generate_uid()
        ds = make_ct(sop_uid=sop)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(ds, attr, bad)
        sources.append(write_part10(ds, src_dir / f"t{i}.dcm", command_sop_uid=sop))
    before = _tree(tmp_path)
    statuses = []
    with established(running) as assoc:
        for src in sources:
            rsp = assoc.send_c_store(src)
            statuses.append((status_of(rsp), str(rsp.get("ErrorComment", ""))))
    assert [s for s, _ in statuses] == [Status.INVALID_SOP_INSTANCE] * len(TRAVERSAL), statuses
    assert all(attr in c for _, c in statuses), statuses

    storage, quarantine = storage_dir(running), quarantine_dir(running)
    new = _tree(tmp_path) - before
    outside = [
        p for p in new
        if not p.is_relative_to(storage) and not p.is_relative_to(quarantine)
        and p.parent != running.config.data_dir  # sidecar.db-wal / -shm
    ]
    assert outside == []
    assert [p for p in new if p.is_relative_to(storage)] == []  # not even a directory
    assert rows(running) == []
    hits = [p for p in tmp_path.parent.rglob("*evil*")]
    assert hits == []
    assert not Path("/tmp/evil").exists()
    quarantined = _quarantined(running)
    assert len(quarantined) == len(TRAVERSAL)
    kept = sorted(after_meta(dcm) for dcm, _ in quarantined)
    assert kept == sorted(after_meta(src) for src in sources)
    for _, note in quarantined:
        assert attr in note and SCU_AE in note


@pytest.mark.filterwarnings(INVALID_UI_WARNING)
@pytest.mark.usefixtures("chunked")
def test_invalid_uid_in_command_too(running: Sidecar, tmp_path: Path) -> None:
    """Even when the C-STORE command itself carries the hostile UID (pynetdicom does
    not enforce UID conformance by default), the node refuses it and writes nothing."""
    assert _config.ENFORCE_UID_CONFORMANCE is False
    ds = make_ct()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = "../../../tmp/evil"
    src = write_part10(ds, tmp_path / "src" / "cmd.dcm")
    with established(running) as assoc:
        rsp = assoc.send_c_store(src)
        code = status_of(rsp)
        assert status_of(assoc.send_c_echo()) == Status.SUCCESS
    assert code == Status.INVALID_SOP_INSTANCE, hex(code)
    assert files_under(storage_dir(running)) == []
    assert rows(running) == []
    assert [p for p in tmp_path.parent.rglob("*evil*")] == []
    assert len(_quarantined(running)) == 1


@pytest.mark.usefixtures("chunked")
def test_sop_instance_mismatch_with_command(running: Sidecar, tmp_path: Path) -> None:
    ds = make_ct()
    src = write_part10(ds, tmp_path / "src" / "mismatch.dcm", command_sop_uid=generate_uid())
    with established(running) as assoc:
        rsp = assoc.send_c_store(src)
    assert status_of(rsp) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "SOPInstanceUID" in str(rsp.get("ErrorComment", ""))
    assert files_under(storage_dir(running)) == []
    assert rows(running) == []
    assert len(_quarantined(running)) == 1


def test_missing_study_uid_cannot_understand(running: Sidecar) -> None:
    ds = make_ct()
    del ds.StudyInstanceUID
    with established(running) as assoc:
        rsp = assoc.send_c_store(ds)
    assert status_of(rsp) == Status.CANNOT_UNDERSTAND
    assert "StudyInstanceUID" in str(rsp.get("ErrorComment", ""))
    assert files_under(storage_dir(running)) == []
    assert rows(running) == []
    [(_, note)] = _quarantined(running)
    assert "StudyInstanceUID" in note


def _elem(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


@pytest.mark.usefixtures("chunked")
def test_unparseable_dataset_cannot_decode(running: Sidecar, tmp_path: Path) -> None:
    """Raw bytes that are not a dataset: a few valid elements, then an undefined-length
    sequence whose 'items' are noise."""
    sop = generate_uid()
    body = (
        _elem(0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.encode() + b"\x00")
        + _elem(0x0008, 0x0018, b"UI", sop.encode() + (b"\x00" if len(sop) % 2 else b""))
        + struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
        + bytes(range(1, 41))
    )
    src = write_raw_part10(tmp_path / "src" / "junk.dcm", body, sop)
    with established(running) as assoc:
        rsp = assoc.send_c_store(src)
        code = status_of(rsp)
        comment = str(rsp.get("ErrorComment", ""))
        assert status_of(assoc.send_c_echo()) == Status.SUCCESS
    assert code == Status.CANNOT_DECODE_DATASET, (hex(code), comment)
    assert comment
    assert files_under(storage_dir(running)) == []
    assert rows(running) == []
    [(dcm, _)] = _quarantined(running)
    assert dcm.read_bytes().endswith(body)


@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize("cut", [2, 1000])
def test_truncated_dataset_is_refused(running: Sidecar, tmp_path: Path, cut: int) -> None:
    """Native Pixel Data shorter than the image needs (README: 0xA900), here because the
    transfer was cut: the element says 8192 bytes, only 8192 - cut arrive."""
    ds = make_ct()
    whole = encode_dataset(ds)
    src = write_raw_part10(tmp_path / "src" / "cut.dcm", whole[:-cut], str(ds.SOPInstanceUID))
    with established(running) as assoc:
        rsp = assoc.send_c_store(src)
    assert status_of(rsp) in (
        Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, Status.CANNOT_DECODE_DATASET
    ), hex(status_of(rsp))
    assert rows(running) == []
    assert files_under(storage_dir(running)) == []


def test_deflated_image_is_stored(running: Sidecar) -> None:
    """Deflated Explicit VR Little Endian is a standard transfer syntax (README)."""
    ds = make_ct()
    ds.PixelData = bytes(64 * 64 * 2)  # compresses well, like most real images
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ae = make_scu(ts=(DeflatedExplicitVRLittleEndian,))
    assert running.address is not None
    assoc = ae.associate(*running.address, ae_title=running.config.dicom.ae_title)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status_of(rsp) == Status.SUCCESS, (hex(status_of(rsp)), str(rsp.get("ErrorComment", "")))
    row = row_for(running, ds.SOPInstanceUID)
    assert row["transfer_syntax_uid"] == DeflatedExplicitVRLittleEndian
    stored = dcmread(storage_dir(running) / row["file_path"])
    assert stored.PixelData == ds.PixelData


# ---------------------------------------------------------------- concurrency
def _store_series(
    app: Sidecar, study_uid: str, n: int, results: list[int], errors: list[BaseException],
    barrier: threading.Barrier,
) -> None:
    try:
        series_uid = generate_uid()
        datasets = [
            make_ct(study_uid=study_uid, series_uid=series_uid, instance_number=i + 1, seed=i)
            for i in range(n)
        ]
        with established(app) as assoc:
            barrier.wait(timeout=30)
            for ds in datasets:
                results.append(status_of(assoc.send_c_store(ds)))
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(exc)
        barrier.abort()


def test_concurrent_associations(running: Sidecar) -> None:
    """4 associations at once, 25 instances each, distinct series of one new study."""
    study_uid = generate_uid()
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)
    threads = [
        threading.Thread(target=_store_series, args=(running, study_uid, 25, results, errors,
                                                     barrier))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(results) == 100
    assert {hex(s) for s in results} == {hex(Status.SUCCESS)}
    all_rows = rows(running)
    assert len(all_rows) == 100
    assert len({r["sop_instance_uid"] for r in all_rows}) == 100
    assert {r["study_instance_uid"] for r in all_rows} == {study_uid}
    assert len({r["series_instance_uid"] for r in all_rows}) == 4
    stored = files_under(storage_dir(running))
    assert len(stored) == 100
    assert {storage_dir(running) / r["file_path"] for r in all_rows} == set(stored)


@pytest.mark.catalogue
def test_concurrent_first_instances_of_a_new_study(running: Sidecar) -> None:
    """Associations store the first instances of one new study at the same moment.

    Made deterministic: the test holds the SQLite write lock (on PostgreSQL: a lock
    on the patient table that lets reads through and stops inserts) until at least
    two handlers are at their first write to the catalogue, then lets them race to
    create the same patient and study rows. All must get Success (no 0x0110 from
    a unique-constraint race). Four senders, because two instances may share a
    storage lock stripe and then never meet in the database.
    """
    writers: set[int] = set()
    lock = threading.Lock()

    def note_writer(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        head = statement.lstrip().upper()
        if isinstance(threading.current_thread(), Association) and head.startswith(
            ("BEGIN IMMEDIATE", "INSERT", "UPDATE")
        ):
            with lock:
                writers.add(threading.get_ident())

    event.listen(running.engine, "before_cursor_execute", note_writer)
    blocker = running.engine.raw_connection()
    try:
        blocker.driver_connection.execute(
            "BEGIN IMMEDIATE" if running.engine.dialect.name == "sqlite"
            else "LOCK TABLE patient IN EXCLUSIVE MODE")
        study_uid = generate_uid()
        results: list[int] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)
        threads = [
            threading.Thread(target=_store_series, args=(running, study_uid, 1, results, errors,
                                                         barrier))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: len(writers) >= 2 or errors, 10, what="two stores to reach the database")
    finally:
        blocker.driver_connection.rollback()
        blocker.close()
        event.remove(running.engine, "before_cursor_execute", note_writer)
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert [hex(s) for s in results] == [hex(Status.SUCCESS)] * 4
    assert len(rows(running)) == 4
    with Session(running.engine) as s:
        assert len(s.scalars(select(Study)).all()) == 1
        assert len(s.scalars(select(Patient)).all()) == 1


# ------------------------------------------------------------ failed commit
@pytest.mark.catalogue
def test_failed_db_commit_leaves_nothing_and_node_recovers(running: Sidecar) -> None:
    restore = fail_writes(running.engine, "INSERT")
    ds = make_ct()
    with established(running) as assoc:
        rsp = assoc.send_c_store(ds)
        assert status_of(rsp) == Status.PROCESSING_FAILURE
        assert str(rsp.get("ErrorComment", "")).strip()
        assert files_under(storage_dir(running)) == []
        assert rows(running) == []
        restore()
        assert status_of(assoc.send_c_store(ds)) == Status.SUCCESS
    assert [r["sop_instance_uid"] for r in rows(running)] == [ds.SOPInstanceUID]
    assert len(files_under(storage_dir(running))) == 1


@pytest.mark.catalogue
def test_failed_db_commit_error_comment_is_truthful(running: Sidecar) -> None:
    fail_writes(running.engine, "INSERT")
    with established(running) as assoc:
        rsp = assoc.send_c_store(make_ct())
    assert status_of(rsp) == Status.PROCESSING_FAILURE
    # the database's refusal, not a made-up "concurrent store"
    assert "concurrent" not in str(rsp.get("ErrorComment", ""))
    assert "injected" in str(rsp.get("ErrorComment", ""))


# ------------------------------------------------------------ stability
def test_study_becomes_stable_and_reopens(
    config_factory: Callable[..., Config], sidecar_factory: Callable[[Config], Sidecar]
) -> None:
    stable_age = 0.5
    app = sidecar_factory(
        config_factory({"stability": {"stable_age": stable_age, "check_interval": 0.1}})
    )
    study_uid = generate_uid()
    with established(app) as assoc:
        assert status_of(assoc.send_c_store(make_ct(study_uid=study_uid))) == Status.SUCCESS
    first = wait_for(lambda: stable_study(app, study_uid), 10, what="the study to become stable")
    assert first["stable_at"] is not None

    with established(app) as assoc:  # a late instance re-opens the study
        assert status_of(assoc.send_c_store(make_ct(study_uid=study_uid))) == Status.SUCCESS
    reopened = study_row(app, study_uid)
    assert reopened is not None
    assert reopened["last_received_at"] > first["stable_at"]
    # either still open, or (on a slow machine) already re-marked after a new quiet period
    assert not reopened["stable"] or reopened["stable_at"] > reopened["last_received_at"]

    again = wait_for(lambda: stable_study(app, study_uid), 10, what="the study to be stable again")
    assert again["stable_at"] > first["stable_at"]
    assert again["last_received_at"] == reopened["last_received_at"]


# ------------------------------------------------------------ PHI in logs
@pytest.mark.usefixtures("chunked")
def test_logs_name_peers_but_never_phi(
    running: Sidecar, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar")
    caplog.set_level(logging.INFO, logger="pynetdicom")
    ds = make_ct()
    other = make_ct(sop_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
                    series_uid=ds.SeriesInstanceUID, seed=9)
    missing = make_ct()
    del missing.SeriesInstanceUID
    files = [write_part10(d, tmp_path / "src" / f"{i}.dcm")
             for i, d in enumerate([ds, other, missing])]
    files.append(write_part10(make_ct(), tmp_path / "src" / "mismatch.dcm",
                              command_sop_uid=generate_uid()))
    with established(running, "PHIPACS") as assoc:
        assert status_of(assoc.send_c_echo()) == Status.SUCCESS
        codes = [status_of(assoc.send_c_store(f)) for f in files]
    assert codes == [Status.SUCCESS, Status.SUCCESS, Status.CANNOT_UNDERSTAND,
                     Status.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    # the association summary is logged when the node sees the release
    wait_for(lambda: any("PHIPACS" in r.getMessage() and "released" in r.getMessage()
                         for r in caplog.records), 10, what="the association summary log line")
    messages = [r.getMessage() for r in caplog.records]
    assert any("PHIPACS" in m for m in messages)
    text_logged = "\n".join(messages) + "\n" + caplog.text
    for secret in (SECRET_NAME, SECRET_ID, "Doe", "SECRET"):
        assert secret not in text_logged


# ------------------------------------------------------------ association slots
def _half_open(port: int, n: int, *, partial: bool) -> list[socket.socket]:
    """``n`` silent connections, or ones that send 20 bytes of a 200-byte A-ASSOCIATE-RQ."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if partial:
            s.sendall(struct.pack(">BBI", 1, 0, 200) + b"\0" * 14)
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_half_open_connections_do_not_hold_slots_and_are_dropped(
    config_factory: Callable[..., Config], sidecar_factory: Callable[[Config], Sidecar]
) -> None:
    # Torture finding: silent connections and half-sent A-ASSOCIATE-RQs counted against
    # max_associations, and a stalled request PDU was never dropped (no socket timeout).
    app = sidecar_factory(config_factory({"dicom": {"max_associations": 2, "acse_timeout": 2}}))
    assert app.address is not None
    port = app.address[1]
    junk = _half_open(port, 4, partial=True) + _half_open(port, 3, partial=False)
    try:
        time.sleep(0.3)
        with established(app) as assoc:  # still reachable
            assert status_of(assoc.send_c_echo()) == Status.SUCCESS
        wait_for(lambda: all(_closed_by_peer(s) for s in junk), 10,
                 "the node to drop the half-open connections after acse_timeout")
    finally:
        for s in junk:
            s.close()


def test_max_associations_counts_associations_and_refusals_are_logged(
    config_factory: Callable[..., Config], sidecar_factory: Callable[[Config], Sidecar],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = sidecar_factory(config_factory({"dicom": {"max_associations": 2}}))
    with caplog.at_level(logging.WARNING, logger="sidecar.dicom.node"):
        with established(app) as one, established(app) as two, associate(app) as third:
            assert one.is_established and two.is_established
            assert third.is_rejected
            rj = third.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert "refused: all 2 associations in use (dicom.max_associations)" in caplog.text
        with established(app) as again:  # the slots are free once released
            assert status_of(again.send_c_echo()) == Status.SUCCESS
