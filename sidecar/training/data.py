"""Training data for ``sidecar train``: ``.npz`` train splits and DICOM series as model input.

:func:`load_training_data` reads ``.npz`` files (MedMNIST layout, ``train_images``
only) and DICOM files or folders (every image series, slices in order) through
the worker's pre-processing, and records a manifest of every input with its
SHA-256 (:class:`TrainingData`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from pydicom import dcmread

from sidecar.embeddings import preprocess
from sidecar.files import sha256_file, walk_files
from sidecar.training.npz import image_dataset, prepare_datasets

F32 = npt.NDArray[np.float32]


@dataclass
class TrainingData:
    """Training images with their groups and where they came from.

    Attributes
    ----------
    images
        ``(N, 1, S, S)`` float32 in [0, 1], as ``preprocess.prepare`` outputs them.
    groups
        ``(N,)`` int64: one value per DICOM series (slices in order), ``-1``
        for images without a series (the 2-D images of an ``.npz``).
    studies
        ``(N,)`` int64: one value per DICOM study, ``-1`` for images without
        one (for ``TrainRecipe.study_prob``).
    manifest
        ``{"inputs": [...], "images": N, "groups": ...}``: each input with
        its kind, path, SHA-256 and what was read from it.
    sources
        ``(N,)`` int64: the input each image came from (each ``.npz`` is one
        source, all DICOM together another), for ``TrainRecipe.source_balance``.
    """

    images: F32
    groups: npt.NDArray[np.int64]
    manifest: dict[str, Any]
    sources: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    studies: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))


def npz_train_images(path: Path) -> npt.NDArray[np.uint8]:
    """The ``train_images`` array of an ``.npz`` (MedMNIST layout); no other array is read.

    Raises
    ------
    ValueError
        No ``train_images`` array, or not ``uint8`` ``(N, H, W[, 1|3])``.
    """
    with np.load(path, allow_pickle=False) as npz:
        if "train_images" not in npz.files:
            raise ValueError(f"{path}: no train_images array (MedMNIST layout expected)")
        arr = np.asarray(npz["train_images"])
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[3] == 3)):
        raise ValueError(f"{path}: train_images {arr.dtype} {arr.shape}, expected uint8 "
                         "(N, H, W) grey or (N, H, W, 3) colour")
    return np.ascontiguousarray(arr)


def prepare_npz(path: Path, cfg: Any, size: int) -> tuple[F32, dict[str, Any]]:
    """The train split of an ``.npz`` as model input, through the worker's DICOM path.

    Every image becomes a Secondary Capture instance (no pixel spacing), is
    written and read back and goes through ``preprocess.prepare`` with
    ``cfg`` (a :class:`~sidecar.config.Config`), as ``sidecar evaluate``'s path
    (a) does. Only ``train_images`` is read: never labels, val or test.
    """
    raw = npz_train_images(path)
    datasets = [image_dataset(im, key=f"{path.stem}/train/{i}", patient_id=f"TRAIN{i:06d}")
                for i, im in enumerate(raw)]
    images = prepare_datasets(datasets, cfg, size)[:, None]
    entry = {"kind": "npz", "path": str(path), "name": path.name, "sha256": sha256_file(path),
             "arrays_read": ["train_images"], "images": int(raw.shape[0]),
             "image_shape": list(raw.shape[1:])}
    return images, entry


class DicomSlices(NamedTuple):
    """What :func:`prepare_dicom` read."""

    images: F32
    """``(N, 1, S, S)`` prepared slices."""
    groups: npt.NDArray[np.int64]
    """``(N,)`` series of each slice (0, 1, ... per series)."""
    studies: npt.NDArray[np.int64]
    """``(N,)`` study of each slice (0, 1, ... per StudyInstanceUID)."""
    entries: list[dict[str, Any]]
    """One manifest entry per file used (path, SHA-256, series, study)."""


def prepare_dicom(paths: Sequence[Path], cfg: Any, size: int) -> DicomSlices:
    """Every slice of every image series under ``paths``, in slice order per series.

    Files that are not DICOM images (no pixel data, unreadable) are skipped.
    Slices are ordered along the slice normal as the worker orders them
    (``preprocess.frame_infos`` and ``preprocess.sample`` with no thinning);
    each series gets its own group number, each study (StudyInstanceUID) its
    own study number.
    """
    series: dict[str, list[tuple[Path, Any]]] = {}
    for f in walk_files(paths):
        try:
            header = dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: skipped
            continue
        if "PixelData" not in header and "FloatPixelData" not in header \
                and "DoubleFloatPixelData" not in header:
            # stop_before_pixels leaves pixel data out; check by reading the tag list
            try:
                full = dcmread(f, specific_tags=["PixelData"])
            except Exception:  # noqa: BLE001
                continue
            if "PixelData" not in full:
                continue
        uid = str(header.get("SeriesInstanceUID", f.parent))
        series.setdefault(uid, []).append((f, header))
    study_of = {uid: str(members[0][1].get("StudyInstanceUID", "") or f"series:{uid}")
                for uid, members in series.items()}
    study_numbers = {st: k for k, st in enumerate(sorted(set(study_of.values())))}
    every = cfg.preprocess.model_copy(update={"slice_spacing_mm": 0.0,
                                              "max_slices_per_series": 1 << 30})
    images: list[F32] = []
    groups: list[int] = []
    studies: list[int] = []
    entries: list[dict[str, Any]] = []
    for g, uid in enumerate(sorted(series)):
        members = series[uid]
        study = study_numbers[study_of[uid]]
        infos = []
        for k, (_, header) in enumerate(members):
            try:
                infos.extend(preprocess.frame_infos(header, k))
            except Exception:  # noqa: BLE001 - a broken header: skipped
                continue
        order = preprocess.sample(infos, every)
        by_file: dict[int, Any] = {}
        used: set[int] = set()
        for k, frame in order:
            if k not in by_file:
                try:
                    by_file[k] = dcmread(members[k][0])
                except Exception:  # noqa: BLE001
                    by_file[k] = None
            ds = by_file[k]
            if ds is None:
                continue
            try:
                arr = preprocess.prepare(ds, cfg.preprocess, size, frames=[frame])
            except Exception:  # noqa: BLE001 - undecodable: skipped
                continue
            images.append(arr[0])
            groups.append(g)
            studies.append(study)
            used.add(k)
        for k in sorted(used):
            path = members[k][0]
            entries.append({"kind": "dicom", "path": str(path), "sha256": sha256_file(path),
                            "series": g, "study": study})
    if not images:
        empty = np.zeros(0, np.int64)
        return DicomSlices(np.zeros((0, 1, size, size), np.float32), empty, empty, entries)
    return DicomSlices(np.stack(images)[:, None].astype(np.float32),
                       np.asarray(groups, np.int64), np.asarray(studies, np.int64), entries)


def load_training_data(paths: Sequence[Path | str], cfg: Any, size: int) -> TrainingData:
    """Training images from ``.npz`` files (train split only) and DICOM files or folders.

    Parameters
    ----------
    paths
        ``.npz`` files in the MedMNIST layout (only ``train_images`` is read)
        and DICOM files or folders (every image series found).
    cfg
        The :class:`~sidecar.config.Config` whose pre-processing the worker uses.
    size
        Model input side (``embedding.input_size``).

    Raises
    ------
    ValueError
        A path does not exist, an ``.npz`` lacks ``train_images``, or no
        image was found.
    """
    parts: list[F32] = []
    groups: list[npt.NDArray[np.int64]] = []
    studies: list[npt.NDArray[np.int64]] = []
    inputs: list[dict[str, Any]] = []
    sources: list[npt.NDArray[np.int64]] = []
    dicom: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        if p.is_file() and p.suffix.lower() == ".npz":
            images, entry = prepare_npz(p, cfg, size)
            parts.append(images)
            groups.append(np.full(images.shape[0], -1, np.int64))
            studies.append(np.full(images.shape[0], -1, np.int64))
            sources.append(np.full(images.shape[0], len(sources), np.int64))
            inputs.append(entry)
        else:
            dicom.append(p)
    if dicom:
        read = prepare_dicom(dicom, cfg, size)
        parts.append(read.images)
        groups.append(read.groups)
        studies.append(read.studies)
        sources.append(np.full(read.images.shape[0], len(sources), np.int64))
        inputs.append({"kind": "dicom-folders", "paths": [str(p) for p in dicom],
                       "files": len(read.entries), "series": int(len(np.unique(read.groups))),
                       "studies": int(len(np.unique(read.studies))),
                       "slices": int(read.images.shape[0])})
        inputs.extend(read.entries)
    if not parts or sum(p.shape[0] for p in parts) == 0:
        raise ValueError("no training images found")
    all_images = np.concatenate(parts)
    all_groups = np.concatenate(groups)
    manifest = {
        "inputs": inputs,
        "images": int(all_images.shape[0]),
        "grouped_images": int((all_groups >= 0).sum()),
        "input_size": size,
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "images_sha256": hashlib.sha256(all_images.tobytes()).hexdigest(),
        "labels_used": False,
        "splits_read": ["train"],
    }
    return TrainingData(images=all_images, groups=all_groups, manifest=manifest,
                        sources=np.concatenate(sources), studies=np.concatenate(studies))
