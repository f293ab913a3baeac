"""InstanceStore: durable, byte-exact storage with a real catalogue on SQLite."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AllStoragePresentationContexts
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from sidecar.archive.parse import IMAGE_SOP_CLASSES
from sidecar.archive.store import InstanceStore, Origin, Outcome
from sidecar.config import Config
from sidecar.db.connect import open_catalogue
from sidecar.db.models import Instance, InstanceState, Study
from sidecar.db.repository import Lookup, Repository
from sidecar.errors import InvalidDataset, OutOfResources, StorageFailure
from tests.conftest import (
    CT_IMAGE_STORAGE,
    fail_writes,
    make_ct,
    make_sr,
    part10,
    storage_files,
)

#: Every test that reaches the catalogue runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.catalogue

PACS = Origin(ae_title="PACS", host="10.0.0.5")
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def test_quarantine_stops_keeping_at_its_cap_and_refusals_go_on(
    env_factory: Callable[..., Env], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sidecar.archive import store as storage

    env = env_factory({"storage": {"quarantine_max_mb": 1}})
    env.quarantine.mkdir(parents=True, exist_ok=True)
    filler = env.quarantine / "earlier.dcm"
    filler.write_bytes(b"\0" * (2**20 - 100))  # almost full
    bad = make_ct()
    del bad.StudyInstanceUID
    with caplog.at_level(logging.WARNING, logger="sidecar.archive.store"), \
            pytest.raises(InvalidDataset) as info:
        env.store.store(part10(bad), None, PACS)
    assert info.value.kind == "missing"  # refused as before, with its reason
    assert files_under(env.quarantine) == [filler]  # but not kept
    assert "not kept: the quarantine holds" in caplog.text
    assert "StudyInstanceUID is missing" in caplog.text
    good = env.store.store(part10(make_ct()), None, PACS)  # other traffic unaffected
    assert good.outcome is Outcome.STORED
    # room again (measured anew): kept
    filler.unlink()
    monkeypatch.setattr(storage, "QUARANTINE_REMEASURE_S", 0.0)
    with pytest.raises(InvalidDataset):
        env.store.store(part10(bad), None, PACS)
    kept, _ = _quarantined(env)
    assert kept == part10(bad)
    usage = storage.quarantine_usage(env.quarantine)
    assert usage.datasets == 1
    assert usage.bytes == sum(p.stat().st_size for p in files_under(env.quarantine))
    assert storage.quarantine_usage(env.quarantine / "absent") == storage.QuarantineUsage(0, 0)

    none = env_factory({"storage": {"quarantine_max_mb": 0,
                                    "data_dir": str(env.config.data_dir) + "-none"}})
    with pytest.raises(InvalidDataset):
        none.store.store(part10(bad), None, PACS)
    assert files_under(none.quarantine) == []


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    """Every plain file below ``root`` (walks the whole tree)."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        out += [Path(dirpath) / n for n in names]
    return sorted(out)


def all_paths(root: Path) -> set[Path]:
    out = set()
    for dirpath, dirs, names in os.walk(root):
        out |= {Path(dirpath) / n for n in dirs + names}
    return out




@dataclass
class Env:
    config: Config
    engine: Engine
    repo: Repository
    store: InstanceStore

    @property
    def storage(self) -> Path:
        return self.config.storage_dir

    @property
    def quarantine(self) -> Path:
        return self.config.quarantine_dir

    def instances(self) -> list[Instance]:
        with Session(self.engine) as s:
            return list(s.scalars(select(Instance)).all())

    def studies(self) -> list[Study]:
        with Session(self.engine) as s:
            return list(s.scalars(select(Study)).all())

    def stored_files(self) -> list[Path]:
        return storage_files(self.storage)


@pytest.fixture
def env_factory(config_factory: Callable[..., Config]) -> Iterator[Callable[..., Env]]:
    engines: list[Engine] = []

    def make(overrides: dict[str, Any] | None = None) -> Env:
        cfg = config_factory(overrides)
        engine, repo = open_catalogue(cfg)
        engines.append(engine)
        return Env(cfg, engine, repo, InstanceStore(cfg, repo))

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def env(env_factory: Callable[..., Env]) -> Env:
    return env_factory()


# --------------------------------------------------------------- storing
def test_store_keeps_the_bytes_exactly(env: Env) -> None:
    ds = make_ct()
    data = part10(ds)
    result = env.store.store(data, None, PACS)
    assert result.outcome is Outcome.STORED
    assert result.sop_instance_uid == ds.SOPInstanceUID
    assert result.study_instance_uid == ds.StudyInstanceUID
    expected = (env.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID
                / f"{ds.SOPInstanceUID}.dcm")
    assert result.path == expected.resolve()
    assert result.path.read_bytes() == data
    assert env.stored_files() == [result.path]  # nothing left in storage/.tmp either
    assert [p for p in files_under(env.storage / ".tmp") if p.suffix != ".lock"] == []

    (row,) = env.instances()
    assert row.file_path == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert row.file_size == len(data)
    assert row.sha256 == sha(data)
    assert row.transfer_syntax_uid == str(ExplicitVRLittleEndian)  # from the file meta
    assert (row.calling_ae_title, row.calling_host) == ("PACS", "10.0.0.5")
    assert row.state is InstanceState.PENDING
    found = env.repo.find_instance(ds.SOPInstanceUID)
    assert found is not None and found.sha256 == sha(data)


def test_store_uses_the_negotiated_transfer_syntax(env: Env) -> None:
    ds = make_ct()
    data = part10(ds)
    result = env.store.store(
        data, str(ImplicitVRLittleEndian), PACS,
        expected_sop_class_uid=CT_IMAGE_STORAGE,
        expected_sop_instance_uid=ds.SOPInstanceUID,
    )
    assert result.outcome is Outcome.STORED
    assert env.instances()[0].transfer_syntax_uid == str(ImplicitVRLittleEndian)


def test_many_instances_of_one_series(env: Env) -> None:
    study, series = generate_uid(), generate_uid()
    blobs = {}
    for i in range(5):
        ds = make_ct(study_uid=study, series_uid=series, instance_number=i, seed=i)
        blobs[ds.SOPInstanceUID] = part10(ds)
        env.store.store(blobs[ds.SOPInstanceUID], None, PACS)
    files = env.stored_files()
    assert {f.name for f in files} == {f"{uid}.dcm" for uid in blobs}
    assert all(f.parent == (env.storage / study / series).resolve() for f in files)
    for f in files:
        assert f.read_bytes() == blobs[f.stem]
    assert env.repo.status().series == 1


def test_store_without_fsync(env_factory: Callable[..., Env]) -> None:
    env = env_factory({"storage": {"fsync": False}})
    data = part10(make_ct())
    result = env.store.store(data, None, PACS)
    assert result.path.read_bytes() == data


def test_non_image_object_is_stored_and_skipped(env: Env) -> None:
    data = part10(make_sr())
    result = env.store.store(data, None, PACS)
    assert result.outcome is Outcome.STORED
    assert result.path.read_bytes() == data
    (row,) = env.instances()
    assert row.state is InstanceState.SKIPPED
    assert row.skip_reason == "non-image SOP class"


# ------------------------------------------------------------ duplicates
def test_identical_duplicate_is_a_noop(env: Env) -> None:
    data = part10(make_ct())
    first = env.store.store(data, None, PACS)
    again = env.store.store(data, None, Origin("OTHER", "10.0.0.9"))
    assert again.outcome is Outcome.DUPLICATE
    assert again.path == first.path
    assert env.stored_files() == [first.path]
    (row,) = env.instances()
    assert row.calling_ae_title == "PACS"  # the record is untouched


def test_keep_first_drops_a_different_copy(env: Env) -> None:
    assert env.config.dicom.duplicate_policy == "keep_first"
    ds = make_ct(seed=1)
    first_bytes = part10(ds)
    first = env.store.store(first_bytes, None, PACS)
    ds2 = make_ct(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                  sop_uid=ds.SOPInstanceUID, seed=2)
    second_bytes = part10(ds2)
    assert second_bytes != first_bytes
    result = env.store.store(second_bytes, None, PACS)
    assert result.outcome is Outcome.KEPT_FIRST
    assert result.path == first.path
    assert env.stored_files() == [first.path]
    assert first.path.read_bytes() == first_bytes
    (row,) = env.instances()
    assert row.sha256 == sha(first_bytes)


def test_replace_stores_the_new_copy(env_factory: Callable[..., Env]) -> None:
    env = env_factory({"dicom": {"duplicate_policy": "replace"}})
    ds = make_ct(seed=1)
    v1 = part10(ds)
    first = env.store.store(v1, None, PACS)
    versions = [v1]
    last = first
    for seed in (2, 3):
        ds_n = make_ct(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                       sop_uid=ds.SOPInstanceUID, seed=seed)
        data = part10(ds_n)
        result = env.store.store(data, None, Origin("NEWER", "10.0.0.7"))
        assert result.outcome is Outcome.REPLACED
        assert result.path.read_bytes() == data
        assert not last.path.exists() or last.path == result.path
        assert env.stored_files() == [result.path]  # the old file is gone
        (row,) = env.instances()
        assert row.sha256 == sha(data)
        assert row.file_size == len(data)
        assert (env.storage / row.file_path).resolve() == result.path
        assert row.calling_ae_title == "NEWER"
        versions.append(data)
        last = result
    assert len(set(versions)) == 3
    # Identical bytes are still a no-op under "replace".
    assert env.store.store(versions[-1], None, PACS).outcome is Outcome.DUPLICATE
    assert env.stored_files() == [last.path]


# ------------------------------------------------------------ resources
def test_watermark_refuses_without_writing(env_factory: Callable[..., Env]) -> None:
    env = env_factory({"storage": {"min_free_mb": 10**12}})
    with pytest.raises(OutOfResources, match="below watermark"):
        env.store.store(part10(make_ct()), None, PACS)
    bad = make_ct()
    del bad.StudyInstanceUID
    with pytest.raises(OutOfResources):  # checked before parsing: nothing quarantined
        env.store.store(part10(bad), None, PACS)
    assert env.stored_files() == []
    assert files_under(env.quarantine) == []
    assert env.instances() == []


# ------------------------------------------------------ database failures
def test_database_failure_leaves_no_file_and_no_row(env: Env) -> None:
    restore = fail_writes(env.engine, "INSERT")
    ds = make_ct()
    data = part10(ds)
    with pytest.raises(StorageFailure):
        env.store.store(data, None, PACS)
    assert env.stored_files() == []
    assert env.instances() == []
    assert env.studies() == []  # patient/study/series of the failed insert rolled back
    assert env.repo.find_instance(ds.SOPInstanceUID) is None

    # Once the database works again the same instance stores normally.
    restore()
    result = env.store.store(data, None, PACS)
    assert result.outcome is Outcome.STORED
    assert env.stored_files() == [result.path]
    assert result.path.name == f"{ds.SOPInstanceUID}.dcm"


def test_database_unavailable_before_writing(env: Env) -> None:
    with env.engine.begin() as conn:
        conn.execute(text("ALTER TABLE instance RENAME TO instance_gone"))
    with pytest.raises(StorageFailure, match="database"):
        env.store.store(part10(make_ct()), None, PACS)
    assert env.stored_files() == []


def test_database_failure_on_replace_keeps_the_old_file(env_factory: Callable[..., Env]) -> None:
    env = env_factory({"dicom": {"duplicate_policy": "replace"}})
    ds = make_ct(seed=1)
    v1 = part10(ds)
    first = env.store.store(v1, None, PACS)
    fail_writes(env.engine, "UPDATE")
    v2 = part10(make_ct(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                          sop_uid=ds.SOPInstanceUID, seed=2))
    with pytest.raises(StorageFailure):
        env.store.store(v2, None, PACS)
    assert env.stored_files() == [first.path]
    assert first.path.read_bytes() == v1
    assert env.instances()[0].sha256 == sha(v1)


# ------------------------------------------------------------- quarantine
def _quarantined(env: Env) -> tuple[bytes, str]:
    files = files_under(env.quarantine)
    dcm = [f for f in files if f.suffix == ".dcm"]
    txt = [f for f in files if f.suffix == ".txt"]
    assert len(dcm) == 1 and len(txt) == 1, files
    assert len(files) == 2  # no .part leftovers
    assert dcm[0].stem == txt[0].stem
    return dcm[0].read_bytes(), txt[0].read_text()


def test_refused_dataset_is_quarantined_with_a_note(env: Env) -> None:
    ds = make_ct()
    del ds.StudyInstanceUID
    data = part10(ds)
    with pytest.raises(InvalidDataset) as info:
        env.store.store(data, None, PACS)
    assert info.value.kind == "missing"
    kept, note = _quarantined(env)
    assert kept == data
    assert "reason: StudyInstanceUID is missing or empty" in note
    assert "calling_ae_title: PACS" in note
    assert "calling_host: 10.0.0.5" in note
    assert f"bytes: {len(data)}" in note
    assert env.stored_files() == []
    assert env.instances() == []


def _short_pixels() -> bytes:
    ds = make_ct(rows=32, cols=32)
    ds.PixelData = b"\x00" * 100
    return part10(ds)


def _bad_uid() -> bytes:
    ds = make_ct()
    ds.SeriesInstanceUID = "1.2.3.abc"
    return part10(ds)


def _no_transfer_syntax() -> bytes:
    ds = make_ct()
    del ds.file_meta.TransferSyntaxUID
    ds.preamble = b"\x00" * 128
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("build", "kwargs", "kind"),
    [
        (lambda: b"\x00" * 128 + b"DICM" + b"garbage" * 10, {}, None),
        (lambda: b"not dicom at all", {}, "unparseable"),
        (_short_pixels, {}, "mismatch"),
        (_bad_uid, {}, "invalid_uid"),
        (_no_transfer_syntax, {}, "missing"),
        (lambda: part10(make_ct()), {"expected_sop_class_uid": "1.2.840.10008.5.1.4.1.1.4"},
         "mismatch"),
        (lambda: part10(make_ct()), {"expected_sop_instance_uid": "1.2.3.4"}, "mismatch"),
    ],
    ids=["broken-body", "garbage", "short-pixels", "bad-uid", "no-ts", "class-mismatch",
         "instance-mismatch"],
)
def test_refusals_are_quarantined(
    env: Env, build: Callable[[], bytes], kwargs: dict[str, str], kind: str | None
) -> None:
    data = build()
    with pytest.raises(InvalidDataset) as info:
        env.store.store(data, None, PACS, **kwargs)
    if kind is not None:
        assert info.value.kind == kind
    kept, note = _quarantined(env)
    assert kept == data
    assert f"reason: {info.value}" in note
    assert env.stored_files() == []
    assert env.instances() == []


def test_series_of_another_study_is_refused_and_quarantined(env: Env) -> None:
    first = make_ct()
    ok = env.store.store(part10(first), None, PACS)
    intruder = make_ct(series_uid=first.SeriesInstanceUID)  # new study, same series UID
    data = part10(intruder)
    with pytest.raises(InvalidDataset):
        env.store.store(data, None, PACS)
    assert env.stored_files() == [ok.path]  # the intruder's file was removed again
    kept, note = _quarantined(env)
    assert kept == data
    assert "another study" in note
    assert len(env.instances()) == 1
    assert len(env.studies()) == 1


# ---------------------------------------------------------- path traversal
TRAVERSALS = [
    "../../../../escape",
    "..",
    "1.2/../../../escape",
    "/tmp/escape",
    "1.2.3/../../escape",
    "1.2.3\\..\\..\\escape",
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
@pytest.mark.parametrize("uid", TRAVERSALS)
def test_path_traversal_uids_never_escape(
    env: Env, tmp_path: Path, keyword: str, uid: str
) -> None:
    ds = make_ct()
    setattr(ds, keyword, uid)
    data = part10(ds)
    before = all_paths(tmp_path)
    with pytest.raises(InvalidDataset) as info:
        env.store.store(data, None, PACS)
    assert info.value.kind == "invalid_uid"
    created = all_paths(tmp_path) - before
    quarantine = env.quarantine.resolve()
    wal_files = {p for p in created if p.name.startswith("sidecar.db")}
    assert all(p.resolve().is_relative_to(quarantine) for p in created - wal_files), created
    assert env.stored_files() == []
    assert not Path("/tmp/escape").exists()
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path.parent / "escape").exists()


# ------------------------------------------------------------- concurrency
def test_concurrent_identical_stores_keep_one_file(env: Env) -> None:
    data = part10(make_ct())
    n = 8
    barrier = threading.Barrier(n)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            result = env.store.store(data, None, PACS)
            with lock:
                outcomes.append(result.outcome)
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert sorted(outcomes) == sorted([Outcome.STORED] + [Outcome.DUPLICATE] * (n - 1))
    assert len(env.stored_files()) == 1
    assert len(env.instances()) == 1


def test_lost_race_with_another_process_is_a_duplicate(env: Env) -> None:
    """Another process commits the same SOP Instance UID between our duplicate
    check and our insert: the unique constraint stops us, our file is removed,
    and the store is decided again as an identical duplicate (Success)."""
    data = part10(make_ct())
    other = InstanceStore(env.config, env.repo)  # stands for the other process
    real_lookup = env.repo.lookup
    calls = {"n": 0}

    def find_then_lose(uid: str) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            other.store(data, None, PACS)  # the other writer wins right now
            return Lookup(None, False)  # ... but our check ran just before it
        return real_lookup(uid)

    env.repo.lookup = find_then_lose  # type: ignore[method-assign]
    result = env.store.store(data, None, PACS)
    assert result.outcome is Outcome.DUPLICATE
    assert len(env.instances()) == 1
    files = env.stored_files()
    assert len(files) == 1 and files[0].read_bytes() == data


def test_image_sop_classes_are_the_image_classes_the_node_accepts() -> None:
    accepted = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    images = {
        uid for uid in accepted
        if ((kw := UID(uid).keyword).endswith("ImageStorage") or "ImageStorageFor" in kw)
        and not kw.startswith("Video")
    }
    assert IMAGE_SOP_CLASSES == images
