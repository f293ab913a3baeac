"""Slice pre-processing for the embedding CNN: which slices to embed and their model input.

``frame_infos(ds, key)`` gives the sampling facts of every frame of one instance
(header only); ``sample(infos, cfg)`` chooses the slices of a series by physical
distance along the slice normal; ``prepare(ds, cfg, size, frames)`` is the whole
chain for the chosen frames: :func:`~sidecar.embeddings.decode.read_image` →
:func:`~sidecar.embeddings.pixels.window` → :func:`~sidecar.embeddings.pixels.fit`,
``(n, size, size)`` float32 in [0, 1]. Everything is deterministic and free of
I/O. The rules are in docs/design/embeddings.md.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from sidecar.config import PreprocessConfig
from sidecar.embeddings.decode import frame_positions, instance_number, number_of_frames, read_image
from sidecar.embeddings.pixels import fit, window, window_rgb, window_rule, window_rule_rgb

__all__ = ["FrameInfo", "frame_infos", "prepare", "prepare_named", "sample"]

K = TypeVar("K", bound=Hashable)
F32 = NDArray[np.float32]


@dataclass(frozen=True)
class FrameInfo(Generic[K]):
    """What slice sampling needs to know about one slice (a frame of an instance).

    Attributes
    ----------
    key
        Identifies the slice for the caller, e.g. ``(sop_instance_uid, frame)``.
    position_mm
        Position along the slice normal in mm, or ``None`` when unknown.
    order
        Fallback order when positions are missing, e.g. ``(InstanceNumber, frame)``.
    """

    key: K
    position_mm: float | None
    order: tuple[int, ...] = ()


def frame_infos(ds: Dataset, key: K) -> list[FrameInfo[tuple[K, int]]]:
    """Sampling facts of every frame of one instance, from its header alone.

    Parameters
    ----------
    ds
        The instance (pixel data not needed: ``stop_before_pixels`` is fine).
    key
        Identifies the instance for the caller (e.g. its SOP Instance UID).

    Returns
    -------
    list of FrameInfo
        One per frame, keyed ``(key, frame)``, ``order = (InstanceNumber, frame)``.

    Raises
    ------
    PreprocessError
        Number of Frames is not a positive integer.
    """
    n_frames = number_of_frames(ds)
    number = instance_number(ds)
    return [
        FrameInfo(key=(key, f), position_mm=pos, order=(number, f))
        for f, pos in enumerate(frame_positions(ds, n_frames))
    ]


# --------------------------------------------------------------------------- sampling


def _pick(positions: Sequence[float], m: int) -> list[int]:
    """Indices of the slices nearest to ``m`` evenly spread targets, each taken once.

    ``positions`` is sorted. Targets run from the first to the last position
    (one target in the middle when ``m == 1``); ties go to the lower position.
    """
    n = len(positions)
    first, last = positions[0], positions[-1]
    if m == 1:
        targets = [(first + last) / 2.0]
    else:
        targets = [first + (last - first) * j / (m - 1) for j in range(m)]
    chosen: list[int] = []
    for target in targets:
        i = bisect.bisect_left(positions, target)
        if i == n or (i > 0 and target - positions[i - 1] <= positions[i] - target):
            i -= 1
        if not chosen or i != chosen[-1]:
            chosen.append(i)
    return chosen


def sample(infos: Sequence[FrameInfo[K]], cfg: PreprocessConfig) -> list[K]:
    """Choose which slices of a series to embed.

    Parameters
    ----------
    infos
        Every slice of the series (frames of all its instances), in any order.
        Slices that tie on position and order keep their input order.
    cfg
        Uses ``slice_spacing_mm`` and ``max_slices_per_series``.

    Returns
    -------
    list
        Keys of the chosen slices, by increasing position (or order), at most
        ``max_slices_per_series`` of them. The rule is in
        docs/design/embeddings.md; the result is deterministic.
    """
    n = len(infos)
    if n == 0:
        return []
    cap = min(n, cfg.max_slices_per_series)
    known = [
        (float(info.position_mm), info.order, i)
        for i, info in enumerate(infos)
        if info.position_mm is not None and math.isfinite(info.position_mm)
    ]
    if len(known) == n:
        known.sort()
        idx = [i for _, _, i in known]
        pos = [p for p, _, _ in known]
        if cfg.slice_spacing_mm <= 0:
            if n <= cap:
                return [infos[i].key for i in idx]
            m = cap
        else:
            m = min(cap, math.floor((pos[-1] - pos[0]) / cfg.slice_spacing_mm + 1e-6) + 1)
    else:
        # No usable geometry: order by (InstanceNumber, frame), spread evenly by index.
        idx = sorted(range(n), key=lambda i: (infos[i].order, i))
        pos = [float(i) for i in range(n)]
        m = cap
    return [infos[idx[i]].key for i in _pick(pos, m)]


# --------------------------------------------------------------------------- all together


def prepare(
    ds: Dataset,
    cfg: PreprocessConfig,
    size: int,
    frames: Sequence[int] | None = None,
    channels: int = 1,
) -> F32:
    """Model input for frames of one instance: decode, window, fit.

    Parameters
    ----------
    ds
        A dataset with file meta and pixel data.
    cfg
        The preprocessing settings.
    size
        Side of the square model input (``embedding.input_size``).
    frames
        0-based frame numbers (e.g. those :func:`sample` chose), or ``None``
        for every frame.
    channels
        The model's input channels (``Embedder.channels``): 1, colour turned
        into luminance; 3, colour kept as RGB (:func:`window_rgb`, each
        channel fitted alike) and grey replicated.

    Returns
    -------
    numpy.ndarray
        ``(n, size, size)`` (one channel) or ``(n, 3, size, size)`` float32 in
        [0, 1], one slice per requested frame.

    Raises
    ------
    PreprocessError
        As :func:`read_image`.
    MissingCodecError
        As :func:`read_image`.
    ValueError
        ``size`` is not positive or ``channels`` is neither 1 nor 3.
    """
    return prepare_named(ds, cfg, size, frames, channels)[0]


def prepare_named(
    ds: Dataset,
    cfg: PreprocessConfig,
    size: int,
    frames: Sequence[int] | None = None,
    channels: int = 1,
) -> tuple[F32, list[str]]:
    """:func:`prepare`, and the window rule applied to each frame (``pixels.window_rule``).

    Raises
    ------
    PreprocessError, MissingCodecError, ValueError
        As :func:`prepare`.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = read_image(ds, frames, colour=channels == 3)
    n = len(image.indices)
    out = np.empty((n, size, size) if channels == 1 else (n, 3, size, size), dtype=np.float32)
    rules: list[str] = []
    for i in range(n):
        if image.rgb is not None:
            rgb01 = window_rgb(image.rgb[i], cfg)
            for c in range(3):
                out[i, c] = fit(rgb01[..., c], image.spacing, cfg, size)
            rules.append(window_rule_rgb(cfg))
            continue
        pad = None if image.padding is None else image.padding[i]
        out[i] = fit(window(image.frames[i], image.meta[i], cfg, pad), image.spacing, cfg, size)
        rules.append(window_rule(image.meta[i], cfg))
    return out, rules
