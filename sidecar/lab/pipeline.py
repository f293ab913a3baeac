"""Path (b) of ``sidecar evaluate``: the product itself, in-process.

A sidecar on a temporary data directory receives the gallery by C-STORE, embeds
it with its own job, and answers each query image by query by example and a
similarity C-FIND (the protocol: docs/design/lab.md).
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSNearLossless

from sidecar.config import Config
from sidecar.dicom.client import ScuError, SimilarityClient
from sidecar.embeddings.model import Embedder
from sidecar.lab.metrics import cosine_ranking, retrieval_metrics, unit_rows
from sidecar.lab.neardup import NearDuplicates, NearHits, near_duplicate_hits
from sidecar.lab.report import ModelVectors, PathResult, summarise
from sidecar.service.app import Sidecar
from sidecar.training.npz import (
    SECONDARY_CAPTURE,
    EvaluationError,
    LabelledSet,
    image_dataset,
)

logger = logging.getLogger(__name__)

U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]
F64 = NDArray[np.float64]
IntP = NDArray[np.intp]

MAX_TOP_K: Final = 1000
"""The largest top-K a similarity query may ask for (``query.max_k``'s ceiling)."""
MIN_TOP_K: Final = 11
"""Hits the metrics other than full-ranking mAP need (kNN-11)."""
_NAME: Final = "path (b)"


def _query_sample(n_queries: int, limit: int | None, seed: int) -> IntP:
    if limit is None or limit >= n_queries:
        return np.arange(n_queries, dtype=np.intp)
    rng = np.random.default_rng([seed, 0x5142])
    out: IntP = np.sort(rng.choice(n_queries, size=limit, replace=False)).astype(np.intp)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pipeline_config(base: Config, data_dir: Path, *, top_k: int, examples: int,
                    gallery: int) -> Config:
    """A configuration for an in-process evaluation sidecar.

    ``base`` with a temporary data directory and SQLite database, a free
    loopback port without TLS, no fsync, the scheduled embedding job and the
    HTTP API off (the harness drives the worker), ``query.max_k >= top_k``, query by
    example on and room for ``examples`` example images. Pre-processing and
    embedding settings are kept: they are what is evaluated.
    """
    data = base.model_dump(mode="json")
    data["storage"].update(data_dir=str(data_dir), fsync=False, min_free_mb=0)
    data["database"]["url"] = ""
    data["dicom"].update(port=_free_port(), bind_address="127.0.0.1", allow_loopback=True,
                         tcp_nodelay=True,
                         max_associations=max(int(data["dicom"]["max_associations"]), 2))
    data["dicom"]["tls"]["enabled"] = False  # loopback, and the harness's client is plain
    example_ae = data["query"]["example_ae_title"] or "SIDECAR_QUERY"
    if example_ae == data["dicom"]["ae_title"]:
        example_ae = "EVAL_QUERY"
    max_k = max(int(data["query"]["max_k"]), top_k)
    data["query"].update(
        max_k=max_k, default_k=min(int(data["query"]["default_k"]), max_k),
        example_ae_title=example_ae, max_examples=max(examples, 1), example_ttl=86400.0,
        audit_log=None,
    )
    data["worker"]["enabled"] = False
    data["http"]["enabled"] = False
    data["index"]["initial_capacity"] = max(int(data["index"]["initial_capacity"]), gallery + 16)
    return Config.model_validate(data)


@dataclass
class PipelineRun:
    """What path (b) returned for its queries."""

    ranking: IntP
    scores: F64
    short: int
    lost: int
    seconds: dict[str, float]


def run_pipeline(
    config: Config,
    embedder: Embedder,
    gallery: Sequence[Dataset],
    queries: Sequence[Dataset],
    *,
    top_k: int | Sequence[int],
) -> PipelineRun:
    """Archive ``gallery`` in an in-process sidecar and rank it for every query by C-FIND.

    Parameters
    ----------
    config
        From :func:`pipeline_config` (its data directory is used and left to the caller).
    embedder
        The model under test.
    gallery
        One-image studies (distinct Study Instance UIDs and PatientIDs).
    queries
        Query images, sent to the example AE title (never archived).
    top_k
        Hits asked per query (one value for all, or one per query).

    Returns
    -------
    PipelineRun
        ``(Q, max top_k)`` gallery indices (``-1`` where fewer hits came back) and scores.

    Raises
    ------
    EvaluationError
        An association, a C-STORE, the embedding or a C-FIND failed.
    """
    study_index = {str(ds.StudyInstanceUID): i for i, ds in enumerate(gallery)}
    ks = [top_k] * len(queries) if isinstance(top_k, int) else [int(k) for k in top_k]
    if len(ks) != len(queries):
        raise ValueError("one top_k per query")
    width = max(ks, default=1)
    seconds: dict[str, float] = {}
    lost = 0
    t0 = time.perf_counter()
    app = Sidecar(config, receiver_processes=1, embedder=embedder,
                  log_level=logging.getLevelName(logging.getLogger().level))
    try:
        host, port = app.start()
        store = SimilarityClient(host, port, config.dicom.ae_title,
                                 [(SECONDARY_CAPTURE, ExplicitVRLittleEndian)], name=_NAME)
        try:
            for n, ds in enumerate(gallery):
                store.store(ds, f"gallery image {n}")
                if (n + 1) % 1000 == 0:
                    logger.info("path (b): stored %d of %d gallery images", n + 1, len(gallery))
        finally:
            store.close()
            lost += store.lost
        t1 = time.perf_counter()
        seconds["c_store_gallery"] = t1 - t0
        assert app.embedding is not None  # an embedder was given
        app.repository.mark_stable_studies(0.0)
        while app.embedding.run_job().series:
            pass
        states = app.repository.status().instances_by_state
        if states.get("embedded", 0) != len(gallery):
            raise EvaluationError(f"path (b): {states.get('embedded', 0)} of {len(gallery)} "
                                  f"gallery images embedded ({dict(states)})")
        t2 = time.perf_counter()
        seconds["embed_gallery"] = t2 - t1
        logger.info("path (b): %d gallery images embedded in %.1f s", len(gallery), t2 - t1)

        ranking = np.full((len(queries), width), -1, dtype=np.intp)
        scores = np.full((len(queries), width), np.nan, dtype=np.float64)
        short = 0
        client = SimilarityClient(host, port, config.query.example_ae_title, [
            (SECONDARY_CAPTURE, ExplicitVRLittleEndian),
            (SECONDARY_CAPTURE, JPEGLSNearLossless),
        ], find=True, name=_NAME)
        try:
            for qi, ds in enumerate(queries):
                k = ks[qi]
                got = 0
                for hit in client.similar(ds, k, f"query {qi}"):
                    rank = hit.rank - 1
                    if 0 <= rank < k:
                        ranking[qi, rank] = study_index.get(hit.study_uid, -1)
                        scores[qi, rank] = hit.score
                        got += 1
                if got < min(k, len(gallery)):
                    short += 1
                if (qi + 1) % 200 == 0:
                    logger.info("path (b): %d of %d queries answered", qi + 1, len(queries))
        finally:
            client.close()
            lost += client.lost
        seconds["queries"] = time.perf_counter() - t2
    except ScuError as exc:
        raise EvaluationError(str(exc)) from exc
    finally:
        app.stop()
    seconds["total"] = time.perf_counter() - t0
    return PipelineRun(ranking=ranking, scores=scores, short=short, lost=lost, seconds=seconds)


def pipeline_top_k(gallery_size: int) -> int:
    """Hits path (b) asks for: the whole gallery when allowed (full-ranking mAP), else 11."""
    return gallery_size if gallery_size <= MAX_TOP_K else MIN_TOP_K


def evaluate_pipeline(
    data: LabelledSet, config: Config, embedder: Embedder, *, split: str = "test",
    limit: int | None = None, near: NearDuplicates | None = None, n_boot: int = 1000,
    seed: int = 0, model: ModelVectors | None = None, model_result: PathResult | None = None,
    workdir: Path | None = None, top_k: int | None = None,
) -> PathResult:
    """Path (b): C-STORE, the worker, query by example and similarity C-FIND.

    Parameters
    ----------
    data
        The labelled set.
    config
        The base configuration (pre-processing and embedding settings are used;
        the rest is replaced by :func:`pipeline_config`).
    embedder
        The model under test.
    split
        The query split.
    limit
        At most this many queries (a seeded sample) and near-duplicate copies.
    near
        Near duplicates to query too.
    n_boot, seed
        Bootstrap resamples and seed.
    model, model_result
        Path (a)'s vectors and result: when given, path (a) on the same queries
        and how the two rankings agree are reported in ``extra``.
    workdir
        Parent of the temporary data directory (default: the system's).
    top_k
        Hits per query (default :func:`pipeline_top_k`).
    """
    g_img, g_lab = data.split("train")
    q_img, q_lab = data.split(split)
    key = data.name
    chosen = _query_sample(q_img.shape[0], limit, seed)
    k = top_k or pipeline_top_k(g_img.shape[0])
    full = k >= g_img.shape[0]
    near_idx = _query_sample(len(near.datasets), limit, seed) if near is not None else None
    gallery_ds = [image_dataset(im, key=f"{key}/train/{i}", patient_id=f"EVAL-G{i:06d}")
                  for i, im in enumerate(g_img)]
    query_ds = [image_dataset(q_img[i], key=f"{key}/{split}/{i}", patient_id=f"EVAL-Q{i:06d}")
                for i in chosen.tolist()]
    near_ds = [near.datasets[j] for j in near_idx.tolist()] if near and near_idx is not None else []
    with tempfile.TemporaryDirectory(prefix="sidecar-evaluate-", dir=workdir) as tmp:
        cfg = pipeline_config(config, Path(tmp) / "data", top_k=k,
                              examples=len(query_ds) + len(near_ds), gallery=len(gallery_ds))
        run = run_pipeline(cfg, embedder, gallery_ds, query_ds + near_ds,
                           top_k=[k] * len(query_ds) + [1] * len(near_ds))
    nq = len(query_ds)
    ranking, scores = run.ranking[:nq, :k], run.scores[:nq, :k]
    result = PathResult("b", chosen, ranking=ranking, scores=scores)
    per_query = retrieval_metrics(ranking, g_lab, q_lab[chosen], full_ranking=full)
    hits: NearHits | None = None
    sub_near: NearDuplicates | None = None
    if near is not None and near_idx is not None and near_ds:
        sub_near = near.subset(near_idx, near_ds)
        hits = near_duplicate_hits(run.ranking[nq:, 0], sub_near, g_img)
    summarise(result, per_query, hits, sub_near, n_boot, seed, q_lab[chosen])
    result.seconds = dict(run.seconds)
    result.seconds["ms_per_query"] = run.seconds.get("queries", 0.0) / max(
        nq + len(near_ds), 1) * 1000.0
    result.extra.update({"top_k": k, "full_ranking": full, "short_answers": run.short,
                         "lost_messages_retried": run.lost})
    if not full:
        result.extra["note"] = (f"top-K {k} < gallery {g_img.shape[0]} (query.max_k caps it at "
                                f"{MAX_TOP_K}): mAP over the full ranking is path (a)'s only")
    if model is not None and model_result is not None:
        result.extra["vs_path_a"] = _compare(
            result, model, model_result, g_lab, q_lab, full=full, near_idx=near_idx,
            near=sub_near, g_img=g_img, n_boot=n_boot, seed=seed,
        )
    return result


def _compare(
    b: PathResult, model: ModelVectors, a: PathResult, g_lab: I64, q_lab: I64, *,
    full: bool, near_idx: IntP | None, near: NearDuplicates | None, g_img: U8,
    n_boot: int, seed: int,
) -> dict[str, Any]:
    """Path (a) on path (b)'s queries (and near-duplicate copies), and how the two agree."""
    chosen = b.query_indices
    nq = int(chosen.shape[0])
    a_rank = a.ranking[chosen]
    same = PathResult("a", chosen, ranking=a_rank)
    per_query = retrieval_metrics(a_rank, g_lab, q_lab[chosen], full_ranking=full)
    a_hits = None
    if near is not None and near_idx is not None and model.near.shape[0]:
        top1, _ = cosine_ranking(model.near[near_idx], model.gallery, 1)
        a_hits = near_duplicate_hits(top1[:, 0], near, g_img)
    summarise(same, per_query, a_hits, near, n_boot, seed, q_lab[chosen])
    kk = min(10, b.ranking.shape[1])
    top1_same = float((b.ranking[:, 0] == a_rank[:, 0]).mean()) * 100.0 if nq else 0.0
    order_same = (float((b.ranking[:, :kk] == a_rank[:, :kk]).all(axis=1).mean()) * 100.0
                  if nq else 0.0)
    diffs = {m: round(b.metrics[m] - same.metrics[m], 2) for m in same.metrics if m in b.metrics}
    q = unit_rows(model.queries[chosen])
    g = unit_rows(model.gallery)
    valid = b.ranking[:, :kk] >= 0
    a_scores = np.einsum("qd,qkd->qk", q, g[np.clip(b.ranking[:, :kk], 0, None)])
    gap = np.abs(np.where(valid, b.scores[:, :kk] - a_scores, 0.0))
    return {
        "queries": nq,
        "path_a_same_queries": dict(same.metrics),
        "difference_points": diffs,
        "max_abs_difference_points": max((abs(v) for v in diffs.values()), default=0.0),
        "top1_same_percent": round(top1_same, 2),
        f"top{kk}_order_same_percent": round(order_same, 2),
        "max_abs_score_difference": float(gap.max()) if gap.size else 0.0,
    }
