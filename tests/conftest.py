"""Shared fixtures and helpers: configurations in tmp dirs, a live node on a free
port, DICOM built in code and its Part-10 bytes (``part10``), one C-FIND client
(``c_find``), one ``wait_for``, and the locations of optional real-world resources."""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from sidecar.config import Config, load_config
from sidecar.dicom.statuses import Status
from sidecar.service.app import Sidecar

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SIDECAR_SHARED_DATA", REPO.parent / "shared" / "data"))
DCMTK_BIN = Path("/usr/bin")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


_NAMED_LOGGERS = ("sidecar", "pynetdicom", "pydicom", "apscheduler", "alembic")


@pytest.fixture
def cli_isolation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """For CLI tests: no SIDECAR_* from the outside, no ./config/sidecar.yaml (cwd is
    tmp_path), and logging put back afterwards (the CLI configures logging with the
    runner's soon closed stderr)."""
    import logging

    from pynetdicom import _config as pnd_config

    for name in list(os.environ):
        if name.startswith("SIDECAR"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in _NAMED_LOGGERS}
    flags = (pnd_config.LOG_REQUEST_IDENTIFIERS, pnd_config.LOG_RESPONSE_IDENTIFIERS)
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)
    pnd_config.LOG_REQUEST_IDENTIFIERS, pnd_config.LOG_RESPONSE_IDENTIFIERS = flags


def storage_files(root: Path) -> list[Path]:
    """Every file below a storage directory but live stores' locks (``.tmp/<owner>.lock``)."""
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not (p.parent.name == ".tmp" and p.suffix == ".lock"))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., Config]:
    """Build a validated Config with data in tmp_path; pass nested overrides."""

    def make(overrides: dict[str, Any] | None = None) -> Config:
        import yaml

        data: dict[str, Any] = {
            "dicom": {"port": free_port()},
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
            "stability": {"stable_age": 60.0, "check_interval": 1.0},
            # DICOM tests do not need the CNN; embedding tests turn it on.
            "worker": {"enabled": False},
        }
        _deep_update(data, overrides or {})
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, environ={})

    return make


@pytest.fixture
def config(config_factory: Callable[..., Config]) -> Config:
    """A default test configuration."""
    return config_factory()


@pytest.fixture
def running(config: Config) -> Iterator[Sidecar]:
    """A started sidecar (DICOM node + scheduler) on a free port."""
    app = Sidecar(config)
    app.start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture
def sidecar_factory() -> Iterator[Callable[[Config], Sidecar]]:
    """Start sidecars with custom configurations; all are stopped afterwards."""
    apps: list[Sidecar] = []

    def start(cfg: Config) -> Sidecar:
        app = Sidecar(cfg)
        app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


def file_meta(
    sop_class: str, sop_uid: str, transfer_syntax: str = ExplicitVRLittleEndian
) -> FileMetaDataset:
    """The File Meta of a Part-10 file naming ``sop_class``/``sop_uid``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def make_ct(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    rows: int = 64,
    cols: int = 64,
    seed: int = 0,
    patient_id: str = "PID-SECRET-123",
    patient_name: str = "Doe^Secret",
) -> Dataset:
    """A small valid CT Image Storage dataset with file meta (Explicit VR LE)."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240131"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC001"
    ds.StudyID = "1"
    ds.StudyDescription = "CT HEAD"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "AXIAL"
    ds.BodyPartExamined = "HEAD"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    return ds


BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def part10(ds: Dataset) -> bytes:
    """``ds`` as a Part-10 file image (preamble, File Meta, dataset)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_sr(
    study: str | None = None, series: str | None = None, patient_id: str = "PID-SR"
) -> Dataset:
    """A minimal Basic Text SR (a non-image object: stored, never embedded) with file meta."""
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    return ds


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip when this machine does not have it."""
    if not (SHARED_DATA / "dicom").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


def dcmtk_tool(name: str) -> str:
    """Full path of a DCMTK tool (never the pynetdicom console script of the same name)."""
    path = DCMTK_BIN / name
    if not path.exists():
        pytest.skip(f"DCMTK {name} not installed at {path} (apt-get install dcmtk)")
    return str(path)


#: storescu option that proposes one transfer syntax, so a file is sent as it is
#: (``-R`` alone proposes only uncompressed syntaxes and would make storescu try
#: to decompress the file).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK clients: TCP_NODELAY=1 (DCMTK keeps Nagle on otherwise, and
    each small PDU then waits for the peer's delayed ACK)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


# ------------------------------------------------------------------ C-FIND client
#: Message ID of every C-FIND that ``c_find`` sends (a C-CANCEL names it).
FIND_MSG_ID = 7
SIMILARITY_CREATOR = "PACS SIDECAR SIMILARITY"


@dataclass
class FindResult:
    """What a C-FIND returned: pending statuses and identifiers, then the final status."""

    pending: list[int]
    identifiers: list[Dataset]
    final: Dataset

    @property
    def status(self) -> int:
        return int(self.final.Status)

    @property
    def comment(self) -> str:
        return str(self.final.get("ErrorComment", ""))

    def values(self, keyword: str) -> list[Any]:
        return [ds.get(keyword) for ds in self.identifiers]

    def private(self, offset: int, creator: str = SIMILARITY_CREATOR) -> list[Any]:
        """Element ``offset`` of the (0099,xx) private block of ``creator`` in each match."""
        return [ds.private_block(0x0099, creator)[offset].value for ds in self.identifiers]


def c_find(
    address: tuple[str, int] | None,
    identifier: Dataset,
    model: str = StudyRootQueryRetrieveInformationModelFind,
    *,
    calling: str = "FINDSCU",
    called: str = "SIDECAR",
    ts: str | None = None,
    on_pending: Callable[[Any, int], None] | None = None,
) -> FindResult:
    """Send one C-FIND on a new association; ``on_pending(assoc, n)`` after each match.

    ``ts``: the one transfer syntax proposed (default: Explicit, then Implicit VR LE).
    """
    assert address is not None
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model, [ts] if ts else [ExplicitVRLittleEndian,
                                                     ImplicitVRLittleEndian])
    assoc = ae.associate(*address, ae_title=called)
    assert assoc.is_established
    pending: list[int] = []
    identifiers: list[Dataset] = []
    final: Dataset | None = None
    try:
        for status, ident in assoc.send_c_find(identifier, model, msg_id=FIND_MSG_ID):
            assert "Status" in status, "association aborted"
            if status.Status in (Status.PENDING, Status.PENDING_WARNING):
                pending.append(int(status.Status))
                identifiers.append(ident)
                if on_pending is not None:
                    on_pending(assoc, len(identifiers))
            else:
                final = status
    finally:
        assoc.release()
    assert final is not None
    return FindResult(pending, identifiers, final)
