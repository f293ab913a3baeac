"""Slice previews as the model sees them (PNG), and the kept ones of released files.

:func:`render_png` turns one frame into the serving embedder's input (the same
windowing and fit as ``preprocess.prepare_named``) as an 8-bit grey or RGB PNG
whose ``window`` text chunk names the window rule; the page's thumbnails are
these. When ``storage.keep_files`` releases a file, :func:`keep_previews`
renders the frames the page can show (those with vectors) first and keeps them
under ``<data_dir>/thumbnails/kept/<study>/<series>/<sop>/<frame>.png``, outside
the thumbnail cache's eviction; deleting the study or instance removes them
(:func:`sidecar.archive.layout.remove_previews`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin
from pydicom.dataset import Dataset

from sidecar.archive.layout import preview_path
from sidecar.config import PreprocessConfig
from sidecar.embeddings import preprocess
from sidecar.files import write_durably


def render_png(ds: Dataset, cfg: PreprocessConfig, size: int, channels: int,
               frames: Sequence[int]) -> list[tuple[bytes, str]]:
    """``(PNG bytes, window rule)`` of each of ``frames`` at the model's input shape.

    Raises what ``preprocess.prepare_named`` raises.
    """
    arr, rules = preprocess.prepare_named(ds, cfg, size, frames=list(frames), channels=channels)
    out: list[tuple[bytes, str]] = []
    for i, rule in enumerate(rules):
        pixels = np.rint(np.clip(arr[i], 0.0, 1.0) * 255.0).astype(np.uint8)
        img = (Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB")
               if pixels.ndim == 3 else Image.fromarray(pixels, mode="L"))
        info = PngImagePlugin.PngInfo()
        info.add_text("window", rule)
        buf = io.BytesIO()
        img.save(buf, format="PNG", pnginfo=info)
        out.append((buf.getvalue(), rule))
    return out


def keep_previews(directory: Path, ds: Dataset, frames: Sequence[int], *,
                  cfg: PreprocessConfig, size: int, channels: int, fsync: bool) -> int:
    """Render and keep ``frames`` of a file about to be released; returns how many.

    ``directory`` is ``Config.previews_dir``; the UIDs come from ``ds``.
    """
    if not frames:
        return 0
    study = str(ds.StudyInstanceUID)
    series = str(ds.SeriesInstanceUID)
    sop = str(ds.SOPInstanceUID)
    for frame, (data, _) in zip(frames, render_png(ds, cfg, size, channels, frames),
                                strict=True):
        path = preview_path(directory, study, series, sop, frame)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, data, fsync=fsync)
    return len(frames)


__all__ = ["keep_previews", "render_png"]
