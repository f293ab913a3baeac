"""Retrieval metrics over cosine rankings, with paired bootstrap intervals.

Definitions (P@k, full-ranking mAP, kNN-11, Mahbod et al.'s mAP@5 and ACC@1,
the majority rate) are written out in docs/design/lab.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
IntP = NDArray[np.intp]
Bool = NDArray[np.bool_]

METRICS: Final = ("p@1", "p@10", "map", "knn11", "map@5_mahbod", "acc@1_mahbod")
"""Retrieval metrics, in report order (percentages)."""
METRIC_LABELS: Final = {
    "p@1": "P@1",
    "p@10": "P@10",
    "map": "mAP (full ranking)",
    "knn11": "kNN-11 accuracy",
    "map@5_mahbod": "mAP@5 (Mahbod)",
    "acc@1_mahbod": "ACC@1 (Mahbod)",
    "near_dup@1": "near duplicate @1",
}


def cosine_ranking(
    queries: NDArray[Any], gallery: NDArray[Any], k: int | None = None, *, chunk: int = 256
) -> tuple[IntP, F64]:
    """Exact cosine ranking of the gallery for every query.

    Rows are L2-normalised in float64 (a zero row scores 0 against every
    row); the gallery is sorted by decreasing cosine, equal scores keeping
    the gallery order (lower index first; a stable sort).

    Parameters
    ----------
    queries
        ``(Q, D)`` vectors.
    gallery
        ``(G, D)`` vectors.
    k
        Ranks kept; ``None`` keeps the full ranking (``G``).
    chunk
        Queries per matrix product (memory ``chunk * G`` floats).

    Returns
    -------
    tuple
        ``(Q, k)`` gallery indices best first, and their ``(Q, k)`` cosines.
    """
    q = unit_rows(queries)
    g = unit_rows(gallery)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions, the gallery {g.shape[1]}")
    n_gal = g.shape[0]
    kk = n_gal if k is None else min(k, n_gal)
    order = np.empty((q.shape[0], kk), dtype=np.intp)
    scores = np.empty((q.shape[0], kk), dtype=np.float64)
    for start in range(0, q.shape[0], chunk):
        sim = q[start:start + chunk] @ g.T
        idx = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
        order[start:start + chunk] = idx
        scores[start:start + chunk] = np.take_along_axis(sim, idx, axis=1)
    return order, scores


def unit_rows(x: NDArray[Any]) -> F64:
    """Rows L2-normalised in float64 (a zero row stays zero)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected (N, D) vectors, got shape {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    out: F64 = np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0)
    return out


def relevance(ranked_labels: NDArray[Any], query_labels: NDArray[Any]) -> Bool:
    """``(Q, K)`` booleans: does the gallery image at each rank have the query's label."""
    rel: Bool = np.asarray(ranked_labels) == np.asarray(query_labels)[:, None]
    return rel


def precision_at_k(rel: Bool, k: int) -> F64:
    """Per-query precision at ``k``: ``(1/k) * sum_{i<=k} rel_i``.

    Raises
    ------
    ValueError
        The ranking holds fewer than ``k`` ranks.
    """
    if rel.shape[1] < k:
        raise ValueError(f"P@{k} needs {k} ranks, the ranking has {rel.shape[1]}")
    out: F64 = rel[:, :k].sum(axis=1) / float(k)
    return out


def _precision_curve(rel: Bool) -> F64:
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    out: F64 = np.cumsum(rel, axis=1) / ranks
    return out


def average_precision(rel: Bool, n_relevant: NDArray[Any]) -> F64:
    """Per-query average precision: ``(1/R) * sum_i P@i * rel_i``.

    ``rel`` must be the full ranking for the usual (full-ranking) AP; over a
    truncated ranking this is the AP of the ranks given, still divided by
    ``R``. ``R == 0`` gives 0.

    Parameters
    ----------
    rel
        ``(Q, K)`` relevance, best rank first.
    n_relevant
        ``(Q,)`` number ``R`` of relevant gallery images per query.
    """
    r = np.asarray(n_relevant, dtype=np.float64)
    total = (_precision_curve(rel) * rel).sum(axis=1)
    out: F64 = np.divide(total, r, out=np.zeros_like(total), where=r > 0)
    return out


def mahbod_map_at_k(rel: Bool, k: int = 5) -> F64:
    """Per-query AP@k as Mahbod et al. (2024) define it.

    ``AP@k = (1/R_k) * sum_{i<=k} P@i * rel_i`` with ``R_k = sum_{i<=k} rel_i``
    the hits in the top ``k`` (not the relevant images in the gallery); 0
    when the top ``k`` holds no hit. The mean over queries is their mAP@k.
    """
    if rel.shape[1] < k:
        raise ValueError(f"mAP@{k} needs {k} ranks, the ranking has {rel.shape[1]}")
    top = rel[:, :k]
    hits = top.sum(axis=1).astype(np.float64)
    total = (_precision_curve(top) * top).sum(axis=1)
    out: F64 = np.divide(total, hits, out=np.zeros_like(total), where=hits > 0)
    return out


def accuracy_at_1(rel: Bool) -> F64:
    """Per query: 1 when the top hit has the query's label (Mahbod's ACC@1)."""
    out: F64 = rel[:, 0].astype(np.float64)
    return out


def knn_accuracy(ranked_labels: NDArray[Any], query_labels: NDArray[Any], k: int = 11) -> F64:
    """Per query: 1 when the majority label of the top ``k`` is the query's label.

    Votes are counted per label among the top ``k``; a tie goes to the tied
    label that appears highest in the ranking.
    """
    top = np.asarray(ranked_labels)[:, :k]
    if top.shape[1] < k:
        raise ValueError(f"kNN-{k} needs {k} ranks, the ranking has {top.shape[1]}")
    classes, codes = np.unique(top, return_inverse=True)
    codes = codes.reshape(top.shape)
    n_q, n_c = top.shape[0], classes.shape[0]
    onehot = codes[:, :, None] == np.arange(n_c)[None, None, :]
    counts = onehot.sum(axis=1)
    first = np.where(onehot.any(axis=1), onehot.argmax(axis=1), k)
    key = counts * (k + 1) + (k - first)
    winner = classes[np.argmax(key, axis=1)] if n_q else np.zeros(0, dtype=top.dtype)
    out: F64 = (winner == np.asarray(query_labels)).astype(np.float64)
    return out


def majority_rate(gallery_labels: NDArray[Any], query_labels: NDArray[Any]) -> float:
    """Fraction of queries whose label is the most frequent gallery label (ties: the lowest)."""
    values, counts = np.unique(np.asarray(gallery_labels), return_counts=True)
    majority = values[int(np.argmax(counts))]
    q = np.asarray(query_labels)
    return float((q == majority).mean()) if q.size else 0.0


def retrieval_metrics(
    ranking: NDArray[Any],
    gallery_labels: NDArray[Any],
    query_labels: NDArray[Any],
    *,
    full_ranking: bool,
) -> dict[str, F64]:
    """Per-query values of every metric in :data:`METRICS` (fractions, not percent).

    Parameters
    ----------
    ranking
        ``(Q, K)`` gallery indices best first; ``-1`` pads a short answer
        (counted as not relevant). ``K >= 11``, or the gallery size when smaller.
    gallery_labels, query_labels
        ``(G,)`` and ``(Q,)`` labels.
    full_ranking
        ``ranking`` covers the whole gallery: ``map`` is computed; else it is left out.
    """
    gl = np.asarray(gallery_labels)
    ql = np.asarray(query_labels)
    rk = np.asarray(ranking)
    ranked = np.where(rk >= 0, gl[np.clip(rk, 0, None)], -1)
    rel = relevance(ranked, ql) & (rk >= 0)
    n_gal = gl.shape[0]
    k10, k11 = min(10, n_gal), min(11, n_gal)
    out = {
        "p@1": precision_at_k(rel, 1),
        "p@10": precision_at_k(rel, k10),
        "knn11": knn_accuracy(ranked, ql, k11),
        "map@5_mahbod": mahbod_map_at_k(rel, min(5, n_gal)),
        "acc@1_mahbod": accuracy_at_1(rel),
    }
    if full_ranking:
        values, counts = np.unique(gl, return_counts=True)
        per_label = dict(zip(values.tolist(), counts.tolist(), strict=True))
        n_rel = np.array([per_label.get(int(v), 0) for v in ql], dtype=np.float64)
        out["map"] = average_precision(rel, n_rel)
    return {m: out[m] for m in METRICS if m in out}


def bootstrap_cis(
    per_query: Mapping[str, NDArray[Any]], n_resamples: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the means, resampling queries.

    One set of ``n_resamples`` resamples (with replacement) from
    ``numpy.random.default_rng(seed)`` serves every metric, so the intervals
    are paired. Returns ``name -> (low, high)`` in percent (the values are
    fractions); empty when ``n_resamples`` is 0 or there are no queries.
    """
    sizes = {v.shape[0] for v in per_query.values()}
    if n_resamples <= 0 or not per_query:
        return {}
    if len(sizes) != 1:
        raise ValueError("every metric needs one value per query")
    n = sizes.pop()
    if n == 0:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    tail = (1.0 - level) / 2.0 * 100.0
    out: dict[str, tuple[float, float]] = {}
    for name, values in per_query.items():
        means = np.asarray(values, dtype=np.float64)[idx].mean(axis=1)
        lo, hi = np.percentile(means, [tail, 100.0 - tail])
        out[name] = (round(float(lo) * 100.0, 2), round(float(hi) * 100.0, 2))
    return out


def raw_pixel_vectors(images: NDArray[Any], *, centre: bool = False) -> F64:
    """Flattened pixels as float64 vectors (``centre``: each image's mean subtracted)."""
    arr = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    if centre:
        arr = arr - arr.mean(axis=1, keepdims=True)
    return arr
