"""Series and study similarity by volume vectors, and a score a person can read.

:class:`VolumeSearch` holds, per model, an in-memory hnswlib index of the volume
vectors (``VectorIndex``, labels = ``volume_vector`` keys), rebuilt from the
database at first use and kept in step with it (new rows added, deleted or
replaced rows dropped) whenever the rows' signature changes, checked at most every
``refresh`` seconds. The database is the only record, so there is nothing to
repair after a crash. It also keeps a fixed random sample of the vectors: a hit's
**calibrated score** is the share of that sample less similar to the query than
the hit (0.0-1.0; 0.99 means "more similar than 99 % of the archive"). The design
and the measurements are in docs/design/volumes.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from pydicom.dataset import Dataset

from sidecar.config import Config, IndexConfig
from sidecar.db.types import Engine
from sidecar.db.volumes import VolumeRepository, VolumeRow
from sidecar.embeddings.codec import from_blobs
from sidecar.embeddings.index import VectorIndex
from sidecar.embeddings.model import Embedder
from sidecar.embeddings.volume_worker import series_volume_vector
from sidecar.search.types import FloatArray

SAMPLE_SIZE: Final = 2048
"""Vectors kept for the calibrated score (all of them when fewer)."""
FETCH_FACTOR: Final = 10
MIN_FETCH: Final = 50


@dataclass(frozen=True)
class VolumeHit:
    """A series or study ranked by volume vectors."""

    key: int  # series key at series level, study key at study level
    score: float  # cosine of the best (query series, hit series) pair
    series_pk: int  # the hit series of that pair
    query_series_pk: int
    calibrated: float


@dataclass
class _State:
    model_id: str
    dim: int
    signature: tuple[int, int]
    checked: float
    index: VectorIndex
    owners: dict[int, tuple[int, int]]  # label -> (series, study)
    by_series: dict[int, int]  # series -> label
    sample: FloatArray


class VolumeSearch:
    """Volume vectors of the serving model, for series and study queries."""

    def __init__(self, engine: Engine, index_cfg: IndexConfig, refresh: float = 2.0) -> None:
        self._repo = VolumeRepository(engine)
        self._cfg = index_cfg
        self._refresh = refresh
        self._state: _State | None = None
        self._lock = threading.Lock()

    def _current(self, model_id: str) -> _State | None:
        now = time.monotonic()
        state = self._state
        if state is not None and state.model_id == model_id and now - state.checked < self._refresh:
            return state
        with self._lock:
            state = self._state
            signature = self._repo.signature(model_id)
            if signature[0] == 0:
                self._state = None
                return None
            if state is not None and state.model_id == model_id:
                if state.signature != signature:
                    self._update(state, signature)
                state.checked = now
                return state
            self._state = self._load(model_id, signature, now)
            return self._state

    def _load(self, model_id: str, signature: tuple[int, int], now: float) -> _State:
        rows = self._repo.vectors(model_id)
        dim = len(rows[0].blob or b"") // 2
        labels, vectors = _arrays(rows, dim)
        index = VectorIndex.build(labels, vectors, self._cfg)
        state = _State(model_id, dim, signature, now, index, {}, {}, _sample(vectors))
        _own(state, rows)
        return state

    def _update(self, state: _State, signature: tuple[int, int]) -> None:
        fresh = self._repo.vectors(state.model_id, after=state.signature[1])
        if fresh:
            labels, vectors = _arrays(fresh, state.dim)
            state.index.add(labels, vectors)
            _own(state, fresh)
        live = self._repo.labels(state.model_id)
        gone = [label for label in state.owners if label not in live]
        if gone:
            state.index.mark_deleted(gone)
            for label in gone:
                series, _ = state.owners.pop(label)
                if state.by_series.get(series) == label:
                    del state.by_series[series]
        if fresh or gone:
            state.sample = _sample(np.asarray(state.index.get(sorted(state.owners)),
                                              dtype=np.float32)) if state.owners else state.sample
        state.signature = signature

    # ---------------------------------------------------------------- queries
    def vectors_of(self, model_id: str, series: list[int]) -> tuple[list[int], FloatArray] | None:
        """The volume vectors of these series (those that have one), or ``None``: none has."""
        state = self._current(model_id)
        if state is None:
            return None
        have = [s for s in series if s in state.by_series]
        if not have:
            return None
        vecs = np.asarray(state.index.get([state.by_series[s] for s in have]),
                          dtype=np.float32)
        return have, vecs

    def series_of_study(self, model_id: str, study_pk: int) -> list[int]:
        """The study's series that have a volume vector, by key."""
        state = self._current(model_id)
        if state is None:
            return []
        return sorted(series for series, study in state.owners.values() if study == study_pk)

    def rank(
        self,
        model_id: str,
        query_series: list[int],
        queries: FloatArray,
        level: Literal["study", "series"],
        k: int,
        excluded: set[int],
        allowed: set[int] | None,
    ) -> list[VolumeHit]:
        """The best ``k``-ish groups for these query volume vectors, best first.

        ``excluded`` are study keys never returned; ``allowed`` (series keys at
        series level, study keys at study level) limits the hits when given.
        A study's score is its best series' score.
        """
        state = self._current(model_id)
        if state is None or not len(state.index):
            return []
        live = len(state.index)
        fetch = min(live, max(FETCH_FACTOR * k, MIN_FETCH) + _excluded_count(state, excluded))
        if allowed is not None:
            pos = 1 if level == "study" else 0
            cand = [label for label, owner in state.owners.items()
                    if owner[pos] in allowed and owner[1] not in excluded]
            if not cand:
                return []
            labels, scores = state.index.exact_search(queries, min(fetch, len(cand)), cand)
        else:
            labels, scores = state.index.search(queries, fetch)
        best: dict[int, tuple[float, int, int]] = {}
        for qi in range(labels.shape[0]):
            for label, score in zip(labels[qi].tolist(), scores[qi].tolist(), strict=True):
                owner = state.owners.get(int(label))
                if owner is None or owner[1] in excluded:
                    continue
                key = owner[1] if level == "study" else owner[0]
                if score > best.get(key, (-2.0, 0, 0))[0]:
                    best[key] = (float(score), owner[0], qi)
        order = sorted(best, key=lambda g: (-best[g][0], g))
        sims = queries @ state.sample.T  # (q, sample)
        hits = []
        for key in order:
            score, series, qi = best[key]
            calibrated = float(np.mean(sims[qi] < score)) if sims.shape[1] else 0.0
            hits.append(VolumeHit(key, score, series, query_series[qi], round(calibrated, 4)))
        return hits


def example_volumes(
    datasets: Sequence[Dataset], cfg: Config, embedder: Embedder | None
) -> tuple[list[int], FloatArray] | None:
    """Volume vectors of the query images' series that are volumes (``None``: none is).

    The images are grouped by Series Instance UID; each group is built as the
    worker builds a stored series. Keys are -1, -2, ... (no stored series).
    """
    if embedder is None:
        return None
    groups: dict[str, list[Dataset]] = {}
    for ds in datasets:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    vectors = []
    for group in groups.values():
        if sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in group) < cfg.volumes.min_slices:
            continue
        built = series_volume_vector(list(enumerate(group)), _reader(group), cfg, embedder)
        if built.vector is not None:
            vectors.append(built.vector)
    if not vectors:
        return None
    return [-(i + 1) for i in range(len(vectors))], np.stack(vectors).astype(np.float32)


def _reader(group: list[Dataset]) -> Callable[[int, list[int]], Dataset]:
    return lambda i, _frames: group[i]


def _arrays(rows: list[VolumeRow], dim: int) -> tuple[np.ndarray, FloatArray]:
    labels = np.asarray([r.label for r in rows], dtype=np.int64)
    vectors = from_blobs([r.blob or b"" for r in rows], dim)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return labels, (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _own(state: _State, rows: list[VolumeRow]) -> None:
    for r in rows:
        old = state.by_series.get(r.series_pk)
        if old is not None and old != r.label:
            state.owners.pop(old, None)
            state.index.mark_deleted([old])
        state.owners[r.label] = (r.series_pk, r.study_pk)
        state.by_series[r.series_pk] = r.label


def _sample(vectors: FloatArray) -> FloatArray:
    if vectors.shape[0] <= SAMPLE_SIZE:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    pick = np.random.default_rng(0).choice(vectors.shape[0], SAMPLE_SIZE, replace=False)
    return np.ascontiguousarray(vectors[np.sort(pick)], dtype=np.float32)


def _excluded_count(state: _State, excluded: set[int]) -> int:
    if not excluded:
        return 0
    return sum(1 for _, study in state.owners.values() if study in excluded)
