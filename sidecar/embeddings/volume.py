"""A series as a volume: geometry checks, resampling with SimpleITK, planes for the CNN.

:func:`plan_volume` checks the slices' geometry (one orientation, one size, distinct
positions on a line, no gap, tilt within limits) and raises :class:`VolumeRefused`
with the reason otherwise; it also says which slices the resampling needs.
:func:`build_volume` stacks those slices (already windowed to [0, 1]) at uniform
steps along the stacking direction and resamples them with SimpleITK onto an
isotropic grid in the patient's axes (LPS), so a sagittal MR and an axial CT give
the same anatomical planes. :func:`volume_planes` takes the axial, coronal and
sagittal planes at 25, 50 and 75 % of the content's extent; the embedder turns them
into one series vector (:func:`series_vector`). The measurements behind the choice
are in docs/design/volumes.md. Everything here is free of I/O.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as _sitk
from numpy.typing import NDArray

from sidecar.config import PreprocessConfig, VolumeConfig
from sidecar.embeddings.decode import PreprocessError
from sidecar.embeddings.pixels import fit

sitk: Any = _sitk  # untyped
F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

#: Identifies how series vectors are made; stored with every volume vector.
METHOD = "triplanar-3x3-v1"
#: Planes per axis, at these fractions of the content's extent.
PLANE_FRACTIONS = (0.25, 0.5, 0.75)
#: A windowed voxel above this counts as content (body, organ), not background.
CONTENT_THRESHOLD = 0.1
_IOP_TOLERANCE = 1e-3
_SPACING_TOLERANCE = 1e-3


class VolumeRefused(PreprocessError):
    """The series cannot be built as one volume; the message says why."""


@dataclass(frozen=True)
class SliceGeometry:
    """Where one slice (a frame of an instance) lies."""

    key: Hashable
    position: tuple[float, ...]  # ImagePositionPatient, mm
    orientation: tuple[float, ...]  # ImageOrientationPatient (row, column cosines)
    rows: int
    columns: int
    spacing: tuple[float, float] | None  # (row, column) mm


@dataclass(frozen=True)
class VolumePlan:
    """How to build the volume of a series.

    Attributes
    ----------
    keys
        Every slice, ordered along the stacking direction.
    offsets_mm
        Each slice's distance from the first along the stacking direction.
    targets_mm
        Uniform positions along the stacking direction the stack is interpolated to.
    needed
        Keys of the slices the interpolation reads (a subset of ``keys``).
    spacing_mm
        The isotropic output spacing.
    """

    keys: tuple[Hashable, ...]
    offsets_mm: F64
    targets_mm: F64
    needed: tuple[Hashable, ...]
    spacing_mm: float
    origin: F64
    row_dir: F64
    col_dir: F64
    stack_dir: F64
    pixel_spacing: tuple[float, float]
    notes: tuple[str, ...] = field(default=())
    nearest: bool = False  # nearest slice per step instead of linear interpolation


def plan_volume(geoms: Sequence[SliceGeometry | None], cfg: VolumeConfig) -> VolumePlan:
    """Check a series' slices and plan its volume.

    Raises
    ------
    VolumeRefused
        Too few slices, a slice without geometry, slices that disagree on
        orientation, size or pixel spacing, duplicated positions, positions off
        one line, a gap, or a tilt beyond ``cfg.max_tilt_degrees``.
    """
    n = len(geoms)
    if n < cfg.min_slices:
        raise VolumeRefused(f"{n} slices, fewer than volumes.min_slices {cfg.min_slices}")
    known = [g for g in geoms if g is not None]
    if len(known) < n:
        raise VolumeRefused(f"{n - len(known)} of {n} slices have no position or orientation")
    first = known[0]
    iop = np.asarray(first.orientation, dtype=np.float64)
    if any(np.max(np.abs(np.asarray(g.orientation) - iop)) > _IOP_TOLERANCE for g in known):
        raise VolumeRefused("slices disagree on orientation (ImageOrientationPatient)")
    if any((g.rows, g.columns) != (first.rows, first.columns) for g in known):
        raise VolumeRefused("slices disagree on size (Rows, Columns)")
    spacing = first.spacing or (1.0, 1.0)
    if any(g.spacing is not None and first.spacing is not None
           and max(abs(a - b) for a, b in zip(g.spacing, first.spacing, strict=True))
           > _SPACING_TOLERANCE * max(first.spacing)
           for g in known) or any((g.spacing is None) != (first.spacing is None) for g in known):
        raise VolumeRefused("slices disagree on pixel spacing")
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    pos = np.asarray([g.position for g in known], dtype=np.float64)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    pos, along = pos[order], along[order]
    steps = np.diff(along)
    dupes = int(np.sum(steps < 0.01))
    if dupes:
        raise VolumeRefused(f"{dupes + 1} slices share a position: more than one volume in "
                            "the series (echoes, phases or repeats)?")
    span = pos[-1] - pos[0]
    stack_dir = span / np.linalg.norm(span)
    tilt = math.degrees(math.acos(min(1.0, abs(float(stack_dir @ normal)))))
    if tilt > cfg.max_tilt_degrees:
        raise VolumeRefused(f"slices are stacked at {tilt:.1f} degrees to their normal "
                            f"(volumes.max_tilt_degrees {cfg.max_tilt_degrees:g})")
    offsets = (pos - pos[0]) @ stack_dir
    off_line = np.linalg.norm((pos - pos[0]) - np.outer(offsets, stack_dir), axis=1)
    if float(off_line.max()) > max(1.0, 0.5 * max(spacing)):
        raise VolumeRefused(f"slice positions are not on one line (one is "
                            f"{float(off_line.max()):.1f} mm off it)")
    gaps = np.diff(offsets)
    median = float(np.median(gaps))
    if float(gaps.max()) > cfg.max_gap_ratio * median:
        at = int(np.argmax(gaps))
        raise VolumeRefused(f"a gap of {float(gaps[at]):.1f} mm after slice {at + 1} of {n} "
                            f"(median spacing {median:.2f} mm): missing slices?")
    extent = (first.rows * spacing[0], first.columns * spacing[1],
              float(offsets[-1]) * abs(float(stack_dir @ normal)) + median)
    out_spacing = max(max(extent) / cfg.grid_voxels, min(spacing[0], spacing[1], median))
    # interpolate along the stack at the output spacing measured along the normal
    step = out_spacing / max(abs(float(stack_dir @ normal)), 1e-6)
    count = max(1, int(math.floor(float(offsets[-1]) / step + 1e-9)) + 1)
    targets = np.arange(count, dtype=np.float64) * step
    idx = np.clip(np.searchsorted(offsets, targets, side="right") - 1, 0, n - 1)
    nxt = np.clip(idx + 1, 0, n - 1)
    # Slices much thinner than the output step: the nearest slice per step (half the reads).
    nearest = median <= step / 2.0
    if nearest:
        closer = np.abs(offsets[nxt] - targets) < np.abs(targets - offsets[idx])
        idx = np.where(closer, nxt, idx)
        needed = sorted(set(idx.tolist()))
    else:
        needed = sorted(set(idx.tolist()) | set(nxt.tolist()))
    keys = tuple(known[i].key for i in order)
    notes = []
    if tilt > 0.5:
        notes.append(f"gantry tilt {tilt:.1f} degrees resampled")
    if float(gaps.max() - gaps.min()) > 0.01 * median + 1e-6:
        notes.append(f"variable slice spacing {float(gaps.min()):.2f}-{float(gaps.max()):.2f} mm")
    return VolumePlan(
        keys=keys, offsets_mm=offsets, targets_mm=targets,
        needed=tuple(keys[i] for i in needed), spacing_mm=float(out_spacing),
        origin=pos[0], row_dir=row_dir, col_dir=col_dir, stack_dir=stack_dir,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        notes=tuple(notes),
        nearest=nearest,
    )


def _block_mean(arr: F32, k: int) -> F32:
    h, w = arr.shape[0] // k, arr.shape[1] // k
    out: F32 = arr[: h * k, : w * k].reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)
    return out


@dataclass(frozen=True)
class Volume:
    """Voxels ``(z, y, x)`` float32 in [0, 1] on an isotropic grid in LPS axes."""

    voxels: F32
    origin: tuple[float, float, float]  # centre of voxel (0, 0, 0), mm (x, y, z)
    spacing_mm: float


def build_volume(plan: VolumePlan, slices: dict[Hashable, F32]) -> Volume:
    """The series' volume on an isotropic grid in patient axes (LPS).

    ``slices`` maps each key of ``plan.needed`` to its windowed ``(rows, columns)``
    pixels. Slices are first block-averaged in plane to about the output spacing,
    interpolated linearly to uniform steps along the stack, then resampled
    (linear) by SimpleITK onto the output grid: LPS axes, isotropic
    ``plan.spacing_mm``, covering the whole input.
    """
    missing = [k for k in plan.needed if k not in slices]
    if missing:
        raise ValueError(f"{len(missing)} needed slices were not given")
    dr, dc = plan.pixel_spacing
    k = max(1, int(plan.spacing_mm / max(dr, dc) + 1e-6))
    reduced = {key: _block_mean(np.asarray(slices[key], dtype=np.float32), k)
               for key in plan.needed}
    offsets = plan.offsets_mm
    n = len(plan.keys)
    h, w = next(iter(reduced.values())).shape
    stack = np.empty((plan.targets_mm.size, h, w), dtype=np.float32)
    for j, t in enumerate(plan.targets_mm):
        i0 = int(np.clip(np.searchsorted(offsets, t, side="right") - 1, 0, n - 1))
        i1 = min(i0 + 1, n - 1)
        if plan.nearest:
            near = i1 if abs(offsets[i1] - t) < abs(t - offsets[i0]) else i0
            stack[j] = reduced[plan.keys[near]]
            continue
        a = reduced[plan.keys[i0]]
        if i1 == i0 or offsets[i1] <= offsets[i0]:
            stack[j] = a
            continue
        f = float(np.clip((t - offsets[i0]) / (offsets[i1] - offsets[i0]), 0.0, 1.0))
        stack[j] = a if f == 0.0 else (1.0 - f) * a + f * reduced[plan.keys[i1]]
    step = float(plan.targets_mm[1] - plan.targets_mm[0]) if plan.targets_mm.size > 1 else 1.0
    image = sitk.GetImageFromArray(stack)
    image.SetSpacing((dc * k, dr * k, step))
    # pixel (0, 0) of a k x k block sits at the block's centre
    origin = plan.origin + ((k - 1) / 2.0) * (dc * plan.row_dir + dr * plan.col_dir)
    image.SetOrigin(tuple(float(v) for v in origin))
    direction = np.column_stack([plan.row_dir, plan.col_dir, plan.stack_dir])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    # the output box: the input's corners in patient axes
    size_in = np.asarray(image.GetSize()) - 1
    corners = np.asarray([image.TransformContinuousIndexToPhysicalPoint(
        (float(a * size_in[0]), float(b * size_in[1]), float(c * size_in[2])))
        for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    s = plan.spacing_mm
    out_size = [max(1, int(math.floor((hi[i] - lo[i]) / s + 1e-6)) + 1) for i in range(3)]
    resampler = sitk.ResampleImageFilter()
    resampler.SetNumberOfThreads(1)
    resampler.SetSize(out_size)
    resampler.SetOutputSpacing((s, s, s))
    resampler.SetOutputOrigin(tuple(float(v) for v in lo))
    resampler.SetOutputDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    out = np.asarray(sitk.GetArrayFromImage(resampler.Execute(image)), dtype=np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return Volume(out, (float(lo[0]), float(lo[1]), float(lo[2])), s)


def volume_planes(volume: F32) -> list[F32]:
    """Axial, coronal and sagittal planes at :data:`PLANE_FRACTIONS` of the content's extent.

    ``volume`` is ``(z, y, x)`` in LPS axes. Content is the voxels above
    :data:`CONTENT_THRESHOLD` (the whole volume when there are none). Coronal and
    sagittal planes are shown head up (z reversed), as a viewer shows them.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"expected a non-empty 3-D volume, got shape {vol.shape}")
    content = np.argwhere(vol > CONTENT_THRESHOLD)
    if content.size:
        lo, hi = content.min(axis=0), content.max(axis=0)
    else:
        lo, hi = np.zeros(3, dtype=np.int64), np.asarray(vol.shape) - 1
    planes: list[F32] = []
    for axis in range(3):
        for frac in PLANE_FRACTIONS:
            i = int(round(float(lo[axis] + (hi[axis] - lo[axis]) * frac)))
            plane = np.take(vol, i, axis=axis)
            planes.append(np.ascontiguousarray(plane if axis == 0 else plane[::-1]))
    return planes


def plane_inputs(volume: F32, cfg: PreprocessConfig, size: int) -> F32:
    """The planes of :func:`volume_planes` as ``(9, size, size)`` model input.

    Each plane fills the input (:func:`~sidecar.embeddings.pixels.fit` without a
    spacing): the volume's grid already has a fixed number of voxels across the
    series, and a physical-size crop would keep only the middle of a body.
    """
    return np.stack([fit(p, None, cfg, size) for p in volume_planes(volume)])


def series_vector(plane_vectors: F32) -> F32:
    """One unit series vector from the unit vectors of its planes (concatenated, in order)."""
    vecs = np.asarray(plane_vectors, dtype=np.float32)
    if vecs.ndim != 2 or vecs.shape[0] != 3 * len(PLANE_FRACTIONS):
        raise ValueError(f"expected {3 * len(PLANE_FRACTIONS)} plane vectors, got {vecs.shape}")
    flat = vecs.reshape(-1)
    norm = float(np.linalg.norm(flat))
    out: F32 = flat / norm if norm > 0 else flat
    return out
