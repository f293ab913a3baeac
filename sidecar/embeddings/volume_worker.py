"""The volume step of the embedding job: due series → volume → planes → CNN → one vector.

After the slice work of a job run, :meth:`VolumeWorker.run_once` takes series due
for a volume vector (``VolumeRepository.due``), reads their headers, plans the
volume (:func:`~sidecar.embeddings.volume.plan_volume`), reads only the slices the
resampling needs, windows them alike, builds the volume and embeds its planes.
One row per series and model is committed: the vector, or the reason the series is
embedded slice-wise only. The volume index of the search side is rebuilt from
these rows, so a crash between the commit and any index leaves nothing to repair.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from sidecar.archive.reader import read_stored
from sidecar.config import Config
from sidecar.db.volumes import VolumeRepository, VolumeWork
from sidecar.embeddings.codec import to_blob
from sidecar.embeddings.decode import (
    FrameMeta,
    PreprocessError,
    frame_geometry,
    number_of_frames,
    pixel_spacing,
    read_image,
)
from sidecar.embeddings.model import Embedder
from sidecar.embeddings.pixels import window_stack
from sidecar.embeddings.volume import (
    METHOD,
    SliceGeometry,
    VolumeRefused,
    build_volume,
    plan_volume,
    plane_inputs,
    series_vector,
)

logger = logging.getLogger(__name__)

_GREY = ("MONOCHROME1", "MONOCHROME2")


@dataclass
class VolumeStats:
    """What one volume run did."""

    series: int = 0
    built: int = 0
    refused: int = 0
    seconds: float = 0.0

    def merge(self, other: VolumeStats) -> None:
        """Add another run's counts to this one."""
        self.series += other.series
        self.built += other.built
        self.refused += other.refused
        self.seconds += other.seconds


@dataclass(frozen=True)
class BuiltVolume:
    """A series' volume vector and its facts (``vector`` ``None``: refused, see ``reason``)."""

    vector: np.ndarray | None
    reason: str
    slices: int
    spacing_mm: float | None


def series_volume_vector(
    headers: list[tuple[int, Dataset]],
    read_pixels: Callable[[int, list[int]], Dataset],
    config: Config,
    embedder: Embedder,
) -> BuiltVolume:
    """Build one series' volume vector from its instances.

    Parameters
    ----------
    headers
        ``(instance key, dataset)`` of every image instance (pixel data not needed).
    read_pixels
        ``(instance key, frames)`` → the dataset with pixel data.
    """
    geoms: list[SliceGeometry | None] = []
    for key, ds in headers:
        photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
        if photometric not in _GREY:
            return BuiltVolume(None, f"colour images (Photometric Interpretation "
                               f"{photometric or 'absent'}) are embedded slice-wise only", 0, None)
        n = number_of_frames(ds)
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        for f, geo in enumerate(frame_geometry(ds, n)):
            geoms.append(None if geo is None else SliceGeometry(
                key=(key, f), position=geo[0], orientation=geo[1], rows=rows, columns=cols,
                spacing=pixel_spacing(ds, f)))
    try:
        plan = plan_volume(geoms, config.volumes)
    except VolumeRefused as exc:
        return BuiltVolume(None, str(exc), len(geoms), None)
    wanted: dict[int, list[int]] = defaultdict(list)
    for needed in plan.needed:
        inst_frame: tuple[int, int] = needed  # type: ignore[assignment]  # keys made above
        wanted[inst_frame[0]].append(inst_frame[1])
    keys: list[Hashable] = []
    frames: list[np.ndarray] = []
    metas: list[FrameMeta] = []
    pads: list[np.ndarray | None] = []
    for inst, fr in wanted.items():
        image = read_image(read_pixels(inst, sorted(fr)), sorted(fr))
        for i, f in enumerate(image.indices):
            keys.append((inst, f))
            frames.append(image.frames[i])
            metas.append(image.meta[i])
            pads.append(None if image.padding is None else image.padding[i])
    windowed = window_stack(frames, metas, config.preprocess, pads)
    volume = build_volume(plan, dict(zip(keys, windowed, strict=True)))
    inputs = plane_inputs(volume.voxels, config.preprocess, embedder.input_size)
    vector = series_vector(embedder.embed(inputs))
    return BuiltVolume(vector, "; ".join(plan.notes), len(plan.keys), plan.spacing_mm)


class VolumeWorker:
    """Compute due series' volume vectors; idempotent and bounded like the slice worker."""

    def __init__(self, config: Config, repo: VolumeRepository,
                 pace: Callable[[float], float] | None = None) -> None:
        self._cfg = config
        self._repo = repo
        self._pace = pace

    def run_once(self, embedder: Embedder, max_series: int = 16) -> VolumeStats:
        """Build up to ``max_series`` due series' volume vectors under ``embedder``'s model."""
        stats = VolumeStats()
        if not self._cfg.volumes.enabled:
            return stats
        start = time.perf_counter()
        work = self._repo.due(embedder.model_id, min_slices=self._cfg.volumes.min_slices,
                              limit=max_series)
        for item in work:
            t0 = time.perf_counter()
            built = self._one(item, embedder)
            label = self._repo.commit(
                item, embedder.model_id, method=METHOD,
                blob=None if built.vector is None else to_blob(built.vector),
                reason=built.reason, slices=built.slices, spacing_mm=built.spacing_mm)
            stats.series += 1
            if label is not None and built.vector is not None:
                stats.built += 1
            elif label is not None:
                stats.refused += 1
                logger.info("series %d is embedded slice-wise only: %s", item.series_pk,
                            built.reason)
            if self._pace is not None:
                self._pace(time.perf_counter() - t0)
        stats.seconds = time.perf_counter() - start
        if stats.series:
            logger.info("volume vectors: %d series built, %d slice-wise only, in %.1f s",
                        stats.built, stats.refused, stats.seconds)
        return stats

    def _one(self, work: VolumeWork, embedder: Embedder) -> BuiltVolume:
        storage = self._cfg.storage_dir
        paths = {src.instance_pk: src.file_path for src in work.instances}
        try:
            headers: list[tuple[int, Dataset]] = [
                (src.instance_pk, read_stored(storage, src.file_path, pixels=False))
                for src in work.instances
            ]
            return series_volume_vector(
                headers, lambda inst, _frames: read_stored(storage, paths[inst]),
                self._cfg, embedder)
        except PreprocessError as exc:
            return BuiltVolume(None, f"cannot read the slices: {exc}", 0, None)
        except Exception as exc:  # noqa: BLE001 - recorded on the series, other series go on
            logger.warning("volume of series %d failed: %s", work.series_pk, exc)
            return BuiltVolume(None, f"volume failed: {exc}", 0, None)
