"""The embedding worker: stable studies → sampled slices → CNN → vectors → index.

One job run (``EmbeddingWorker.run_once``) takes a bounded number of due
instances, grouped by series (slice sampling needs every slice's position):
read the headers, choose slices (``preprocess.sample``) without a vector under
the active model, decode and embed them, then in **one database transaction**
insert the slice vectors, the series and study means and the instances' state,
and only then add the vectors to the index. After each series the worker calls
``pace(seconds)`` so a backlog never slows the DICOM receivers much. No vector is
ever in the index without its row; the crash analysis is in docs/design/embeddings.md.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sidecar.archive.reader import read_stored
from sidecar.config import Config
from sidecar.db.vectors import NewVector, SeriesWork, VectorRepository
from sidecar.embeddings import preprocess
from sidecar.embeddings.codec import from_blob, to_blob
from sidecar.embeddings.model import Embedder
from sidecar.embeddings.service import IndexService
from sidecar.embeddings.volume_worker import VolumeStats

logger = logging.getLogger(__name__)


@dataclass
class WorkStats:
    """What one job run did."""

    series: int = 0
    instances_embedded: int = 0
    instances_failed: int = 0
    slices_embedded: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    volumes: VolumeStats | None = None  # the volume step of the same job run

    def merge(self, other: WorkStats) -> None:
        """Add another run's counts to this one."""
        self.series += other.series
        self.instances_embedded += other.instances_embedded
        self.instances_failed += other.instances_failed
        self.slices_embedded += other.slices_embedded
        self.seconds += other.seconds
        for k, v in other.stage_seconds.items():
            self.stage_seconds[k] += v
        if other.volumes is not None:
            self.volumes = self.volumes or VolumeStats()
            self.volumes.merge(other.volumes)

    @property
    def idle(self) -> bool:
        """Whether the run found nothing to do (no series, no volume)."""
        return self.series == 0 and (self.volumes is None or self.volumes.series == 0)


class IngestWatch:
    """Whether instances are arriving: the newest instance key changed within ``window`` s.

    Parameters
    ----------
    probe
        Returns the newest instance's key (e.g.
        :meth:`~sidecar.db.vectors.VectorRepository.latest_instance_pk`); it
        grows with every stored instance.
    window
        Seconds after the last change that still count as arriving.
    clock
        Monotonic seconds (tests).
    """

    def __init__(self, probe: Callable[[], int | None], window: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._window = window
        self._clock = clock
        self._last: int | None = None
        self._seen = False
        self._changed = -math.inf

    def active(self) -> bool:
        """Probe once: True when the key changed since the last probe or within the window."""
        now = self._clock()
        try:
            value = self._probe()
        except Exception:  # noqa: BLE001 - no pacing rather than a failed job
            return False
        if self._seen and value != self._last:
            self._changed = now
        self._last, self._seen = value, True
        return now - self._changed < self._window


def _normalised_mean(vectors: np.ndarray) -> np.ndarray:
    mean: np.ndarray = vectors.astype(np.float32).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else mean


class EmbeddingWorker:
    """Embed due instances; safe to run again at any time (idempotent, bounded).

    Parameters
    ----------
    config
        The configuration (preprocess, embedding, worker sections).
    vectors
        Vector repository.
    embedder
        The CNN (or a test embedder).
    index
        The index service for ``embedder.model_id``.
    pace
        Called after each series with the seconds it took; may pause (it
        returns the seconds it paused). ``None``: no pacing.
    """

    def __init__(
        self,
        config: Config,
        vectors: VectorRepository,
        embedder: Embedder,
        index: IndexService,
        pace: Callable[[float], float] | None = None,
    ) -> None:
        self._cfg = config
        self._repo = vectors
        self._embedder = embedder
        self._index = index
        self._storage = config.storage_dir
        self._run_lock = threading.Lock()
        self._reembed_tried: set[int] = set()
        self._pace = pace

    @property
    def run_lock(self) -> threading.Lock:
        """Held while a job run works; take it to keep the worker out."""
        return self._run_lock

    @property
    def model_id(self) -> str:
        """Id of the model that produces the vectors."""
        return self._embedder.model_id

    def run_once(
        self,
        max_instances: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> WorkStats:
        """Embed up to ``max_instances`` due instances (default ``worker.batch_instances``).

        ``progress`` is called with the number of instances finished after each series.
        Concurrent calls do not overlap (the second waits).
        """
        limit = max_instances or self._cfg.worker.batch_instances
        stats = WorkStats()
        start = time.perf_counter()
        with self._run_lock:
            work = self._repo.due_series(
                max_instances=limit, max_attempts=self._cfg.worker.max_attempts
            )
            for item in work:
                t0 = time.perf_counter()
                done, failed = self._process_series(item, stats)
                stats.series += 1
                stats.instances_embedded += done
                stats.instances_failed += failed
                if progress is not None:
                    progress(done + failed)
                self._paced(time.perf_counter() - t0, stats)
        stats.seconds = time.perf_counter() - start
        if stats.series:
            paused = stats.stage_seconds.get("paused", 0.0)
            logger.info(
                "embedded %d slices of %d instances in %d series (%d failed) in %.1f s%s",
                stats.slices_embedded, stats.instances_embedded, stats.series,
                stats.instances_failed, stats.seconds,
                f" ({paused:.1f} s paused for arriving instances)" if paused else "",
            )
        return stats

    def _paced(self, busy: float, stats: WorkStats) -> None:
        if self._pace is not None:
            stats.stage_seconds["paused"] += self._pace(busy)

    def reembed_once(self, max_instances: int | None = None) -> WorkStats:
        """Embed, under this worker's model, series embedded under another model.

        Runs after a model change, in bounded steps like ``run_once``; instance
        states are left alone. Series that yield no vector at all (every slice
        fails under the new model) are not tried again in this process.
        """
        limit = max_instances or self._cfg.worker.batch_instances
        stats = WorkStats()
        start = time.perf_counter()
        with self._run_lock:
            work = self._repo.series_missing_model(
                self.model_id, max_instances=limit, exclude=self._reembed_tried
            )
            for item in work:
                t0 = time.perf_counter()
                self._reembed_tried.add(item.series_pk)
                self._process_series(item, stats)
                stats.series += 1
                self._paced(time.perf_counter() - t0, stats)
        stats.seconds = time.perf_counter() - start
        if stats.series:
            logger.info(
                "re-embedded %d slices of %d series under model %s in %.1f s",
                stats.slices_embedded, stats.series, self.model_id, stats.seconds,
            )
        return stats

    # ----------------------------------------------------------------- steps
    def _process_series(self, work: SeriesWork, stats: WorkStats) -> tuple[int, int]:
        cfg = self._cfg
        failures: dict[int, str] = {}
        infos: list[preprocess.FrameInfo[tuple[int, int]]] = []
        t0 = time.perf_counter()
        for ref in work.instances:
            try:
                header = read_stored(self._storage, ref.file_path, pixels=False)
                infos.extend(preprocess.frame_infos(header, ref.pk))
            except Exception as exc:  # noqa: BLE001 - recorded on the instance
                if ref.pk in work.due:
                    failures[ref.pk] = f"cannot read header: {exc}"
        chosen = preprocess.sample(infos, cfg.preprocess)
        existing = self._repo.vector_labels(work.series_pk, self.model_id)
        # A due instance with vectors got a new file (duplicate policy "replace"):
        # its vectors are stale; the commit replaces them.
        stale = {label for (inst_pk, _), label in existing.items() if inst_pk in work.due}
        todo: dict[int, list[int]] = defaultdict(list)
        positions = {info.key: info.position_mm for info in infos}
        for inst_pk, frame in chosen:
            if inst_pk not in failures and (
                (inst_pk, frame) not in existing or inst_pk in work.due
            ):
                todo[inst_pk].append(frame)
        stats.stage_seconds["sample"] += time.perf_counter() - t0

        keys: list[tuple[int, int]] = []
        arrays: list[np.ndarray] = []
        paths = {ref.pk: ref.file_path for ref in work.instances}
        size = self._embedder.input_size
        for inst_pk, frames in todo.items():
            t0 = time.perf_counter()
            try:
                ds = read_stored(self._storage, paths[inst_pk])
                prepared = preprocess.prepare(ds, cfg.preprocess, size, frames=sorted(frames),
                                              channels=self._embedder.channels)
            except Exception as exc:  # noqa: BLE001 - recorded on the instance
                failures[inst_pk] = f"cannot prepare pixels: {exc}"
                stats.stage_seconds["preprocess"] += time.perf_counter() - t0
                continue
            stats.stage_seconds["preprocess"] += time.perf_counter() - t0
            for frame, arr in zip(sorted(frames), prepared, strict=True):
                keys.append((inst_pk, frame))
                arrays.append(arr)

        t0 = time.perf_counter()
        if arrays:
            vectors = self._embedder.embed(np.stack(arrays).astype(np.float32))
        else:
            vectors = np.zeros((0, self._embedder.dim), dtype=np.float32)
        stats.stage_seconds["cnn"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        new = [
            NewVector(instance_pk=k[0], frame=k[1], position_mm=positions.get(k), blob=to_blob(v))
            for k, v in zip(keys, vectors, strict=True)
        ]
        series_vec = self._mean_vector(vectors, stale, series_pk=work.series_pk)
        study_vec = self._mean_vector(vectors, stale, study_pk=work.study_pk)
        done = [pk for pk in work.due if pk not in failures]
        labels = self._repo.commit_series(
            work,
            self.model_id,
            new,
            done,
            {pk: msg for pk, msg in failures.items() if pk in work.due},
            retry_backoff=cfg.worker.retry_backoff,
            max_attempts=cfg.worker.max_attempts,
            series_vector=series_vec,
            study_vector=study_vec,
            replaced=sorted(stale),
        )
        stats.stage_seconds["db"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if labels:
            self._index.add(np.asarray(labels, dtype=np.int64), vectors)
        if stale:
            self._index.remove(np.asarray(sorted(stale), dtype=np.int64))
        stats.stage_seconds["index"] += time.perf_counter() - t0
        stats.slices_embedded += len(labels)
        for pk, msg in failures.items():
            if pk in work.due:
                logger.warning("embedding instance %d failed: %s", pk, msg)
        return len(done), len([pk for pk in failures if pk in work.due])

    def _mean_vector(
        self,
        new: np.ndarray,
        stale: set[int],
        *,
        series_pk: int | None = None,
        study_pk: int | None = None,
    ) -> tuple[bytes, int] | None:
        stored = [
            from_blob(blob, self._embedder.dim)
            for batch in self._repo.slice_vectors(
                self.model_id, series_pk=series_pk, study_pk=study_pk
            )
            for label, blob in batch
            if label not in stale
        ]
        parts = [np.stack(stored)] if stored else []
        if len(new):
            parts.append(new)
        if not parts:
            return None
        allv = np.concatenate(parts)
        return to_blob(_normalised_mean(allv)), int(allv.shape[0])
