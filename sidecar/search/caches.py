"""In-memory views of the serving model's stored vectors: series means and slice vectors.

Immutable snapshots, checked against the database at most every ``refresh_interval``
seconds and merged forward (docs/design/search.md, "The slice cache").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from sidecar.db.search_queries import (
    SearchQueries,
    SliceRow,
)
from sidecar.embeddings.codec import from_blobs

if TYPE_CHECKING:
    pass

from sidecar.search.types import FloatArray, IntArray

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Means:
    model_id: str
    signature: tuple[int, int]
    checked_at: float
    keys: IntArray
    study_keys: IntArray
    matrix: FloatArray





def mean_rows(
    rows: Sequence[tuple[int, int, bytes]], dim: int
) -> tuple[IntArray, IntArray, FloatArray]:
    """Keys, study keys and unit float32 vectors of (key, study key, blob) mean rows.

    Rows whose blob is not ``dim`` float16 values are left out.
    """
    rows = [r for r in rows if len(r[2]) == 2 * dim]
    if not rows:
        return (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                np.zeros((0, dim), dtype=np.float32))
    return (np.asarray([r[0] for r in rows], dtype=np.int64),
            np.asarray([r[1] for r in rows], dtype=np.int64),
            unit_rows(from_blobs([r[2] for r in rows], dim)))


def unit_rows(arr: FloatArray) -> FloatArray:
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    out: FloatArray = (arr / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def spread(n: int, m: int) -> list[int]:
    """``m`` indices evenly spread over ``range(n)`` (all when ``n <= m``)."""
    if n <= m:
        return list(range(n))
    return sorted({round(i * (n - 1) / (m - 1)) for i in range(m)})


def grouped(keys: IntArray, offset: int) -> dict[int, IntArray]:
    """key -> row indices (``offset`` + position, ascending) of every distinct key."""
    if keys.size == 0:
        return {}
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    starts = np.r_[0, cuts]
    return {
        int(ordered[start]): rows
        for start, rows in zip(starts, np.split(order + offset, cuts), strict=True)
    }


def merged(old: dict[int, IntArray], new: dict[int, IntArray]) -> dict[int, IntArray]:
    out = dict(old)
    for key, rows in new.items():
        prev = out.get(key)
        out[key] = rows if prev is None else np.concatenate([prev, rows])
    return out


@dataclass(frozen=True)
class Slices:
    """Slice vectors in memory (unit float32 rows of the stored float16 values): one view.

    Rows ``[:count]`` of the buffers are valid, in ascending label order; the
    buffers may be longer (room to append) and shared with newer views, which
    only ever write past this view's ``count``.
    """

    model_id: str
    dim: int
    count: int
    signature: tuple[int, int]  # mean_signature() when last checked
    seen_top: int  # highest slice key ever seen in the database (monotonic)
    checked_at: float
    labels: IntArray
    study: IntArray
    series: IntArray
    instance: IntArray
    vectors: FloatArray
    by_study: dict[int, IntArray]
    by_series: dict[int, IntArray]

    @property
    def top(self) -> int:
        """The highest label held (0 when empty)."""
        return int(self.labels[self.count - 1]) if self.count else 0

    def rows(self, group: Literal["study", "series"], key: int) -> IntArray | None:
        """Row indices of a study's or a series' slices (ascending label), or ``None``."""
        return (self.by_study if group == "study" else self.by_series).get(key)

    def unit_vectors(self, rows: IntArray) -> FloatArray:
        """The rows' vectors (unit float32 rows, as ``unit_rows(from_blobs(...))``)."""
        out: FloatArray = self.vectors[rows]
        return out

    def owners(self, labels: IntArray) -> IntArray:
        """Row index of each label (``-1`` for labels not held), same shape."""
        flat = labels.reshape(-1)
        held = self.labels[: self.count]
        pos = np.searchsorted(held, flat)
        pos_ok = np.minimum(pos, max(self.count - 1, 0))
        found = (pos < self.count) & (held[pos_ok] == flat) if self.count else \
            np.zeros(flat.shape, dtype=bool)
        out: IntArray = np.where(found, pos_ok, -1).astype(np.int64).reshape(labels.shape)
        return out


def empty_slices(model_id: str, dim: int) -> Slices:
    return Slices(
        model_id=model_id, dim=dim, count=0, signature=(0, 0), seen_top=0, checked_at=0.0,
        labels=np.zeros(0, dtype=np.int64), study=np.zeros(0, dtype=np.int64),
        series=np.zeros(0, dtype=np.int64), instance=np.zeros(0, dtype=np.int64),
        vectors=np.zeros((0, dim), dtype=np.float32), by_study={}, by_series={},
    )


def room(buf: npt.NDArray[Any], used: int, needed: int) -> npt.NDArray[Any]:
    """``buf`` itself when it holds ``needed`` rows, else a larger copy of its first rows."""
    if buf.shape[0] >= needed:
        return buf
    bigger = np.empty((max(needed, 2 * buf.shape[0], 1024), *buf.shape[1:]), dtype=buf.dtype)
    bigger[:used] = buf[:used]
    return bigger


class SliceCache:
    """Keeps the serving model's stored slice vectors in memory (see the module notes).

    The view is checked against the database at most every ``refresh``
    seconds, and at once when a query meets a label above the highest key it
    has seen (vectors the worker committed since: the index only ever holds
    committed rows), with the mean matrix's cheap signature (number of the
    model's series means, highest slice key; a count of the slice rows would
    cost ~40 ms at a million). New rows are appended (keys only grow). The
    worker commits a series' slice vectors and its mean in one transaction,
    so fewer series means than the view expects means a deleted study: the
    studies that lost their means leave the view. New rows for an instance
    the view already holds are replaced vectors (a replaced file): the old
    rows leave their series and study.
    """

    def __init__(self, queries: SearchQueries, refresh: float) -> None:
        self._queries = queries
        self._refresh = refresh
        self._lock = threading.Lock()
        self._view: Slices | None = None

    @property
    def loaded(self) -> Slices | None:
        """The view held now (``None`` before the first load)."""
        return self._view

    def view(self, model_id: str, dim: int, *, need: int = 0) -> Slices:
        """A view no older than ``refresh`` seconds that has seen key ``need``."""
        now = time.monotonic()
        view = self._view
        if self._fresh(view, model_id, dim, need, now):
            assert view is not None
            return view
        with self._lock:
            view = self._view
            if self._fresh(view, model_id, dim, need, now):
                assert view is not None
                return view
            signature = self._queries.mean_signature(model_id)
            if view is None or view.model_id != model_id or view.dim != dim:
                view = self._load(model_id, dim, signature)
            elif signature != view.signature:
                view = self._update(view, signature)
            view = replace(view, signature=signature, checked_at=now,
                           seen_top=max(view.seen_top, signature[1], view.top))
            self._view = view
            return view

    def _fresh(self, view: Slices | None, model_id: str, dim: int, need: int,
               now: float) -> bool:
        return (
            view is not None and view.model_id == model_id and view.dim == dim
            and now - view.checked_at < self._refresh and need <= view.seen_top
        )

    def _load(self, model_id: str, dim: int, signature: tuple[int, int]) -> Slices:
        started = time.perf_counter()
        view = empty_slices(model_id, dim)
        for batch in self._queries.slice_table(model_id):
            view = self.append(view, batch)
        logger.debug("loaded %d slice vectors of model %s in %.0f ms", view.count, model_id,
                     1000 * (time.perf_counter() - started))
        return replace(view, signature=signature)

    def _update(self, view: Slices, signature: tuple[int, int]) -> Slices:
        """Append the rows committed since ``view``; drop deleted studies and replaced rows."""
        old_series = view.by_series
        start = view.count
        for batch in self._queries.slice_table(view.model_id, after=view.top):
            view = self.append(view, batch)
        new_series = 0
        by_study, by_series = dict(view.by_study), dict(view.by_series)
        if view.count > start:
            series_of = view.series[start:view.count]
            instance_of = view.instance[start:view.count]
            for key in np.unique(series_of).tolist():
                prev = old_series.get(key)
                if prev is None:
                    new_series += 1
                    continue
                stale = prev[np.isin(view.instance[prev], instance_of[series_of == key])]
                if stale.size:  # replaced vectors: keep the new rows only
                    by_series[key] = np.setdiff1d(by_series[key], stale)
                    study = int(view.study[stale[0]])
                    by_study[study] = np.setdiff1d(by_study[study], stale)
        if signature[0] != view.signature[0] + new_series:
            # series means were deleted (a deleted study), or rows were committed
            # while this ran: keep the studies that still have means
            live = self._queries.studies_with_means(view.model_id)
            for study in [s for s in by_study if s not in live]:
                rows = by_study.pop(study)
                for key in np.unique(view.series[rows]).tolist():
                    by_series.pop(key, None)
        return replace(view, by_study=by_study, by_series=by_series)

    @staticmethod
    def append(view: Slices, batch: Sequence[tuple[int, int, int, int, bytes]]) -> Slices:
        """``view`` with the rows of ``batch`` (ascending labels above its own) added."""
        rows = [r for r in batch if len(r[4]) == 2 * view.dim]
        if not rows:
            return view
        n, m = view.count, len(rows)
        labels = room(view.labels, n, n + m)
        study = room(view.study, n, n + m)
        series = room(view.series, n, n + m)
        instance = room(view.instance, n, n + m)
        vectors = room(view.vectors, n, n + m)
        labels[n:n + m] = [r[0] for r in rows]
        study[n:n + m] = [r[1] for r in rows]
        series[n:n + m] = [r[2] for r in rows]
        instance[n:n + m] = [r[3] for r in rows]
        vectors[n:n + m] = unit_rows(from_blobs([r[4] for r in rows], view.dim))
        return replace(
            view, count=n + m, labels=labels, study=study, series=series, instance=instance,
            vectors=vectors,
            by_study=merged(view.by_study, grouped(study[n:n + m], n)),
            by_series=merged(view.by_series, grouped(series[n:n + m], n)),
        )




def view_of(model_id: str, dim: int, rows: Sequence[SliceRow]) -> Slices:
    """A view of some slice rows read from the database (no cache)."""
    view = empty_slices(model_id, dim)
    return SliceCache.append(view, [(r.label, r.study_pk, r.series_pk, r.instance_pk, r.blob)
                                     for r in rows])


class Ranked(NamedTuple):
    """One ranked candidate: its score, the keys of its best slice and why it matched.

    ``label`` is the slice vector of the candidate's best (query slice, slice)
    pair, ``query_slice`` the row of that query vector and ``cosine`` the
    pair's cosine (``label`` 0 and ``query_slice`` -1: not known).
    """

    score: float
    keys: tuple[int, int, int]  # (study, series, instance) keys of the best slice
    label: int = 0
    query_slice: int = -1
    cosine: float = 0.0
    calibrated: float | None = None  # share of the archive less similar (volume ranking)
    ranked_by: str = "slices"


def rerank(
    view: Slices, level: Literal["study", "series"], queries: FloatArray, chosen: list[int]
) -> list[Ranked]:
    """Step 2 of the ranking: score each candidate with its slice vectors.

    ``score = mean_i max_j cos(q_i, v_j)``; the hit's keys are those of the
    slice of the best (query slice, slice) pair (the first such slice by label),
    and the pair itself is returned with them.
    """
    groups = sorted(
        ((g, rows) for g in set(chosen) if (rows := view.rows(level, g)) is not None and rows.size),
        key=lambda item: item[0],
    )
    if not groups:
        return []
    rows = np.concatenate([r for _, r in groups])
    sizes = np.asarray([r.size for _, r in groups], dtype=np.int64)
    starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    sims = view.unit_vectors(rows) @ queries.T  # (M candidate slices, n query slices)
    group_scores = np.maximum.reduceat(sims, starts, axis=0).mean(axis=1)
    best_of_slice = sims.max(axis=1)
    best_query = sims.argmax(axis=1)
    group_best = np.maximum.reduceat(best_of_slice, starts)
    positions = np.arange(rows.size)
    first_best = np.minimum.reduceat(
        np.where(best_of_slice == np.repeat(group_best, sizes), positions, rows.size), starts
    )
    best_rows = rows[first_best]
    ranked = [
        Ranked(score, (study, series, instance), label, query, cosine)
        for score, study, series, instance, label, query, cosine in zip(
            group_scores.tolist(), view.study[best_rows].tolist(),
            view.series[best_rows].tolist(), view.instance[best_rows].tolist(),
            view.labels[best_rows].tolist(), best_query[first_best].tolist(),
            best_of_slice[first_best].tolist(), strict=True,
        )
    ]
    ranked.sort(key=lambda item: -item.score)
    return ranked


__all__ = [
    "Means",
    "Ranked",
    "SliceCache",
    "Slices",
    "empty_slices",
    "grouped",
    "mean_rows",
    "merged",
    "rerank",
    "room",
    "spread",
    "unit_rows",
    "view_of",
]
