"""The node against DCMTK's command-line clients (an independent DICOM implementation).

Skips when DCMTK is not installed at /usr/bin. DCMTK tools are always called by
full path: the virtualenv has pynetdicom console scripts with the same names.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from sidecar.db.models import Instance
from sidecar.service.app import Sidecar
from tests.conftest import STORESCU_PROPOSE, dcmtk_env, dcmtk_tool, make_ct, part10, storage_files

pytestmark = pytest.mark.dcmtk

TIMEOUT = 60


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk_tool(name), *args],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def peer(app: Sidecar) -> list[str]:
    assert app.address is not None
    host, port = app.address
    return [host, str(port)]


def instance_rows(app: Sidecar) -> dict[str, dict[str, Any]]:
    with Session(app.engine) as s:
        return {
            i.sop_instance_uid: {
                "transfer_syntax_uid": i.transfer_syntax_uid,
                "calling_ae_title": i.calling_ae_title,
                "file_path": i.file_path,
                "sop_class_uid": i.sop_class_uid,
            }
            for i in s.scalars(select(Instance))
        }


def stored_files(app: Sidecar) -> list[Path]:
    return storage_files(app.store.root)


def test_echoscu(running: Sidecar) -> None:
    res = run_tool("echoscu", "-aet", "DCMTKSCU", "-aec", running.config.dicom.ae_title,
                   *peer(running))
    assert res.returncode == 0, res.stderr


def test_storescu_generated_files(running: Sidecar, tmp_path: Path) -> None:
    study = generate_uid()
    datasets = [make_ct(study_uid=study, instance_number=i + 1, seed=i) for i in range(3)]
    files = []
    for i, ds in enumerate(datasets):
        path = tmp_path / "src" / f"ct{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(part10(ds))
        files.append(path)
    res = run_tool("storescu", "-aet", "DCMTKSCU", "-aec", running.config.dicom.ae_title,
                   *peer(running), *map(str, files))
    assert res.returncode == 0, res.stderr
    rows = instance_rows(running)
    assert set(rows) == {str(ds.SOPInstanceUID) for ds in datasets}
    for ds in datasets:
        row = rows[str(ds.SOPInstanceUID)]
        assert row["calling_ae_title"] == "DCMTKSCU"
        assert row["transfer_syntax_uid"] == ExplicitVRLittleEndian
        stored = dcmread(running.store.root / row["file_path"])
        assert stored.PixelData == ds.PixelData
        assert stored.StudyInstanceUID == study
    assert len(stored_files(running)) == 3


def test_storescu_wrong_called_ae_title(running: Sidecar, tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    path.write_bytes(part10(make_ct()))
    res = run_tool("storescu", "-aet", "DCMTKSCU", "-aec", "WRONG", *peer(running), str(path))
    assert res.returncode != 0
    assert "reject" in (res.stdout + res.stderr).lower()
    assert instance_rows(running) == {}
    assert stored_files(running) == []




@pytest.mark.shared_data
def test_storescu_compressed_files_keep_their_transfer_syntax(
    running: Sidecar, shared_data: Path
) -> None:
    """The same MR slice in 9 transfer syntaxes (RLE, JPEG lossless, JPEG-LS, J2K, ...):
    each file is proposed in its own transfer syntax only (``-R`` plus the matching
    ``-x`` option), sent without conversion and recorded with that syntax."""
    files = sorted((shared_data / "dicom" / "dcm_qa_ts" / "In").glob("*.dcm"))
    assert len(files) >= 4
    own: dict[str, str] = {}
    by_ts: dict[str, list[Path]] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        own[str(ds.SOPInstanceUID)] = ts
        by_ts.setdefault(ts, []).append(f)
    compressed = {ts for ts in own.values() if UID(ts).is_compressed}
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90"} <= compressed
    for ts, group in sorted(by_ts.items()):
        res = run_tool("storescu", "-R", STORESCU_PROPOSE[ts], "-aet", "DCMTKSCU", "-aec",
                       running.config.dicom.ae_title, *peer(running), *map(str, group))
        assert res.returncode == 0, (ts, res.stderr)
        assert "convert" not in res.stdout + res.stderr, (ts, res.stderr)
    rows = instance_rows(running)
    assert set(rows) == set(own)
    recorded = {uid: rows[uid]["transfer_syntax_uid"] for uid in own}
    assert recorded == own
    for uid, ts in own.items():
        stored = dcmread(running.store.root / rows[uid]["file_path"], stop_before_pixels=True)
        assert stored.file_meta.TransferSyntaxUID == ts
        assert stored.SOPInstanceUID == uid
