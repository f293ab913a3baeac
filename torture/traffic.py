"""DICOM traffic for the campaigns: generated CT series as files, and senders that record
which instances were acknowledged with Success."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from bench.ingest import dataset_offset  # the same File Meta walk the ingest bench uses

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SUCCESS = 0x0000

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def dataset_sha256(data: bytes) -> str:
    """SHA-256 of the data set of a Part-10 file image (its File Meta left out)."""
    return hashlib.sha256(data[dataset_offset(data):]).hexdigest()


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    path: Path
    sha256: str  # of the data set bytes (what the sidecar must keep unchanged)


def ct_dataset(study: str, series: str, number: int, rng: np.random.Generator,
               rows: int = 64, cols: int = 64) -> Dataset:
    """One small, valid CT slice with file meta."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName = f"TORTURE-{study[-6:]}", "Torture^Test"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240131", "101010", "", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, number
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, float(number) * 2.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_series(root: Path, studies: int, per_series: int, seed: int,
                 rows: int = 64) -> list[Instance]:
    """``studies`` studies of one series each, ``per_series`` slices, written under ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out: list[Instance] = []
    for _ in range(studies):
        study, series = generate_uid(), generate_uid()
        for n in range(1, per_series + 1):
            data = part10(ct_dataset(study, series, n, rng, rows, rows))
            ds_uid = dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
            path = root / f"{ds_uid}.dcm"
            path.write_bytes(data)
            out.append(Instance(str(ds_uid), path, dataset_sha256(data)))
    return out


@dataclass
class SendLog:
    """What a sender saw: per SOP Instance UID the status it got (absent: no answer)."""

    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acknowledged(self) -> set[str]:
        with self.lock:
            return {uid for uid, st in self.statuses.items() if st == SUCCESS}


def send_files(port: int, instances: Sequence[Instance], log: SendLog, *,
               called: str = "SIDECAR", calling: str = "TORTURE",
               stop: threading.Event | None = None, timeout: float = 30.0) -> None:
    """Send the files over one association at a time (re-associating after an abort)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    todo = list(instances)
    while todo and not (stop is not None and stop.is_set()):
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title=called)
        except Exception as exc:  # noqa: BLE001 - the node may be down: try again
            with log.lock:
                log.errors.append(f"associate: {type(exc).__name__}: {exc}")
            if stop is not None and stop.wait(0.2):
                return
            continue
        if not assoc.is_established:
            if stop is not None and stop.wait(0.2):
                return
            continue
        try:
            while todo and not (stop is not None and stop.is_set()):
                inst = todo[0]
                status = assoc.send_c_store(inst.path)
                if "Status" not in status:
                    break  # aborted or timed out: no answer for this one; it is sent again
                with log.lock:
                    log.statuses[inst.sop_instance_uid] = int(status.Status)
                todo.pop(0)
        except Exception as exc:  # noqa: BLE001 - an abort mid-transfer
            with log.lock:
                log.errors.append(f"send: {type(exc).__name__}: {exc}")
        finally:
            if assoc.is_established:
                assoc.release()


def senders(port: int, groups: Iterable[Sequence[Instance]], log: SendLog,
            stop: threading.Event | None = None) -> list[threading.Thread]:
    """One started sender thread per group of instances."""
    threads = [threading.Thread(target=send_files, args=(port, g, log),
                                kwargs={"stop": stop}, daemon=True) for g in groups]
    for t in threads:
        t.start()
    return threads
