"""Pixel normalisation for the embedding CNN: windowing and the fit onto the model input.

Pure array functions: ``window`` maps one frame of modality values to [0, 1]
(VOI window, named preset or percentiles; MONOCHROME1 inverted), ``fit``
resamples it with SimpleITK onto the square model input (physical mode at
``pixel_spacing_mm``, or fit mode). The rules and their measured costs are in
docs/design/embeddings.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as _sitk
from numpy.typing import NDArray

from sidecar.config import PreprocessConfig
from sidecar.embeddings.decode import FrameMeta

__all__ = ["fit", "window", "window_rgb", "window_rule", "window_rule_rgb"]

# SimpleITK ships py.typed but its SWIG functions are unannotated: use it as Any.
sitk: Any = _sitk

F32 = NDArray[np.float32]

# Physical mode only for images that would span at least this fraction of the
# output side (a microscopy tile of 5 µm would otherwise vanish): fit mode below.
_MIN_PHYSICAL_FRACTION = 0.25
# Percentile statistics use every second row/column above this many pixels.
_PERCENTILE_FULL_PIXELS = 256 * 256

# --------------------------------------------------------------------------- windowing


def _linear_window(frame: NDArray[Any], center: float, width: float) -> F32:
    lo = center - width / 2.0
    out: F32 = np.subtract(frame, np.float32(lo), dtype=np.float32)
    out /= np.float32(width)  # division, not a reciprocal: the top maps to exactly 1
    return out


def _percentile_scale(
    frame: NDArray[Any], cfg: PreprocessConfig, padding: NDArray[np.bool_] | None
) -> F32:
    stats = frame
    keep = None if padding is None else ~padding
    if frame.size > _PERCENTILE_FULL_PIXELS:
        stats = frame[::2, ::2]
        keep = None if keep is None else keep[::2, ::2]
    values = stats[keep] if keep is not None else stats.ravel()
    if values.size == 0:
        return np.zeros(frame.shape, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(values, (cfg.percentile_low, cfg.percentile_high)))
    if not hi > lo:  # e.g. a label map whose background is padding: use the whole frame
        lo, hi = float(frame.min()), float(frame.max())
    if not hi > lo:
        return np.zeros(frame.shape, dtype=np.float32)
    return _linear_window(frame, (lo + hi) / 2.0, hi - lo)


def window(
    frame: NDArray[Any],
    meta: FrameMeta,
    cfg: PreprocessConfig,
    padding: NDArray[np.bool_] | None = None,
) -> F32:
    """Map one frame of modality values to float32 in [0, 1], high = bright.

    Parameters
    ----------
    frame
        ``(H, W)`` values as returned by :func:`read_image`.
    meta
        The frame's :class:`FrameMeta`.
    cfg
        Window presets, ``modality_window``, ``use_file_window`` and percentiles.
    padding
        ``(H, W)`` True for Pixel Padding Value pixels (set to 0 and left out
        of percentile statistics), or ``None``.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 in [0, 1]. The rule is in docs/design/embeddings.md.
    """
    preset_name = {k.upper(): v for k, v in cfg.modality_window.items()}.get(meta.modality)
    if cfg.use_file_window and meta.file_window is not None:
        out = _linear_window(frame, *meta.file_window)
    elif preset_name is not None and meta.modality_units:
        preset = cfg.windows[preset_name]
        out = _linear_window(frame, preset.center, preset.width)
    else:
        out = _percentile_scale(frame, cfg, padding)
    np.clip(out, 0.0, 1.0, out=out)
    if meta.invert:
        np.subtract(np.float32(1.0), out, out=out)
    if padding is not None:
        out[padding] = 0.0
    return out


def window_stack(
    frames: Sequence[NDArray[Any]],
    metas: Sequence[FrameMeta],
    cfg: PreprocessConfig,
    paddings: Sequence[NDArray[np.bool_] | None] | None = None,
) -> list[F32]:
    """Window the slices of one volume alike: :func:`window`, but one percentile window.

    When :func:`window` would scale each slice by its own percentiles (no file
    window, no preset), a volume would change brightness from slice to slice;
    here the percentiles are taken over all the slices together.
    """
    pads = list(paddings) if paddings is not None else [None] * len(frames)
    if not frames or not window_rule(metas[0], cfg).startswith("percentiles"):
        return [window(f, m, cfg, p) for f, m, p in zip(frames, metas, pads, strict=True)]
    parts = []
    for f, p in zip(frames, pads, strict=True):
        step = 2 if f.size > _PERCENTILE_FULL_PIXELS else 1
        sub = f[::step, ::step]
        parts.append(sub[~p[::step, ::step]] if p is not None else sub.ravel())
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    lo = hi = 0.0
    if values.size:
        lo, hi = (float(v) for v in np.percentile(values, (cfg.percentile_low,
                                                            cfg.percentile_high)))
        if not hi > lo:
            lo, hi = float(values.min()), float(values.max())
    out: list[F32] = []
    for f, m, p in zip(frames, metas, pads, strict=True):
        w = (_linear_window(f, (lo + hi) / 2.0, hi - lo) if hi > lo
             else np.zeros(f.shape, dtype=np.float32))
        np.clip(w, 0.0, 1.0, out=w)
        if m.invert:
            np.subtract(np.float32(1.0), w, out=w)
        if p is not None:
            w[p] = 0.0
        out.append(w)
    return out


def window_rule(meta: FrameMeta, cfg: PreprocessConfig) -> str:
    """Which rule :func:`window` applies to a frame with ``meta``, for a person.

    ``"file window C 40 W 400"``, ``"preset soft_tissue C 40 W 400"`` or
    ``"percentiles 1-99"``, with ``", inverted (MONOCHROME1)"`` when it is
    inverted. The same choice as :func:`window` (which it does not change).
    """
    preset_name = {k.upper(): v for k, v in cfg.modality_window.items()}.get(meta.modality)
    if cfg.use_file_window and meta.file_window is not None:
        center, width = meta.file_window
        rule = f"file window C {center:g} W {width:g}"
    elif preset_name is not None and meta.modality_units:
        preset = cfg.windows[preset_name]
        rule = f"preset {preset_name} C {preset.center:g} W {preset.width:g}"
    else:
        rule = f"percentiles {cfg.percentile_low:g}-{cfg.percentile_high:g}"
    return rule + (", inverted (MONOCHROME1)" if meta.invert else "")


def window_rule_rgb(cfg: PreprocessConfig) -> str:
    """The rule :func:`window_rgb` applies, for a person."""
    return f"percentiles {cfg.percentile_low:g}-{cfg.percentile_high:g} over RGB"


def window_rgb(frame: NDArray[Any], cfg: PreprocessConfig) -> F32:
    """Map one ``(H, W, 3)`` RGB frame to float32 in [0, 1], keeping its hues.

    One percentile window over the three channels together (as :func:`window`
    scales grey images without modality units), so the channels keep their
    ratios; colour images have no VOI LUT to honour.
    """
    out = _percentile_scale(frame, cfg, None)
    np.clip(out, 0.0, 1.0, out=out)
    return out


# --------------------------------------------------------------------------- fitting


def _block_mean(arr: F32, kr: int, kc: int) -> tuple[F32, int, int]:
    """Mean of ``kr × kc`` blocks; returns it and the trimmed leading rows, columns."""
    h, w = arr.shape[0] // kr, arr.shape[1] // kc
    r0, c0 = (arr.shape[0] - h * kr) // 2, (arr.shape[1] - w * kc) // 2
    acc = np.zeros((h, w), dtype=np.float32)
    for i in range(kr):
        for j in range(kc):
            acc += arr[r0 + i : r0 + h * kr : kr, c0 + j : c0 + w * kc : kc]
    acc *= np.float32(1.0 / (kr * kc))
    return acc, r0, c0


def fit(
    frame01: NDArray[Any], spacing: tuple[float, float] | None, cfg: PreprocessConfig, size: int
) -> F32:
    """Resample a [0, 1] frame onto the square model input.

    Parameters
    ----------
    frame01
        ``(H, W)`` output of :func:`window`.
    spacing
        ``(row, column)`` pixel spacing in mm, or ``None`` when unknown.
    cfg
        Uses ``pixel_spacing_mm``.
    size
        Side of the square output in pixels.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float32 in [0, 1]; physical mode or fit mode as
        described in docs/design/embeddings.md, margins 0.

    Raises
    ------
    ValueError
        ``size`` is not positive or the frame is not a non-empty 2-D array.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    arr = np.asarray(frame01, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected a non-empty 2-D frame, got shape {arr.shape}")
    rows, cols = arr.shape
    dr, dc = spacing if spacing is not None else (1.0, 1.0)
    extent = max(rows * dr, cols * dc)
    physical = spacing is not None and cfg.pixel_spacing_mm > 0
    if physical and extent / cfg.pixel_spacing_mm >= size * _MIN_PHYSICAL_FRACTION:
        out_spacing = float(cfg.pixel_spacing_mm)
    else:
        out_spacing = extent / size
    # physical centre of the image, with pixel (0, 0) at the origin
    center_x, center_y = (cols - 1) * dc / 2.0, (rows - 1) * dr / 2.0

    kr = min(rows, max(1, int(out_spacing / dr + 0.5)))
    kc = min(cols, max(1, int(out_spacing / dc + 0.5)))
    origin = (0.0, 0.0)
    if kr > 1 or kc > 1:
        arr, r0, c0 = _block_mean(arr, kr, kc)
        origin = ((c0 + (kc - 1) / 2.0) * dc, (r0 + (kr - 1) / 2.0) * dr)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((kc * dc, kr * dr))
    image.SetOrigin(origin)

    half = (size - 1) * out_spacing / 2.0
    resampler = sitk.ResampleImageFilter()
    resampler.SetNumberOfThreads(1)
    resampler.SetSize((size, size))
    resampler.SetOutputSpacing((out_spacing, out_spacing))
    resampler.SetOutputOrigin((center_x - half, center_y - half))
    resampler.SetOutputDirection((1.0, 0.0, 0.0, 1.0))
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    out = np.asarray(sitk.GetArrayFromImage(resampler.Execute(image)), dtype=np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out
