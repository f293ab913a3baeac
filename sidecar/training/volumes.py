"""Training data for the model-v2 distillation: 2-D sets, DICOM series and slices of 3-D volumes.

:func:`load_distil_data` is :func:`~sidecar.training.data.load_training_data` plus
``.npz`` files whose ``train_images`` are 3-D volumes ``(N, D, H, W)`` (the
MedMNIST3D layout): a few evenly spaced axial slices of each train volume become
Secondary Capture images and go through the worker's pre-processing like the
2-D sets (labels, val and test are never read).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sidecar.files import sha256_file
from sidecar.training.data import TrainingData, load_training_data
from sidecar.training.npz import image_dataset, prepare_datasets

F32 = npt.NDArray[np.float32]


def volume_train_images(path: Path) -> npt.NDArray[np.uint8] | None:
    """``train_images`` of an ``.npz`` if they are grey volumes ``(N, D, H, W)``, else ``None``."""
    with np.load(path, allow_pickle=False) as npz:
        if "train_images" not in npz.files:
            return None
        arr = npz["train_images"]
        if arr.ndim == 5 and arr.shape[4] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] == 3:
            return None
        return np.ascontiguousarray(arr)


def slice_positions(depth: int, count: int) -> list[int]:
    """``count`` evenly spaced inner slice indices of a volume of ``depth`` slices."""
    return sorted({min(depth - 1, round((i + 1) * depth / (count + 1))) for i in range(count)})


def prepare_volumes(path: Path, volumes: npt.NDArray[np.uint8], cfg: Any, size: int,
                    count: int) -> tuple[F32, dict[str, Any]]:
    """Slices of every train volume as model input, through the worker's DICOM path."""
    positions = slice_positions(volumes.shape[1], count)
    datasets = [image_dataset(volumes[i, z], key=f"{path.stem}/train/{i}/{z}",
                              patient_id=f"TRAIN{i:06d}")
                for i in range(volumes.shape[0]) for z in positions]
    images = prepare_datasets(datasets, cfg, size)[:, None]
    entry = {"kind": "npz-volumes", "path": str(path), "name": path.name,
             "sha256": sha256_file(path), "arrays_read": ["train_images"],
             "volumes": int(volumes.shape[0]), "volume_shape": list(volumes.shape[1:]),
             "slices_per_volume": positions, "images": int(images.shape[0])}
    return images, entry


def load_distil_data(paths: Sequence[Path | str], cfg: Any, size: int,
                     volume_slices: int) -> TrainingData:
    """Training images from 2-D ``.npz`` sets, 3-D ``.npz`` sets and DICOM files or folders.

    Raises
    ------
    ValueError
        A path does not exist, or no image was found.
    """
    flat: list[Path] = []
    extra: list[tuple[F32, dict[str, Any]]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        vols = volume_train_images(p) if p.is_file() and p.suffix.lower() == ".npz" else None
        if vols is None:
            flat.append(p)
        else:
            extra.append(prepare_volumes(p, vols, cfg, size, volume_slices))
    if flat:
        base = load_training_data(flat, cfg, size)
    else:
        empty = np.zeros(0, np.int64)
        base = TrainingData(images=np.zeros((0, 1, size, size), np.float32), groups=empty,
                            manifest={"inputs": [], "input_size": size,
                                      "preprocess": cfg.preprocess.model_dump(mode="json"),
                                      "labels_used": False, "splits_read": ["train"]},
                            sources=empty, studies=empty)
    images = np.concatenate([base.images, *(e[0] for e in extra)])
    if images.shape[0] == 0:
        raise ValueError("no training images found")
    added = sum(e[0].shape[0] for e in extra)
    first = int(base.sources.max()) + 1 if base.sources.size else 0
    sources = np.concatenate([base.sources, *(np.full(e[0].shape[0], first + j, np.int64)
                                              for j, e in enumerate(extra))])
    manifest = dict(base.manifest)
    manifest["inputs"] = list(base.manifest["inputs"]) + [e[1] for e in extra]
    manifest["images"] = int(images.shape[0])
    manifest["grouped_images"] = int((base.groups >= 0).sum())
    manifest["images_sha256"] = hashlib.sha256(images.tobytes()).hexdigest()
    return TrainingData(
        images=images,
        groups=np.concatenate([base.groups, np.full(added, -1, np.int64)]),
        studies=np.concatenate([base.studies, np.full(added, -1, np.int64)]),
        manifest=manifest, sources=sources,
    )
