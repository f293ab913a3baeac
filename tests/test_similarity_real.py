"""Similarity C-FIND on real DICOM (``../shared/data``), with the shipped model.

* The nine encodings of one MR slice in ``dcm_qa_ts`` (seven transfer
  syntaxes, all lossless), stored as nine separate studies of nine patients
  among real CT and MR series, find each other first.
* A slice of the real CT series, re-identified as if it came from elsewhere
  and sent to the example AE title, finds its own series first.

Skipped when ``../shared/data`` is absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts

from sidecar.config import Config
from sidecar.dicom.statuses import Status
from sidecar.embeddings.model import load_embedder
from sidecar.service.app import Sidecar
from tests.conftest import SHARED_DATA, c_find, part10
from tests.test_similarity_find import EXAMPLE_AE, similarity

pytestmark = pytest.mark.shared_data


@dataclass
class RealArchive:
    app: Sidecar
    address: tuple[str, int]
    ts_studies: list[str]  # one per encoding, in file order
    ct_series: str
    ct_files: list[Path]


def send(address: tuple[str, int], paths: list[Path], called: str = "SIDECAR") -> list[int]:
    """C-STORE files as they are (their own transfer syntax) on one association."""
    ae = AE(ae_title="LOADER")
    syntaxes = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).file_meta
                           .TransferSyntaxUID) for p in paths})
    classes = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
                      for p in paths})
    for cx in StoragePresentationContexts:
        if cx.abstract_syntax in classes:
            for ts in syntaxes:  # one context per syntax: compressed data is sent as is
                ae.add_requested_context(cx.abstract_syntax, ts)
    assoc = ae.associate(*address, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


def reidentified(path: Path, out: Path, patient: str) -> tuple[Path, Dataset]:
    """A copy with new study, series and instance UIDs and another patient (same pixels)."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient
    ds.PatientName = f"TEST^{patient}"
    out.write_bytes(part10(ds))
    return out, ds


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealArchive]:
    if not (SHARED_DATA / "dicom").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    shared = SHARED_DATA
    tmp = tmp_path_factory.mktemp("real")
    import yaml

    from sidecar.config import load_config
    from tests.conftest import free_port

    path = tmp / "sidecar.yaml"
    path.write_text(yaml.safe_dump({
        "dicom": {"port": free_port(), "retrieve_ae_title": "PACS"},
        "storage": {"data_dir": str(tmp / "data"), "min_free_mb": 1},
        "worker": {"enabled": False},
        "logging": {"level": "WARNING"},
    }))
    cfg: Config = load_config(path, environ={})
    app = Sidecar(cfg, embedder=load_embedder(cfg.embedding))  # the shipped model
    address = app.start()
    try:
        ts_files = sorted((shared / "dicom" / "dcm_qa_ts" / "In").glob("*.dcm"))
        assert len(ts_files) == 9
        copies = [reidentified(p, tmp / f"ts{i}.dcm", f"TS{i}")
                  for i, p in enumerate(ts_files)]
        assert send(address, [p for p, _ in copies]) == [Status.SUCCESS] * 9
        ct_files = sorted((shared / "dicom" / "dcm_qa_ct" / "In" / "GE").glob("*.dcm"))
        mr_files = sorted((shared / "dicom" / "dcm_qa_nih" / "In").rglob("*.dcm"))
        assert ct_files and mr_files
        assert send(address, ct_files) == [Status.SUCCESS] * len(ct_files)
        assert send(address, mr_files) == [Status.SUCCESS] * len(mr_files)
        app.repository.mark_stable_studies(0.0)
        assert app.embedding is not None
        while app.embedding.run_job().series:
            pass
        status = app.repository.status()
        assert status.instances_by_state["failed"] == 0
        ct_series = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID)
        yield RealArchive(app, address, [str(ds.StudyInstanceUID) for _, ds in copies],
                          ct_series, ct_files)
    finally:
        app.stop()


def test_nine_encodings_find_each_other_first(real: RealArchive) -> None:
    studies = real.ts_studies
    for i, uid in enumerate(studies):
        res = c_find(real.address, similarity(study=uid, k=8, StudyInstanceUID=""))
        assert res.status == Status.SUCCESS
        found = [str(ds.StudyInstanceUID) for ds in res.identifiers]
        others = set(studies) - {uid}
        assert set(found) == others, f"encoding {i + 1}: {found}"
        assert min(res.private(0x10)) > 0.999  # lossless encodings: the same pixels
    # and the best match that is not one of them scores clearly lower
    res = c_find(real.address, similarity(study=studies[0], k=9, StudyInstanceUID=""))
    assert str(res.identifiers[-1].StudyInstanceUID) not in studies
    assert res.private(0x10)[-1] < 0.99


def test_ct_slice_finds_its_own_series_first(real: RealArchive, tmp_path: Path) -> None:
    middle = real.ct_files[len(real.ct_files) // 2]
    path, example = reidentified(middle, tmp_path / "example.dcm", "ELSEWHERE")
    assert send(real.address, [path], called=EXAMPLE_AE) == [Status.SUCCESS]
    res = c_find(real.address, similarity("SERIES", sop=str(example.SOPInstanceUID), k=3,
                                          SeriesInstanceUID="", Modality=""))
    assert res.status == Status.SUCCESS
    top: Any = res.identifiers[0]
    assert str(top.SeriesInstanceUID) == real.ct_series
    assert top.Modality == "CT"
    assert res.private(0x10)[0] > res.private(0x10)[1]
