"""Labelled image sets in the MedMNIST ``.npz`` layout, and their images as DICOM.

:func:`load_labelled_npz` validates a set; :func:`image_dataset` makes one image a
Secondary Capture instance and :func:`prepare_datasets` prepares such instances
exactly as the embedding worker does. Used by training, adaptation and ``sidecar
evaluate`` (see docs/design/lab.md for the layout and the protocol).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEGLSNearLossless,
    generate_uid,
)

from sidecar.config import Config
from sidecar.embeddings import preprocess
from sidecar.errors import SidecarError

U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]
F32 = NDArray[np.float32]

SECONDARY_CAPTURE: Final = "1.2.840.10008.5.1.4.1.1.7"
"""SOP Class of the DICOM written for every image (Secondary Capture Image Storage)."""
JPEG_LS_NEAR: Final = 3
"""NEAR of the JPEG-LS near-lossless encoding :func:`image_dataset` can apply."""
UID_PREFIX: Final = "1.2.826.0.1.3680043.8.498."
_STUDY_DESCRIPTION: Final = "EVALUATION"


class EvaluationError(SidecarError):
    """The data set cannot be evaluated (bad file or layout) or the pipeline failed."""


@dataclass(frozen=True)
class LabelledSet:
    """A labelled image set in the MedMNIST layout.

    Attributes
    ----------
    path
        The ``.npz`` file.
    images
        Split name → ``uint8`` images ``(N, H, W)`` or ``(N, H, W, 3)``.
    labels
        Split name → ``int64`` labels ``(N,)``.
    """

    path: Path
    images: Mapping[str, U8]
    labels: Mapping[str, I64]

    @property
    def name(self) -> str:
        """The file name without ``.npz``."""
        return self.path.stem

    def split(self, name: str) -> tuple[U8, I64]:
        """Images and labels of one split.

        Raises
        ------
        EvaluationError
            The file has no such split.
        """
        if name not in self.images:
            raise EvaluationError(f"{self.path.name} has no {name!r} split "
                                  f"(it has {', '.join(sorted(self.images))})")
        return self.images[name], self.labels[name]


def load_labelled_npz(path: Path | str) -> LabelledSet:
    """Load and validate a labelled ``.npz`` in the MedMNIST layout.

    Required: ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels``; ``val_images`` and ``val_labels`` are optional but come
    together. Other arrays are ignored.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    LabelledSet
        Images as ``uint8`` ``(N, H, W)`` (a trailing channel axis of 1 dropped)
        or ``(N, H, W, 3)``, labels as ``int64`` ``(N,)``.

    Raises
    ------
    EvaluationError
        Unreadable or not ``.npz``; a missing array; images that are not
        ``uint8`` ``(N, H, W[, 1|3])`` or differ in size between splits;
        labels that are not integers ``(N,)``/``(N, 1)``, are negative or do
        not match the number of images; an empty ``train`` or ``test`` split.
    """
    p = Path(path)
    where = p.name
    try:
        npz = np.load(p, allow_pickle=False)
    except FileNotFoundError as exc:
        raise EvaluationError(f"{p}: no such file") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise EvaluationError(f"{p}: not a readable .npz file ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise EvaluationError(f"{p}: a single .npy array, not an .npz with named arrays")
    with npz:
        names = set(npz.files)
        splits = ["train", "test"]
        has_val = {"val_images", "val_labels"} & names
        if has_val:
            splits.insert(1, "val")
        missing = [f"{s}_{kind}" for s in splits for kind in ("images", "labels")
                   if f"{s}_{kind}" not in names]
        if missing:
            raise EvaluationError(
                f"{where}: missing {', '.join(missing)} (the MedMNIST layout has "
                "train_images, train_labels, val_images, val_labels, test_images, test_labels)"
            )
        images: dict[str, U8] = {}
        labels: dict[str, I64] = {}
        shape: tuple[int, ...] | None = None
        for s in splits:
            try:
                img = np.asarray(npz[f"{s}_images"])
                lab = np.asarray(npz[f"{s}_labels"])
            except (ValueError, OSError, zipfile.BadZipFile) as exc:
                raise EvaluationError(f"{where}: cannot read the {s} arrays ({exc})") from exc
            img = _check_images(img, f"{where}: {s}_images")
            if shape is None:
                shape = img.shape[1:]
            elif img.shape[1:] != shape:
                raise EvaluationError(
                    f"{where}: {s}_images are {img.shape[1:]}, train_images {shape}: "
                    "every split needs the same image size"
                )
            lab = _check_labels(lab, img.shape[0], f"{where}: {s}_labels")
            if s in ("train", "test") and img.shape[0] == 0:
                raise EvaluationError(f"{where}: the {s} split is empty")
            images[s], labels[s] = img, lab
    return LabelledSet(path=p, images=images, labels=labels)


def _check_images(arr: NDArray[Any], what: str) -> U8:
    if arr.dtype != np.uint8:
        raise EvaluationError(f"{what}: dtype {arr.dtype}, expected uint8 grey levels")
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[3] == 3)):
        raise EvaluationError(f"{what}: shape {arr.shape}, expected (N, H, W) grey images "
                              "(or (N, H, W, 3) colour)")
    if min(arr.shape[1:3]) < 1:
        raise EvaluationError(f"{what}: empty images {arr.shape[1:]}")
    out: U8 = np.ascontiguousarray(arr)
    return out


def _check_labels(arr: NDArray[Any], n: int, what: str) -> I64:
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise EvaluationError(
            f"{what}: shape {arr.shape}, expected (N,) or (N, 1) class labels "
            "(multi-label sets are not supported)"
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise EvaluationError(f"{what}: dtype {arr.dtype}, expected integer class labels")
    if arr.shape[0] != n:
        raise EvaluationError(f"{what}: {arr.shape[0]} labels for {n} images")
    if arr.size and int(arr.min()) < 0:
        raise EvaluationError(f"{what}: negative label {int(arr.min())}")
    out: I64 = arr.astype(np.int64)
    return out


def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts]))


def image_dataset(
    image: U8,
    *,
    key: str,
    patient_id: str,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """One image as a Secondary Capture Image Storage dataset with file meta.

    MONOCHROME2 8-bit grey (RGB for ``(H, W, 3)``), no pixel spacing (the
    pre-processing fits the whole image), one study, series and instance whose
    UIDs derive from ``key`` (repeatable). ``transfer_syntax`` JPEG-LS
    near-lossless compresses the pixels with NEAR = :data:`JPEG_LS_NEAR`.
    """
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = _uid(key, "instance")
    ds.StudyInstanceUID = _uid(key, "study")
    ds.SeriesInstanceUID = _uid(key, "series")
    ds.PatientID = patient_id
    ds.PatientName = ""
    ds.StudyDescription = _STUDY_DESCRIPTION
    ds.StudyDate = "20000101"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    if arr.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    if transfer_syntax == JPEGLSNearLossless:
        ds.compress(JPEGLSNearLossless, jls_error=JPEG_LS_NEAR)
    elif transfer_syntax != ExplicitVRLittleEndian:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    return ds


def round_trip(ds: Dataset) -> Dataset:
    """``ds`` written as a Part-10 byte stream and read back, as the worker reads files."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))


def prepare_datasets(
    datasets: Sequence[Dataset], config: Config, size: int, channels: int = 1
) -> F32:
    """Model input for one-frame datasets, exactly as the embedding worker prepares them.

    Each dataset is written and read back (:func:`round_trip`), then
    ``preprocess.prepare(ds, config.preprocess, size, frames=[0], channels=channels)``:
    ``(N, S, S)``, or ``(N, 3, S, S)`` for three channels.
    """
    shape = (len(datasets), size, size) if channels == 1 else (len(datasets), 3, size, size)
    out = np.empty(shape, dtype=np.float32)
    for i, ds in enumerate(datasets):
        out[i] = preprocess.prepare(round_trip(ds), config.preprocess, size, frames=[0],
                                    channels=channels)[0]
    return out
