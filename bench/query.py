"""Query benchmark: recall of the ANN stage and similarity latency over C-FIND and HTTP.

Run with ``make bench-query`` (or ``.venv/bin/python bench/query.py --quick`` for a
fast check). For each index size (``--sizes``, default 100 000 and 1 000 000 slice
vectors; 1 000 000 only when the machine has the memory), in order:

1. **Synthetic archive.** Clustered 128-d unit vectors stand in for the CNN's
   slice vectors (the CNN is never run: queries by UID use stored vectors). There
   are ``size / 40`` cluster centres on the unit sphere (body regions / findings),
   each with its own rank-8 subspace of "anatomical" variation. A study belongs to
   one cluster and holds 1-4 series; a series is a point near its cluster centre
   (a random offset in the cluster's subspace plus isotropic noise) and holds 4-20
   slices that move along a random direction of that subspace (slice position)
   plus isotropic noise. Patients have 1-3 studies. Mean cosines (100 000
   vectors): two slices of one series 0.89, slices of two studies of one cluster
   0.64, of two random studies 0.00. Deterministic for ``--seed``.
2. **Build through the real write path** into a fresh data directory:
   patient/study/series/instance rows by ``Repository.add_instance`` (one
   transaction per instance, as C-STORE does; above ``--repository-max`` instances,
   by default 200 000, the same Core tables are filled in batches with the same
   values, because one transaction per instance would take ~15 minutes per million),
   studies marked stable by ``Repository.mark_stable_studies``, then per series
   ``VectorRepository.commit_series`` (slice vectors as float16, series and study
   mean vectors, instances marked embedded) exactly as the embedding worker commits
   them, and ``VectorIndex.add`` with the committed labels (in batches of series,
   with every core) and ``VectorIndex.save`` into ``index/<model id>``. Instance
   files are not written: nothing measured here reads them. The build engine runs
   SQLite with ``synchronous=OFF`` (the statements are the repository's; only the
   fsyncs of this scratch database are skipped). ``IndexService.open`` then checks
   the saved index against the database as ``sidecar serve`` does at start-up: it
   must load it as is (nothing added, nothing removed). The vectors are stored
   under the configured model's id (the built-in SliceNetV1, 128-d), so an
   unmodified ``sidecar serve`` treats them as its own.
3. **Recall of the ANN stage**: ``VectorIndex.search`` (hnswlib, loaded from the
   saved files) against exact search (numpy brute force over the same vectors),
   recall@10 at the configured ``index.ef_search`` and over a sweep of ef values
   (``--ef``), with the single-query latency of each, for ``--recall-queries``
   queries of three kinds: *stored* (vectors in the index), *perturbed* (a stored
   vector plus as much isotropic noise as a slice gets, not in the index) and *new
   series* (slices of series generated the same way but never stored: their
   neighbours are other series' slices, with near-equal cosines; the hardest
   case). A returned neighbour counts when its exact cosine is at least the 10th
   exact cosine (ties count). The goal applies to stored and perturbed queries
   (the issue's "held-out perturbed vectors and stored references").
4. **In-process search**: ``SearchService.search`` (study level, k 10, slice
   cache on and loaded first, as in ``sidecar serve``) p50/p99 over
   ``--queries`` references of each kind: a stored series, a stored study, a
   stored instance and held-out vectors (``Reference.example``, query by
   example without the CNN). For series references the whole pipeline's
   study-level recall@10 is measured too, against the same score (mean over the
   query slices of the best cosine in the study) computed exactly over every
   study, with the same exclusions.
5. **Front doors** (sizes up to ``--serve-max``, default 100 000): ``sidecar serve``
   (unmodified: worker on, the default receiver processes, HTTP on) on the built
   data directory, then from this process over loopback: a similarity C-FIND
   (Study Root, QueryRetrieveLevel STUDY, private block ``PACS SIDECAR
   SIMILARITY`` with the reference Series Instance UID and top-K 10, Explicit VR
   Little Endian) for ``--queries`` series references on one reused association
   and with a new association per query, the client socket with TCP_NODELAY (as
   DCMTK's ``TCP_NODELAY=1`` in bench/ingest.py; 100 more queries without it show
   what Nagle costs a pynetdicom client); and ``GET /v1/similar?series=UID&k=10``
   (``http.client``, which sets TCP_NODELAY) on one keep-alive connection and with
   a new connection per request. The service's own mean query time for each door
   is read from ``/metrics``. The first 50 answers of each are checked against
   the in-process answer (same studies, ranks 1..k). A front door that is not
   there is reported as not measured.

NumPy's OpenBLAS threads are whatever the environment says
(``OPENBLAS_NUM_THREADS``, printed in the header; ``sidecar serve`` inherits it):
on a busy 2-core machine two BLAS threads make the re-ranking products several
times slower than one.

Goals (issue "bench-query"): at 100 000 vectors, similarity C-FIND and HTTP
round trips p50 <= 10 ms and p99 <= 50 ms; recall@10 of the ANN stage >= 0.98.
The exit code is 0 whether the goals are met or not (1 when the benchmark itself
fails). The client runs on the same machine as the service: with 2 cores, client
and service compete for CPU, which the figures include.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import logging
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import (  # noqa: E402  (bench/ is not a package)
    ECHOSCU,
    BenchError,
    SidecarServe,
    find_sidecar,
    free_port,
    log,
    machine_facts,
    print_header,
    run_benchmark,
    sidecar_overrides,
    tail,
)

GOAL_P50_MS = 10.0
GOAL_P99_MS = 50.0
GOAL_RECALL = 0.98
GOAL_SIZE = 100_000
K = 10
DIM = 128
RANK = 8  # dimension of each cluster's subspace of variation
VECTORS_PER_CLUSTER = 40
SERIES_SPREAD = 0.55  # norm of a series' offset in its cluster's subspace
SERIES_NOISE = 0.30  # norm of a series' isotropic offset
SLICE_PATH = 0.45  # norm of the slice-position direction (slices go from -1 to +1 on it)
SLICE_NOISE = 0.30  # norm of a slice's isotropic noise
CHECKED_ANSWERS = 50  # answers per front door compared with the in-process answer
CREATOR = "PACS SIDECAR SIMILARITY"
UID_ROOT = "1.2.826.0.1.3680043.8.498.7741"  # + .<seed>.<kind>.<n>
BYTES_PER_VECTOR = 6000  # peak memory per vector (database build, index, exact search)


# ----------------------------------------------------------------- helpers
def unit(a: np.ndarray) -> np.ndarray:
    out: np.ndarray = (a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12))
    return out.astype(np.float32)


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Latency:
    """Latencies (ms) of one kind of request."""

    name: str
    ms: list[float] = field(default_factory=list)
    errors: int = 0
    note: str = ""

    def summary(self) -> dict[str, Any]:
        if not self.ms:
            return {"name": self.name, "n": 0, "errors": self.errors, "note": self.note}
        return {"name": self.name, "n": len(self.ms), "errors": self.errors,
                "p50_ms": pct(self.ms, 50), "p90_ms": pct(self.ms, 90),
                "p99_ms": pct(self.ms, 99), "max_ms": max(self.ms),
                "mean_ms": statistics.fmean(self.ms), "note": self.note}

    def line(self) -> str:
        s = self.summary()
        if not s["n"]:
            return f"  {self.name:<44} not measured: {self.note}"
        err = f"  {self.errors} error(s)" if self.errors else ""
        note = f"  ({self.note})" if self.note else ""
        return (f"  {self.name:<44} n {s['n']:>4}  p50 {s['p50_ms']:7.2f}  p90 "
                f"{s['p90_ms']:7.2f}  p99 {s['p99_ms']:7.2f}  max {s['max_ms']:7.1f} ms"
                f"{err}{note}")


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


# ------------------------------------------------------------- generation
@dataclass
class Archive:
    """The synthetic archive: vectors in insertion order (grouped by study, series)."""

    vectors: np.ndarray  # (n, dim) float32, unit rows
    series_start: np.ndarray  # (S + 1,) row offsets of each series
    series_study: np.ndarray  # (S,) study index of each series
    study_start: np.ndarray  # (T + 1,) row offsets of each study
    study_patient: np.ndarray  # (T,) patient index of each study
    study_cluster: np.ndarray  # (T,)
    clusters: int

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def series_count(self) -> int:
        return int(self.series_study.shape[0])

    @property
    def study_count(self) -> int:
        return int(self.study_patient.shape[0])


class Generator:
    """Clustered slice vectors (see the module notes)."""

    def __init__(self, clusters: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.clusters = clusters
        self.centres = unit(rng.standard_normal((clusters, DIM)))
        bases = rng.standard_normal((clusters, RANK, DIM)).astype(np.float32)
        self.bases = unit(bases)  # each direction of unit norm (nearly orthogonal)

    def series(self, rng: np.random.Generator, cluster: int, slices: int) -> np.ndarray:
        basis = self.bases[cluster]
        offset = SERIES_SPREAD * unit(rng.standard_normal(RANK).astype(np.float32)) @ basis
        point = self.centres[cluster] + offset + SERIES_NOISE * unit(
            rng.standard_normal(DIM).astype(np.float32))
        path = SLICE_PATH * unit(rng.standard_normal(RANK).astype(np.float32)) @ basis
        t = np.linspace(-1.0, 1.0, slices, dtype=np.float32)[:, None]
        noise = SLICE_NOISE * unit(rng.standard_normal((slices, DIM)).astype(np.float32))
        return unit(point + t * path + noise)

    def archive(self, n: int, seed: int) -> Archive:
        rng = np.random.default_rng(seed)
        parts: list[np.ndarray] = []
        series_start, series_study = [0], []
        study_start, study_patient, study_cluster = [0], [], []
        total = 0
        patient = 0
        while total < n:
            for _ in range(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))):
                if total >= n:
                    break
                cluster = int(rng.integers(self.clusters))
                study = len(study_patient)
                for _ in range(int(rng.integers(1, 5))):
                    if total >= n:
                        break
                    slices = min(int(rng.integers(4, 21)), n - total)
                    parts.append(self.series(rng, cluster, slices))
                    total += slices
                    series_start.append(total)
                    series_study.append(study)
                study_start.append(total)
                study_patient.append(patient)
                study_cluster.append(cluster)
            patient += 1
        return Archive(
            vectors=np.concatenate(parts),
            series_start=np.asarray(series_start, dtype=np.int64),
            series_study=np.asarray(series_study, dtype=np.int64),
            study_start=np.asarray(study_start, dtype=np.int64),
            study_patient=np.asarray(study_patient, dtype=np.int64),
            study_cluster=np.asarray(study_cluster, dtype=np.int64),
            clusters=self.clusters,
        )

    def held_out(self, count: int, seed: int) -> list[np.ndarray]:
        """Slices of ``count`` new series (never stored), one array per series."""
        rng = np.random.default_rng(seed)
        return [self.series(rng, int(rng.integers(self.clusters)), int(rng.integers(4, 21)))
                for _ in range(count)]


def uid(seed: int, kind: int, n: int) -> str:
    return f"{UID_ROOT}.{seed}.{kind}.{n + 1}"


# ------------------------------------------------------------------ build
def base_config(data_dir: Path) -> dict[str, Any]:
    """Settings shared by the build, the in-process readers and ``sidecar serve``."""
    return {
        "storage": {"data_dir": str(data_dir), "min_free_mb": 16},
        "logging": {"level": "WARNING"},
    }


def load_cfg(path: Path, data: dict[str, Any], overrides: dict[str, str]) -> Any:
    from sidecar.config import load_config

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path, environ=overrides)  # only the deliberate overrides


def scratch_engine(cfg: Any) -> tuple[Any, Any]:
    """The repository on an engine whose SQLite connections skip fsync (build only)."""
    from sqlalchemy import event

    from sidecar.db.connect import open_catalogue

    engine, repo = open_catalogue(cfg)

    @event.listens_for(engine, "connect")
    def _no_sync(dbapi_conn: Any, _record: Any) -> None:  # after the service's pragmas
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=OFF")
        cur.close()

    engine.dispose()  # connections made from now on get the pragma
    return engine, repo


@dataclass
class Built:
    """Keys of what was inserted (index = position in the archive)."""

    series_pk: np.ndarray
    study_pk: np.ndarray
    labels: np.ndarray  # slice vector key of each archive row
    seconds: dict[str, float]
    insert_mode: str


def _meta(ar: Archive, seed: int, row: int, series: int, study: int) -> Any:
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    from sidecar.db.repository import InstanceMeta

    patient = int(ar.study_patient[study])
    cluster = int(ar.study_cluster[study])
    day = dt.date(2015, 1, 1) + dt.timedelta(days=(study * 7919) % 3650)
    in_series = row - int(ar.series_start[series])
    return InstanceMeta(
        sop_instance_uid=uid(seed, 3, row),
        sop_class_uid=CTImageStorage,
        study_instance_uid=uid(seed, 1, study),
        series_instance_uid=uid(seed, 2, series),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=f"QB{seed % 1000:03d}-{patient:07d}",
        patient_name=f"QUERY^BENCH{patient}",
        study_date=day.strftime("%Y%m%d"),
        study_time="120000",
        accession_number=f"QB{study:09d}",
        study_description=f"synthetic cluster {cluster}",
        modality="CT" if cluster % 4 else "MR",
        series_number=series - int(np.searchsorted(ar.series_study, study)) + 1,
        series_description="synthetic",
        body_part_examined=("HEAD", "CHEST", "ABDOMEN", "PELVIS")[cluster % 4],
        instance_number=in_series + 1,
        rows=512,
        columns=512,
        embeddable=True,
    )


def _stored(seed: int, row: int) -> Any:
    from sidecar.db.repository import StoredFile

    return StoredFile(file_path=f"synthetic/{seed}/{row + 1}.dcm", file_size=526_000,
                      sha256="0" * 64, calling_ae_title="QUERYBENCH", calling_host="bench")


def insert_repository(repo: Any, ar: Archive, seed: int,
                      progress: Callable[[int], None]) -> np.ndarray:
    """One ``add_instance`` transaction per instance (the C-STORE write path)."""
    inst_pk = np.zeros(ar.n, dtype=np.int64)
    series_of = np.repeat(np.arange(ar.series_count), np.diff(ar.series_start))
    for row in range(ar.n):
        series = int(series_of[row])
        study = int(ar.series_study[series])
        inst_pk[row] = repo.add_instance(_meta(ar, seed, row, series, study), _stored(seed, row))
        if row % 20000 == 19999:
            progress(row + 1)
    return inst_pk


def insert_bulk(engine: Any, ar: Archive, seed: int,
                progress: Callable[[int], None]) -> np.ndarray:
    """The same rows in batches through the same Core tables (explicit keys)."""
    from sqlalchemy import insert

    from sidecar.db.engine import write_transaction
    from sidecar.db.models import INSTANCE, PATIENT, SERIES, STUDY
    from sidecar.db.repository import _instance_values, utcnow

    now = utcnow()
    series_of = np.repeat(np.arange(ar.series_count), np.diff(ar.series_start))
    first_row_of_study = ar.study_start[:-1]
    patients: dict[int, int] = {}
    with write_transaction(engine) as conn:
        for study in range(ar.study_count):
            p = int(ar.study_patient[study])
            if p not in patients:
                m = _meta(ar, seed, int(first_row_of_study[study]), 0, study)
                patients[p] = len(patients) + 1
                conn.execute(insert(PATIENT).values(
                    id=patients[p], patient_id=m.patient_id, issuer_of_patient_id="",
                    patient_name=m.patient_name, patient_birth_date="", patient_sex="O"))
        rows = []
        for study in range(ar.study_count):
            m = _meta(ar, seed, int(first_row_of_study[study]), 0, study)
            rows.append(dict(
                id=study + 1, study_instance_uid=m.study_instance_uid,
                patient_pk=patients[int(ar.study_patient[study])], study_date=m.study_date,
                study_time=m.study_time, accession_number=m.accession_number, study_id="1",
                study_description=m.study_description, referring_physician_name="",
                modalities_in_study=m.modality, first_received_at=now, last_received_at=now,
                stable=False))
        conn.execute(insert(STUDY), rows)
        rows = []
        for series in range(ar.series_count):
            study = int(ar.series_study[series])
            m = _meta(ar, seed, int(ar.series_start[series]), series, study)
            rows.append(dict(
                id=series + 1, series_instance_uid=m.series_instance_uid, study_pk=study + 1,
                modality=m.modality, series_number=m.series_number,
                series_description=m.series_description,
                body_part_examined=m.body_part_examined))
        conn.execute(insert(SERIES), rows)
    batch = 20000
    for lo in range(0, ar.n, batch):
        rows = []
        for row in range(lo, min(ar.n, lo + batch)):
            series = int(series_of[row])
            m = _meta(ar, seed, row, series, int(ar.series_study[series]))
            values = _instance_values(m, _stored(seed, row), now)
            values.update(id=row + 1, sop_instance_uid=m.sop_instance_uid, series_pk=series + 1)
            rows.append(values)
        with write_transaction(engine) as conn:
            conn.execute(insert(INSTANCE), rows)
        progress(min(ar.n, lo + batch))
    return np.arange(1, ar.n + 1, dtype=np.int64)


def build(ar: Archive, cfg: Any, model_id: str, args: argparse.Namespace) -> Built:
    from sqlalchemy import select

    from sidecar.db.models import SERIES, STUDY
    from sidecar.db.vectors import ACTIVE_MODEL_KEY, NewVector, SeriesWork, VectorRepository
    from sidecar.embeddings.codec import to_blob
    from sidecar.embeddings.index import VectorIndex
    from sidecar.embeddings.service import IndexService

    seconds: dict[str, float] = {}
    engine, repo = scratch_engine(cfg)
    try:
        mode = "repository" if ar.n <= args.repository_max else "bulk"
        t0 = time.perf_counter()

        def progress(done: int) -> None:
            el = time.perf_counter() - t0
            log(f"    {done} instances in {el:.0f} s ({done / max(el, 1e-9):.0f}/s)")

        if mode == "repository":
            inst_pk = insert_repository(repo, ar, args.seed, progress)
        else:
            inst_pk = insert_bulk(engine, ar, args.seed, progress)
        stable = repo.mark_stable_studies(0.0, now=dt.datetime.now(dt.UTC).replace(tzinfo=None)
                                          + dt.timedelta(days=1))
        if stable != ar.study_count:
            raise BenchError(f"{stable} studies marked stable, expected {ar.study_count}")
        seconds["instances"] = time.perf_counter() - t0
        log(f"  instances: {ar.n} rows ({mode}) in {seconds['instances']:.1f} s")
        with engine.connect() as conn:
            series_pk_by_uid = dict(conn.execute(
                select(SERIES.c.series_instance_uid, SERIES.c.id)).all())
            study_pk_by_uid = dict(conn.execute(
                select(STUDY.c.study_instance_uid, STUDY.c.id)).all())
        series_pk = np.asarray([series_pk_by_uid[uid(args.seed, 2, s)]
                                for s in range(ar.series_count)], dtype=np.int64)
        study_pk = np.asarray([study_pk_by_uid[uid(args.seed, 1, t)]
                               for t in range(ar.study_count)], dtype=np.int64)

        # vectors: one commit per series, as the worker does; index adds in batches
        t0 = time.perf_counter()
        vectors = VectorRepository(engine)
        threads = args.threads or os.cpu_count() or 1
        index = VectorIndex(DIM, cfg.index, capacity=ar.n, num_threads=threads)
        labels = np.zeros(ar.n, dtype=np.int64)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        pending_n = 0
        index_s = 0.0
        study_sum = np.zeros(DIM, dtype=np.float64)
        study_n = 0
        last_study = -1
        for s in range(ar.series_count):
            lo, hi = int(ar.series_start[s]), int(ar.series_start[s + 1])
            study = int(ar.series_study[s])
            if study != last_study:
                study_sum[:] = 0.0
                study_n = 0
                last_study = study
            vecs = ar.vectors[lo:hi]
            study_sum += vecs.sum(axis=0)
            study_n += hi - lo
            new = [NewVector(instance_pk=int(inst_pk[r]), frame=0,
                             position_mm=float(2.5 * (r - lo)), blob=to_blob(ar.vectors[r]))
                   for r in range(lo, hi)]
            got = vectors.commit_series(
                SeriesWork(series_pk=int(series_pk[s]), study_pk=int(study_pk[study])),
                model_id, new, [int(x) for x in inst_pk[lo:hi]], {},
                retry_backoff=cfg.worker.retry_backoff, max_attempts=cfg.worker.max_attempts,
                series_vector=(to_blob(unit(vecs.mean(axis=0))), hi - lo),
                study_vector=(to_blob(unit(study_sum.astype(np.float32))), study_n),
            )
            labels[lo:hi] = got
            pending.append((np.asarray(got, dtype=np.int64), vecs))
            pending_n += hi - lo
            if pending_n >= 20000 or s == ar.series_count - 1:
                ti = time.perf_counter()
                index.add(np.concatenate([p[0] for p in pending]),
                          np.concatenate([p[1] for p in pending]))
                index_s += time.perf_counter() - ti
                pending, pending_n = [], 0
                el = time.perf_counter() - t0
                log(f"    {hi} vectors committed and indexed in {el:.0f} s "
                    f"(index add {index_s:.0f} s)")
        seconds["vectors_db"] = time.perf_counter() - t0 - index_s
        seconds["index_add"] = index_s
        t0 = time.perf_counter()
        index.save(cfg.index_dir / model_id, model_id, fsync=False)
        seconds["index_save"] = time.perf_counter() - t0
        vectors.set_setting(ACTIVE_MODEL_KEY, model_id)
        log(f"  vectors: {ar.n} commits of {ar.series_count} series in "
            f"{seconds['vectors_db']:.1f} s, index add ({threads} threads) "
            f"{seconds['index_add']:.1f} s, save {seconds['index_save']:.1f} s")

        # the service's start-up check: the saved index must load as is
        t0 = time.perf_counter()
        service = IndexService(cfg, vectors, model_id, DIM)
        report = service.open()
        service.close()
        seconds["service_open"] = time.perf_counter() - t0
        if not report.loaded or report.added or report.deleted or report.count != ar.n:
            raise BenchError(f"IndexService.open did not load the saved index as is: {report}")
        log(f"  IndexService.open: loaded {report.count} vectors as saved, nothing to repair "
            f"({seconds['service_open']:.1f} s)")
    finally:
        engine.dispose()
    return Built(series_pk, study_pk, labels, seconds, mode)


# ----------------------------------------------------------------- recall
def exact_topk(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best rows per query (unordered), by brute force, in chunks."""
    out = np.zeros((queries.shape[0], k), dtype=np.int64)
    chunk = max(1, int(2e7 // max(1, matrix.shape[0])))  # 80 MB of scores at a time
    for lo in range(0, queries.shape[0], chunk):
        sims = queries[lo:lo + chunk] @ matrix.T
        out[lo:lo + chunk] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return out


def recall_at_k(matrix: np.ndarray, row_of_label: np.ndarray, queries: np.ndarray,
                exact_rows: np.ndarray, ann_labels: np.ndarray) -> float:
    """Mean share of the exact top k found; a neighbour as good as the k-th counts."""
    k = exact_rows.shape[1]
    kth = np.einsum("qd,qkd->qk", queries, matrix[exact_rows]).min(axis=1)
    found = matrix[row_of_label[ann_labels]]  # (q, k, dim)
    got = np.einsum("qd,qkd->qk", queries, found)
    hits = (got >= kth[:, None] - 1e-6).sum(axis=1)
    return float(np.minimum(hits, k).mean() / k)


QUERY_SETS = ("stored", "perturbed", "new series")
GOAL_SETS = ("stored", "perturbed")  # the query sets; "new series" is reported


def measure_recall(ar: Archive, built: Built, cfg: Any, model_id: str, gen: Generator,
                   args: argparse.Namespace) -> dict[str, Any]:
    from sidecar.embeddings.index import VectorIndex

    t0 = time.perf_counter()
    index = VectorIndex.load(cfg.index_dir / model_id, expected_model_id=model_id,
                             expected_dim=DIM, cfg=cfg.index)
    load_s = time.perf_counter() - t0
    row_of_label = np.full(int(built.labels.max()) + 1, -1, dtype=np.int64)
    row_of_label[built.labels] = np.arange(ar.n)
    rng = np.random.default_rng(args.seed + 7)
    nq = args.recall_queries
    stored = ar.vectors[rng.choice(ar.n, size=min(ar.n, nq), replace=False)]
    origin = ar.vectors[rng.choice(ar.n, size=min(ar.n, nq), replace=False)]
    perturbed = unit(origin + SLICE_NOISE * unit(
        rng.standard_normal(origin.shape).astype(np.float32)))
    fresh = np.concatenate(gen.held_out(max(1, nq // 8), args.seed + 11))
    fresh = fresh[rng.permutation(fresh.shape[0])[:nq]]
    sets = dict(zip(QUERY_SETS, (stored, perturbed, fresh), strict=True))
    t0 = time.perf_counter()
    exact = {name: exact_topk(ar.vectors, q, K) for name, q in sets.items()}
    exact_ms = 1000 * (time.perf_counter() - t0) / sum(q.shape[0] for q in sets.values())
    facts: dict[str, Any] = {}
    for name, q in sets.items():  # what the data look like: cosine of the 1st and 10th
        sims = np.einsum("qd,qkd->qk", q, ar.vectors[exact[name]])
        facts[name] = (float(np.median(sims.max(axis=1))), float(np.median(sims.min(axis=1))))
    configured = cfg.index.ef_search
    efs = sorted({*args.ef_values, configured})
    rows = []
    log(f"  ANN recall@{K} vs exact, {nq} queries per set (index loaded in {load_s:.1f} s; "
        f"exact search {exact_ms:.1f} ms/query in numpy)")
    for name in QUERY_SETS:
        log(f"    {name:<10}: median exact cosine of the 1st neighbour {facts[name][0]:.3f}, "
            f"of the 10th {facts[name][1]:.3f}")
    log(f"    {'ef':>5} " + " ".join(f"{n:>10}" for n in QUERY_SETS)
        + f" {'p50 ms':>8} {'p99 ms':>8}  (latency: one new-series query vector)")
    for ef in efs:
        rec = {}
        for name, q in sets.items():
            labels, _ = index.search(q, K, ef=ef)
            rec[name] = recall_at_k(ar.vectors, row_of_label, q, exact[name], labels)
        lat = []
        for q in fresh[:300]:
            t1 = time.perf_counter()
            index.search(q, K, ef=ef)
            lat.append(1000 * (time.perf_counter() - t1))
        row = {"ef": ef, "recall": rec, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
               "configured": ef == configured}
        rows.append(row)
        mark = "  <- index.ef_search" if ef == configured else ""
        log(f"    {ef:>5} " + " ".join(f"{rec[n]:10.4f}" for n in QUERY_SETS)
            + f" {row['p50_ms']:8.3f} {row['p99_ms']:8.3f}{mark}")
    conf = next(r for r in rows if r["configured"])
    return {"index_load_s": load_s, "exact_ms_per_query": exact_ms, "sweep": rows,
            "configured_ef": configured, "recall": conf["recall"],
            "neighbour_cosines": facts}


# ------------------------------------------------------------- in-process
@dataclass
class Reference:
    kind: str  # series, study, instance, example
    uid: str
    index: int  # series / study / row index in the archive (-1: held-out)


def pick_references(ar: Archive, args: argparse.Namespace, n: int) -> dict[str, list[Reference]]:
    rng = np.random.default_rng(args.seed + 3)
    series = rng.choice(ar.series_count, size=min(n, ar.series_count), replace=False)
    studies = rng.choice(ar.study_count, size=min(n, ar.study_count), replace=False)
    rows = rng.choice(ar.n, size=min(n, ar.n), replace=False)
    return {
        "series": [Reference("series", uid(args.seed, 2, int(s)), int(s)) for s in series],
        "study": [Reference("study", uid(args.seed, 1, int(t)), int(t)) for t in studies],
        "instance": [Reference("instance", uid(args.seed, 3, int(r)), int(r)) for r in rows],
    }


def exact_study_ranking(ar: Archive, m16: np.ndarray, q: np.ndarray, own: int) -> np.ndarray:
    """Study indices, best first, by mean over q of the best cosine in the study (exact)."""
    sims = q @ m16.T  # (nq, n)
    best = np.maximum.reduceat(sims, ar.study_start[:-1], axis=1)  # (nq, T)
    scores = best.mean(axis=0)
    patient = ar.study_patient[own]
    scores[ar.study_patient == patient] = -np.inf  # own study and same-patient studies
    return scores


def in_process(ar: Archive, cfg: Any, refs: dict[str, list[Reference]], gen: Generator,
               args: argparse.Namespace) -> dict[str, Any]:
    import sidecar.search.service as search_mod
    from sidecar.db.connect import open_catalogue
    from sidecar.search.readonly import ReadOnlyEmbedding
    from sidecar.search.types import EmbeddedImages, Reference

    engine, _ = open_catalogue(cfg, migrate=False)
    try:
        t0 = time.perf_counter()
        emb = ReadOnlyEmbedding(cfg, engine)
        open_s = time.perf_counter() - t0
        # as in sidecar serve: the service's slice cache on (a ReadOnlyEmbedding alone
        # would turn it off, as for the one-shot CLI), loaded before the first query
        svc = search_mod.SearchService(cfg, engine, emb, slice_cache=True)
        t0 = time.perf_counter()
        if hasattr(svc, "warm"):
            svc.warm()
        warm_s = time.perf_counter() - t0
        # the vectors as the database holds them (float16), for the exact study ranking
        m16 = unit(ar.vectors.astype("<f2").astype(np.float32))  # = from_blob(to_blob(v))
        warm = refs["series"][:20]
        t0 = time.perf_counter()
        for r in warm[:1]:
            svc.search(Reference.series(r.uid), k=K, level="study")
        first_s = time.perf_counter() - t0
        for r in warm:
            svc.search(Reference.series(r.uid), k=K, level="study")
        results: dict[str, Latency] = {}
        answers: dict[str, list[str]] = {}
        cand: list[int] = []
        recall_hits: list[float] = []
        study_uid_index = {uid(args.seed, 1, t): t for t in range(ar.study_count)}
        make = {"series": Reference.series, "study": Reference.study,
                "instance": Reference.instance}
        for kind in ("series", "study", "instance"):
            lat = Latency(f"SearchService.search, {kind} reference")
            for r in refs[kind][:args.queries]:
                ref = make[kind](r.uid)
                t1 = time.perf_counter()
                res = svc.search(ref, k=K, level="study")
                lat.ms.append(1000 * (time.perf_counter() - t1))
                cand.append(res.candidates)
                if len(res.hits) != K:
                    lat.errors += 1
                if kind == "series":
                    answers[r.uid] = [h.study_instance_uid for h in res.hits]
            results[kind] = lat
        if hasattr(Reference, "example"):
            lat = Latency("SearchService.search, example (held-out vectors)")
            for i, vecs in enumerate(gen.held_out(args.queries, args.seed + 13)):
                images = EmbeddedImages(
                    model_id=emb.serving.model_id, vectors=vecs, sop_instance_uid=f"9.9.{i}",
                    series_instance_uid="", study_instance_uid="", patient_id="",
                    issuer_of_patient_id="")
                t1 = time.perf_counter()
                res = svc.search(Reference.example(images), k=K, level="study")
                lat.ms.append(1000 * (time.perf_counter() - t1))
                if len(res.hits) != K:
                    lat.errors += 1
            results["example"] = lat
        else:
            results["example"] = Latency("SearchService.search, example (held-out vectors)",
                                         note="no query by example in sidecar.search.service")
        # after the timed queries: numpy's exact ranking would disturb their timing
        for r in refs["series"][:min(args.queries, args.pipeline_recall_queries)]:
            lo, hi = ar.series_start[r.index], ar.series_start[r.index + 1]
            scores = exact_study_ranking(ar, m16, m16[lo:hi], int(ar.series_study[r.index]))
            kth = np.partition(scores, -K)[-K]
            got = [scores[study_uid_index[u]] for u in answers[r.uid]]
            recall_hits.append(sum(1 for s in got if s >= kth - 1e-5) / K)
    finally:
        engine.dispose()
    log(f"  in-process search (study level, k {K}; read-only index opened in {open_s:.1f} s, "
        f"mean and slice vectors loaded in {warm_s:.1f} s, first query {1000 * first_s:.0f} "
        f"ms; median {statistics.median(cand) if cand else 0:.0f} candidates re-ranked)")
    for lat in results.values():
        log(lat.line())
    pipeline_recall = statistics.fmean(recall_hits) if recall_hits else float("nan")
    log(f"  study-level recall@{K} of the whole pipeline vs exact re-ranking of every study "
        f"({len(recall_hits)} series references): {pipeline_recall:.4f}")
    return {"open_s": open_s, "warm_s": warm_s, "first_query_s": first_s,
            "latency": {k: v.summary() for k, v in results.items()},
            "pipeline_recall": pipeline_recall, "pipeline_recall_queries": len(recall_hits),
            "median_candidates": statistics.median(cand) if cand else 0,
            "answers": answers}


# ----------------------------------------------------------- front doors
class QueryServe(SidecarServe):
    """``sidecar serve`` on the built data directory, HTTP on."""

    def __init__(self, run_dir: Path, args: argparse.Namespace, data_dir: Path) -> None:
        super().__init__(run_dir, args.ready_timeout, args.sidecar_exe, args.sidecar_overrides)
        self.data_dir = data_dir
        self.http_port = 0
        self.config_path = run_dir / "serve.yaml"
        self.log_path = run_dir / "serve.log"

    def command(self) -> list[str]:
        self.http_port = free_port()
        cfg = base_config(self.data_dir)
        cfg["dicom"] = {"ae_title": self.ae_title, "bind_address": "127.0.0.1",
                        "port": self.port}
        cfg["http"] = {"enabled": True, "bind_address": "127.0.0.1", "port": self.http_port}
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return [str(self.exe), "--config", str(self.config_path), "serve"]


def find_identifier(series_uid: str) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    blk = ds.private_block(0x0099, CREATOR, create=True)
    blk.add_new(0x03, "UI", series_uid)
    blk.add_new(0x04, "US", K)
    return ds


def parse_find(responses: list[tuple[Any, Any]]) -> tuple[int, list[tuple[int, str]], str]:
    """(final status, [(rank, StudyInstanceUID)] of the pending answers, error comment)."""
    hits: list[tuple[int, str]] = []
    final, comment = -1, ""
    for status, ident in responses:
        code = int(getattr(status, "Status", -1)) if status is not None else -1
        if code in (0xFF00, 0xFF01) and ident is not None:
            rank = -1
            with contextlib.suppress(Exception):
                rank = int(ident.private_block(0x0099, CREATOR)[0x11].value)
            hits.append((rank, str(ident.get("StudyInstanceUID", ""))))
        else:
            final = code
            comment = str(status.get("ErrorComment", "")) if status is not None else "no status"
    return final, hits, comment


def check_answer(name: str, got: list[str], ranks: list[int], want: list[str] | None,
                 problems: list[str]) -> None:
    if want is None:
        return
    if ranks and ranks != list(range(1, len(ranks) + 1)):
        problems.append(f"{name}: ranks {ranks}")
    if set(got) != set(want):
        problems.append(f"{name}: {len(set(got) & set(want))} of {len(want)} studies as "
                        "in-process")


def server_query_ms(server: QueryServe) -> dict[str, tuple[float, int]]:
    """Sum (ms) and count of the service's own query timings, by interface (/metrics)."""
    out: dict[str, tuple[float, int]] = {}
    try:
        c = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode(errors="replace")
        c.close()
    except OSError:
        return out
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("sidecar_query_duration_seconds_"):
            continue
        name, _, value = line.rpartition(" ")
        interface = name.partition('interface="')[2].partition('"')[0]
        if name.startswith("sidecar_query_duration_seconds_sum"):
            sums[interface] = sums.get(interface, 0.0) + 1000 * float(value)
        elif name.startswith("sidecar_query_duration_seconds_count"):
            counts[interface] = counts.get(interface, 0) + int(float(value))
    for interface, total in sums.items():
        out[interface] = (total, counts.get(interface, 0))
    return out


def server_mean(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]],
                interface: str) -> float | None:
    s0, n0 = before.get(interface, (0.0, 0))
    s1, n1 = after.get(interface, (0.0, 0))
    return (s1 - s0) / (n1 - n0) if n1 > n0 else None


def _nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY on the association's socket (as DCMTK's TCP_NODELAY=1)."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _find_client() -> tuple[Any, str]:
    """The benchmark's C-FIND client AE (Study Root FIND, Explicit VR LE) and the FIND UID."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as FIND,
    )

    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    ae = AE(ae_title="QUERYBENCH")
    ae.add_requested_context(FIND, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae, str(FIND)


def _floor_scp(port: int, ready: Any, k: int) -> None:  # pragma: no cover - child process
    """A pynetdicom C-FIND SCP that answers every query with ``k`` prepared identifiers."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as FIND,
    )

    prepared = []
    for i in range(k):  # the same elements as the sidecar's answers to find_identifier()
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.RetrieveAETitle = "PACS"
        ds.StudyInstanceUID = uid(1, 3, i)
        blk = ds.private_block(0x0099, CREATOR, create=True)
        blk.add_new(0x10, "FD", 0.9 - i / 100)
        blk.add_new(0x11, "UL", i + 1)
        blk.add_new(0x12, "UI", uid(1, 1, i))
        blk.add_new(0x13, "UI", uid(1, 2, i))
        blk.add_new(0x14, "LO", "0123456789abcdef")
        prepared.append(ds)

    def answer(event: Any) -> Any:
        _ = event.identifier  # decoded, as any SCP must
        for ds in prepared:
            yield 0xFF00, ds

    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    ae = AE(ae_title="FLOOR")
    ae.add_supported_context(FIND, ExplicitVRLittleEndian)
    ae.start_server(("127.0.0.1", port), block=False,
                    evt_handlers=[(evt.EVT_C_FIND, answer), (evt.EVT_CONN_OPEN, _nodelay)])
    ready.set()
    while True:
        time.sleep(3600)


def cfind_floor(refs: list[Reference], args: argparse.Namespace) -> Latency:
    """The same client against a pynetdicom SCP that does no work: K prepared answers.

    What pynetdicom alone costs per query on this machine (both ends Python,
    one association, TCP_NODELAY), the reference the sidecar's C-FIND is
    compared with.
    """
    import multiprocessing as mp

    from pynetdicom import evt

    floor = Latency(f"C-FIND reference: pynetdicom SCP, {K} prepared answers",
                    note="no search, no catalogue: pynetdicom alone")
    port = free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_floor_scp, args=(port, ready, K), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise BenchError("the reference C-FIND SCP did not start")
        ae, find = _find_client()
        assoc = ae.associate("127.0.0.1", port, ae_title="FLOOR",
                             evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        if not assoc.is_established:
            raise BenchError("cannot associate with the reference C-FIND SCP")
        try:
            for r in refs[:20]:  # warm-up
                list(assoc.send_c_find(find_identifier(r.uid), find))
            for r in refs[:args.queries]:
                t0 = time.perf_counter()
                final, hits, _ = parse_find(list(assoc.send_c_find(find_identifier(r.uid), find)))
                floor.ms.append(1000 * (time.perf_counter() - t0))
                if final != 0 or len(hits) != K:
                    floor.errors += 1
        finally:
            assoc.release()
    finally:
        proc.terminate()
        proc.join(10)
    return floor


def cfind_runs(server: QueryServe, refs: list[Reference], answers: dict[str, list[str]],
               args: argparse.Namespace) -> dict[str, Any]:
    from pynetdicom import evt

    ae, find = _find_client()
    problems: list[str] = []
    reused = Latency("C-FIND similarity, one association")
    fresh = Latency("C-FIND similarity, new association per query")
    nagle = Latency("C-FIND, one association, client Nagle on",
                    note="pynetdicom's default socket; information only")

    handlers = [(evt.EVT_CONN_OPEN, _nodelay)]

    def associate(fast: bool = True) -> Any:
        return ae.associate("127.0.0.1", server.port, ae_title=server.ae_title,
                            evt_handlers=handlers if fast else [])

    def one(assoc: Any, r: Reference) -> tuple[int, list[tuple[int, str]], str]:
        return parse_find(list(assoc.send_c_find(find_identifier(r.uid), find)))

    assoc = associate()
    if not assoc.is_established:
        raise BenchError(f"cannot associate with sidecar serve; log:\n{tail(server.log_path)}")
    try:
        final, hits, comment = one(assoc, refs[0])
        if final != 0x0000:
            note = f"status 0x{final:04X} {comment!r}" if final >= 0 else "no final status"
            reused.note = fresh.note = f"similarity C-FIND not available: {note}"
            log(f"  {reused.note}")
            return {"available": False, "note": reused.note, "latency": {}}
        for r in refs[:20]:  # warm-up
            one(assoc, r)
        before = server_query_ms(server)
        for i, r in enumerate(refs[:args.queries]):
            t0 = time.perf_counter()
            final, hits, comment = one(assoc, r)
            reused.ms.append(1000 * (time.perf_counter() - t0))
            if final != 0 or len(hits) != K:
                reused.errors += 1
                if len(problems) < 5:
                    problems.append(f"C-FIND {r.uid}: status 0x{final:04X} {comment!r}, "
                                    f"{len(hits)} answers")
            elif i < CHECKED_ANSWERS:
                check_answer(f"C-FIND {r.uid}", [h[1] for h in hits], [h[0] for h in hits],
                             answers.get(r.uid), problems)
        in_service = server_mean(before, server_query_ms(server), "dicom")
    finally:
        assoc.release()
    if in_service is not None:
        reused.note = f"the service's own query time: mean {in_service:.1f} ms"
    for r in refs[:args.queries]:
        t0 = time.perf_counter()
        a = associate()
        if not a.is_established:
            fresh.errors += 1
            continue
        try:
            final, hits, _ = one(a, r)
        finally:
            a.release()
        fresh.ms.append(1000 * (time.perf_counter() - t0))
        if final != 0 or len(hits) != K:
            fresh.errors += 1
    a = associate(fast=False)
    try:
        for r in refs[:min(100, args.queries)]:
            t0 = time.perf_counter()
            one(a, r)
            nagle.ms.append(1000 * (time.perf_counter() - t0))
    finally:
        a.release()
    floor = cfind_floor(refs, args)
    if floor.ms and reused.ms:
        ratio = pct(reused.ms, 50) / pct(floor.ms, 50)
        reused.note += f"{'; ' if reused.note else ''}p50 {ratio:.2f}x the pynetdicom reference"
    for lat in (reused, floor, fresh, nagle):
        log(lat.line())
    for p in problems[:10]:
        log(f"    check: {p}")
    return {"available": True, "latency": {"reused": reused.summary(),
                                           "pynetdicom_reference": floor.summary(),
                                           "new_association": fresh.summary(),
                                           "reused_client_nagle": nagle.summary()},
            "service_mean_ms": in_service, "problems": problems}


def http_runs(server: QueryServe, refs: list[Reference], answers: dict[str, list[str]],
              args: argparse.Namespace) -> dict[str, Any]:
    problems: list[str] = []
    keep = Latency("HTTP GET /v1/similar, keep-alive connection")
    fresh = Latency("HTTP GET /v1/similar, new connection per request")

    def get(conn: http.client.HTTPConnection, r: Reference) -> tuple[int, bytes]:
        conn.request("GET", f"/v1/similar?series={r.uid}&k={K}")
        resp = conn.getresponse()
        return resp.status, resp.read()

    # wait for the HTTP port (it may start a moment after the DICOM node)
    deadline = time.monotonic() + 30
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
            status, body = get(c, refs[0])
            c.close()
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                note = f"nothing answers on the HTTP port ({exc.__class__.__name__})"
                keep.note = fresh.note = note
                log(f"  HTTP not available: {note}")
                return {"available": False, "note": note, "latency": {}}
            time.sleep(0.5)
    if status != 200:
        note = f"HTTP {status}: {body[:200]!r}"
        log(f"  HTTP similarity not available: {note}")
        return {"available": False, "note": note, "latency": {}}

    def hits_of(body: bytes) -> tuple[list[str], list[int]]:
        data = json.loads(body)
        hits = data.get("hits", []) if isinstance(data, dict) else []
        return ([str(h.get("study_instance_uid", "")) for h in hits],
                [int(h.get("rank", -1)) for h in hits])

    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        for r in refs[:20]:
            get(conn, r)
        before = server_query_ms(server)
        for i, r in enumerate(refs[:args.queries]):
            t0 = time.perf_counter()
            status, body = get(conn, r)
            keep.ms.append(1000 * (time.perf_counter() - t0))
            got, ranks = hits_of(body) if status == 200 else ([], [])
            if status != 200 or len(got) != K:
                keep.errors += 1
                if len(problems) < 5:
                    problems.append(f"HTTP {r.uid}: {status} {body[:200]!r}")
            elif i < CHECKED_ANSWERS:
                check_answer(f"HTTP {r.uid}", got, ranks, answers.get(r.uid), problems)
        in_service = server_mean(before, server_query_ms(server), "http")
    finally:
        conn.close()
    if in_service is not None:
        keep.note = f"the service's own query time: mean {in_service:.1f} ms"
    for r in refs[:args.queries]:
        t0 = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        try:
            status, body = get(c, r)
        finally:
            c.close()
        fresh.ms.append(1000 * (time.perf_counter() - t0))
        if status != 200:
            fresh.errors += 1
    log(keep.line())
    log(fresh.line())
    for p in problems[:10]:
        log(f"    check: {p}")
    return {"available": True, "latency": {"keep_alive": keep.summary(),
                                           "new_connection": fresh.summary()},
            "service_mean_ms": in_service, "problems": problems}


def front_doors(run_dir: Path, data_dir: Path, refs: list[Reference],
                answers: dict[str, list[str]], args: argparse.Namespace) -> dict[str, Any]:
    server = QueryServe(run_dir, args, data_dir)
    out: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        server.start()
        out["start_s"] = time.perf_counter() - t0
        log(f"  sidecar serve ready in {out['start_s']:.1f} s (AE {server.ae_title} port "
            f"{server.port}, HTTP port {server.http_port})")
        out["cfind"] = cfind_runs(server, refs, answers, args)
        out["http"] = http_runs(server, refs, answers, args)
        if server.proc is not None and server.proc.poll() is not None:
            raise BenchError(f"sidecar serve died; log:\n{tail(server.log_path)}")
    finally:
        server.stop()
    warnings = [line for line in server.log_path.read_text(errors="replace").splitlines()
                if " ERROR " in line or "Traceback" in line]
    if warnings:
        log(f"  serve log: {len(warnings)} error line(s), first: {warnings[0][:200]}")
    out["serve_exit_code"] = server.exit_code
    return out


# ------------------------------------------------------------------- main
def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_size(n: int, args: argparse.Namespace, work: Path, model_id: str) -> dict[str, Any]:
    root = work / f"n{n}"
    root.mkdir()
    data_dir = root / "data"
    cfg = load_cfg(root / "build.yaml", base_config(data_dir), args.sidecar_overrides)
    clusters = max(10, n // VECTORS_PER_CLUSTER)
    t0 = time.perf_counter()
    gen = Generator(clusters, args.seed)
    ar = gen.archive(n, args.seed + 1)
    log(f"  generated {ar.n} vectors: {ar.series_count} series, {ar.study_count} studies, "
        f"{int(ar.study_patient.max()) + 1} patients, {clusters} clusters "
        f"({time.perf_counter() - t0:.1f} s)")
    built = build(ar, cfg, model_id, args)
    out: dict[str, Any] = {"size": n, "series": ar.series_count, "studies": ar.study_count,
                           "clusters": clusters, "build_seconds": built.seconds,
                           "insert_mode": built.insert_mode}
    out["recall"] = measure_recall(ar, built, cfg, model_id, gen, args)
    refs = pick_references(ar, args, args.queries + 20)
    proc = in_process(ar, cfg, refs, gen, args)
    answers = proc.pop("answers")
    out["in_process"] = proc
    if n <= args.serve_max:
        log(f"  front doors (sidecar serve, {args.queries} queries each)")
        out["front_doors"] = front_doors(root, data_dir, refs["series"], answers, args)
    else:
        log(f"  front doors skipped at {n} vectors (--serve-max {args.serve_max})")
    return out


def goal_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        n = r["size"]
        rec = r["recall"]["recall"]
        ok = min(rec[name] for name in GOAL_SETS) >= GOAL_RECALL
        lines.append(f"{n} vectors: ANN recall@{K} at ef_search {r['recall']['configured_ef']}: "
                     + ", ".join(f"{name} {rec[name]:.4f}" for name in GOAL_SETS)
                     + f"   goal >= {GOAL_RECALL}: {verdict(ok)}   (new series "
                     f"{rec['new series']:.4f}, not part of the goal)")
        fd = r.get("front_doors")
        if fd is None:
            continue
        doors = [("C-FIND (one association)", fd["cfind"], "reused"),
                 ("C-FIND (new association per query)", fd["cfind"], "new_association"),
                 ("HTTP (keep-alive)", fd["http"], "keep_alive"),
                 ("HTTP (new connection per request)", fd["http"], "new_connection")]
        for name, door, key in doors:
            s = door.get("latency", {}).get(key)
            if not door.get("available") or not s or not s.get("n"):
                lines.append(f"{n} vectors: {name}: not measured ({door.get('note', '')})")
                continue
            ok = s["p50_ms"] <= GOAL_P50_MS and s["p99_ms"] <= GOAL_P99_MS and not s["errors"]
            goal = (f"goal p50 <= {GOAL_P50_MS:.0f}, p99 <= {GOAL_P99_MS:.0f}: {verdict(ok)}"
                    if n == GOAL_SIZE else f"(goals are for {GOAL_SIZE})")
            lines.append(f"{n} vectors: {name}: p50 {s['p50_ms']:.1f} ms, p99 "
                         f"{s['p99_ms']:.1f} ms   {goal}")
            ref = door.get("latency", {}).get("pynetdicom_reference")
            if key == "reused" and ref and ref.get("n"):
                lines.append(f"{n} vectors:   reference, a pynetdicom SCP that only sends {K} "
                             f"prepared answers: p50 {ref['p50_ms']:.1f} ms, p99 "
                             f"{ref['p99_ms']:.1f} ms (sidecar p50 = "
                             f"{s['p50_ms'] / ref['p50_ms']:.2f}x)")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Recall@10 of the ANN stage and similarity query latency (in process, "
                    "C-FIND, HTTP) on synthetic archives of slice vectors.")
    p.add_argument("--sizes", default=None,
                   help="comma-separated index sizes in slice vectors (default 100000,1000000)")
    p.add_argument("--queries", type=int, default=None,
                   help="timed queries per kind of request (default 500)")
    p.add_argument("--recall-queries", type=int, default=None,
                   help="queries per recall set (stored, perturbed, new series) "
                        "(default 1000)")
    p.add_argument("--pipeline-recall-queries", type=int, default=200,
                   help="series references whose study-level answer is checked against "
                        "exact re-ranking of every study (default 200)")
    p.add_argument("--ef", default="16,32,48,64,96,128,192,256",
                   help="ef values of the recall sweep (the configured one is added)")
    p.add_argument("--serve-max", type=int, default=GOAL_SIZE,
                   help="largest size measured through sidecar serve (default 100000)")
    p.add_argument("--repository-max", type=int, default=200_000,
                   help="largest size whose instances go through Repository.add_instance "
                        "one by one (larger: batched Core inserts) (default 200000)")
    p.add_argument("--threads", type=int, default=0,
                   help="hnswlib threads for the index build (default: every core)")
    p.add_argument("--quick", action="store_true",
                   help="fast check: --sizes 20000 --queries 100 --recall-queries 300")
    p.add_argument("--seed", type=int, default=20240101, help="generation seed")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the results as JSON to PATH")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent of the temporary directories (default: system temp dir)")
    p.add_argument("--sidecar-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a sidecar setting (build, in-process and serve); repeatable")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds allowed for sidecar serve to start (default 300)")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = "20000" if args.quick else "100000,1000000"
    if args.queries is None:
        args.queries = 100 if args.quick else 500
    if args.recall_queries is None:
        args.recall_queries = 300 if args.quick else 1000
    try:
        args.size_list = [int(x) for x in args.sizes.split(",") if x.strip()]
        args.ef_values = [int(x) for x in args.ef.split(",") if x.strip()]
    except ValueError:
        p.error("--sizes and --ef must be integers separated by commas")
    if not args.size_list or min(args.size_list) < 1000:
        p.error("--sizes must be at least 1000")
    if min(args.queries, args.recall_queries) < 10 or min(args.ef_values or [1]) < K:
        p.error(f"--queries and --recall-queries must be >= 10, --ef values >= {K}")
    args.sidecar_overrides = sidecar_overrides(p, args.sidecar_set)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), (ECHOSCU,), "bench-query-", _main)


def _main(args: argparse.Namespace, work: Path) -> int:
    from importlib import metadata

    from sidecar.embeddings.model import load_embedder

    args.sidecar_exe = find_sidecar()
    facts = machine_facts(work)
    for dist in ("hnswlib", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            facts["packages"][dist] = metadata.version(dist)
    probe = load_cfg(work / "probe.yaml", base_config(work / "probe"), args.sidecar_overrides)
    embedder = load_embedder(probe.embedding)
    if embedder.dim != DIM:
        raise BenchError(f"the configured model gives {embedder.dim}-d vectors, this "
                         f"benchmark generates {DIM}-d")
    model_id = embedder.model_id
    del embedder
    print_header(
        "query", facts, work, args,
        f"sizes {args.size_list} slice vectors; {args.queries} timed queries per kind; "
        f"recall over 3 x {args.recall_queries} queries; "
        f"index m {probe.index.m}, ef_construction {probe.index.ef_construction}, "
        f"ef_search {probe.index.ef_search}; front doors up to {args.serve_max} vectors; "
        f"model id {model_id}; OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}",
    )
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for n in args.size_list:
        need = n * BYTES_PER_VECTOR
        avail = mem_available()
        log()
        if need > avail:
            msg = (f"{n} vectors skipped: ~{need / 2**30:.1f} GiB needed, "
                   f"{avail / 2**30:.1f} GiB available")
            log(msg)
            skipped.append(msg)
            continue
        log(f"Index of {n} slice vectors")
        t0 = time.perf_counter()
        results.append(run_size(n, args, work, model_id))
        results[-1]["seconds"] = time.perf_counter() - t0
        log("  load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    facts["loadavg_end"] = os.getloadavg()
    log()
    for line in goal_lines(results) + skipped:
        log(line)
    log("  load average at end: " + " ".join(f"{x:.2f}" for x in facts["loadavg_end"]))
    if args.json:
        result = {"benchmark": "query", "date": dt.datetime.now(dt.UTC).isoformat(),
                  "machine": facts, "params": {
                      "sizes": args.size_list, "queries": args.queries,
                      "recall_queries": args.recall_queries, "ef": args.ef_values,
                      "seed": args.seed, "k": K, "model_id": model_id,
                      "sidecar_overrides": args.sidecar_overrides},
                  "results": results, "skipped": skipped}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"  results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
