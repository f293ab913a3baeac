"""Embedding benchmark: end-to-end slices/s of the worker, and ingest with the worker busy.

Run with ``make bench-embed`` (or ``.venv/bin/python bench/embed.py --quick`` for a
fast check). It reuses the helpers of ``bench/ingest.py`` (phantom, DCMTK sender,
receiver start-up and verification, CPU accounting, machine facts) and has two parts.

Part A: embedding throughput (in this process)
----------------------------------------------
1. Generates ``--slices`` (default 400) synthetic CT instances, 512x512 uint16,
   Explicit VR Little Endian, in at least 4 series of about ``--series-size``
   (default 100) slices 1 mm apart, two series per study, and stores them with
   ``InstanceStore`` (the code path of C-STORE and ``sidecar ingest``) into a
   temporary data directory; ``storage.fsync`` is off for this set-up only
   (untimed; the worker's own SQLite commits are ``synchronous=FULL`` whatever
   it says). The studies are marked stable with ``Repository.mark_stable_studies``.
2. Builds ``sidecar.service.app.Embedding(config, engine)`` with the REAL built-in model
   and ``preprocess.slice_spacing_mm: 0``, ``max_slices_per_series`` >= the
   largest series, so EVERY slice is embedded; other settings are the schema
   defaults (``embedding.threads`` 1 unless ``--threads``, batch 32, input 128,
   ``worker.batch_instances`` 64). After one untimed CNN warm-up batch, times
   ``worker.run_once()`` in a loop until it finds nothing due: decode → window →
   resample → CNN → one DB commit per series → index add, all of it.
3. Verifies: every instance embedded, none failed, vectors in the database ==
   index size == slices. Then requeues (what ``sidecar reindex --reembed``
   does: vectors deleted, index emptied, instances pending again) and repeats,
   ``--repeats`` passes in all (default 3).
4. Reports slices/s (median, min-max), and the per-stage breakdown of the median
   pass from ``WorkStats.stage_seconds`` (ms per slice and % of the wall time);
   "other" is the wall time no stage accounts for (due-series queries, the loop).
   For reference it also times, outside the worker, ``dcmread`` + ``prepare`` on
   the same files and the CNN alone (``embedder.embed`` on the prepared arrays,
   median of 3) at ``--threads`` and at 2 threads.

Part B: ingest with the worker busy vs idle (``sidecar serve`` subprocesses)
----------------------------------------------------------------------------
1. Builds a backlog template once: a data directory holding M instances
   (studies of two ``--series-size`` series, stored as in part A), all studies
   marked stable. M is ``--backlog`` or, by default, sized from part A's rate
   and the ingest time so that the worker cannot finish it during a run; before
   each busy run it is re-checked against the measured times and grown if short.
2. For each repeat and association count (1 and 4), two runs, alternately:
   *idle* (``worker.enabled: false``), then *busy* (``worker.enabled: true``).
   Each run starts ``sidecar serve`` on a fresh copy of the template (stored files
   hard-linked, database copied): the same M backlog instances either way.
   Configuration (the rest: schema defaults, e.g. ``dicom.receiver_processes`` 0 =
   one per core, ``storage.fsync: true``): ``embedding.threads`` 1,
   ``stability.stable_age`` 3600 s (the new study never becomes stable, so the
   worker only works on the backlog), ``preprocess`` as in part A (every slice),
   ``worker.interval`` 0.1 s (``--worker-interval``): a job run handles one
   series (``batch_instances`` 64 < series size) and the next starts at the next
   tick, so the worker is busy nearly all the time. This is the worst case for
   ingest: at the shipped ``worker.interval`` of 5 s the worker idles between
   runs. Busy runs wait until the worker has committed its first series.
3. ``sidecar status --json`` is read just before the timed ingest and just after
   it (outside the timing): the backlog's pending count after the ingest must be
   > 0, i.e. the worker still had work when the ingest ended. Otherwise the pair
   is repeated with a backlog twice as large (at most twice, then the benchmark
   fails). The database is also read directly at the start and end of the timed
   ingest: slices the worker embedded meanwhile (it commits whole series, so this
   count moves in steps of ``--series-size``).
4. Times DCMTK ``storescu`` (``TCP_NODELAY=1``, ``--max-send-pdu 131072``, 1 or 4
   parallel associations, files split as in ``bench/ingest.py``) sending
   ``--count`` (default 500) fresh instances of a NEW study (one series), from the
   first launch to the last exit. Verifies as ``bench/ingest.py`` does: the set of
   new SOP Instance UIDs received equals the set sent, files compared byte for
   byte, nothing quarantined or left in ``.tmp``; ``sidecar status`` counts
   M + count instances, no failures, and (busy) as many vectors as embedded
   instances.
5. Reports instances/s idle vs busy (median, min-max) and the ratio busy/idle of
   the medians per association count, with the CPU of the receiver processes,
   of the serve main process (the worker) and of other processes.

Goals (from the issue): >= 100 slices/s end-to-end (part A, ``--threads``), and
ingest with the worker busy >= 0.8 of ingest with it idle (each association
count). Both print "goal ... MET / NOT MET"; the exit code is 0 either way (1
only when the benchmark itself failed, e.g. a lost instance).

Every process started here is stopped and every temporary directory removed,
also on error and on Ctrl-C/SIGTERM. ``SIDECAR__*`` and ``SIDECAR_CONFIG`` in the
environment are ignored; ``--sidecar-set section.key=value`` overrides a setting
deliberately in both parts (printed in the report).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import logging
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import (  # noqa: E402  (bench/ is not a package)
    COLS,
    ECHOSCU,
    MAX_PDU,
    ROWS,
    STORESCU,
    BenchError,
    Instance,
    SidecarServe,
    _self_cpu,
    _template,
    find_sidecar,
    log,
    machine_busy,
    machine_facts,
    partition,
    print_header,
    run_benchmark,
    send,
    sidecar_env,
    sidecar_overrides,
    tail,
    tree_cpu,
    tree_snapshot,
    verify,
)

GOAL_SLICES_PER_S = 100.0
GOAL_RATIO = 0.8
STABLE_AGE = 3600.0  # Part B: the study being received never becomes stable
SERIES_PER_STUDY = 2
MAX_ENLARGEMENTS = 2
NOISY_PCT = 25  # "other" CPU above this % of a core: a noisy run
STAGES = (  # WorkStats.stage_seconds keys, in pipeline order
    ("sample", "read headers + sampling"),
    ("preprocess", "decode + window + resample"),
    ("cnn", "CNN"),
    ("db", "DB commit (+ series/study means)"),
    ("index", "index add"),
)


class BacklogExhausted(RuntimeError):
    """The worker finished the backlog before the timed ingest ended."""


# ------------------------------------------------------------- generation
class Phantom:
    """Slices of the phantom of bench/ingest.py (body ellipse, sphere, noise)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
        self.body = ((xx - 256) / 200) ** 2 + ((yy - 256) / 150) ** 2 <= 1.0
        self.base = np.where(self.body, 1024 + 40, 1024 - 1000).astype(np.uint16)
        self.r2 = (xx - 300) ** 2 + (yy - 220) ** 2
        self.pool = rng.integers(0, 40, size=ROWS * COLS * 2, dtype=np.uint16)
        self.rng = rng

    def slice(self, z: float) -> np.ndarray:
        img = self.base.copy()
        img[(self.r2 <= max(0.0, 80.0**2 - (z * 0.8) ** 2)) & self.body] = 1024 + 300
        off = int(self.rng.integers(0, ROWS * COLS))
        img += self.pool[off : off + ROWS * COLS].reshape(ROWS, COLS)
        return img


def series_sizes(total: int, series_size: int, min_series: int = 1) -> list[int]:
    """Split ``total`` slices into series of about ``series_size`` (at least ``min_series``)."""
    n = min(total, max(min_series, math.ceil(total / series_size)))
    return [len(c) for c in np.array_split(np.arange(total), n)]


def iter_instances(tag: str, seed: int, sizes: Sequence[int],
                   phantom: Phantom) -> Iterator[tuple[str, bytes]]:
    """(SOP Instance UID, Part-10 bytes) for series of ``sizes`` slices, 2 per study.

    Deterministic for (tag, seed). The slices of one series are computed once per
    distinct series length and shared by the series of that length (pixels do not
    change the cost of anything measured here; UIDs and positions differ).
    """
    ns = f"pacs-sidecar bench/embed {tag} seed={seed}"
    cache: dict[int, list[bytes]] = {}
    for s, n in enumerate(sizes):
        st = s // SERIES_PER_STUDY
        study_uid = generate_uid(entropy_srcs=[ns, f"study {st}"])
        series_uid = generate_uid(entropy_srcs=[ns, f"series {s}"])
        ds = _template(study_uid, series_uid, generate_uid(entropy_srcs=[ns, f"frame {st}"]))
        ds.PatientName = "BENCH^EMBED"
        ds.PatientID = f"BENCH-EMBED-{tag}-{st}"[:64]
        ds.AccessionNumber = f"BE{seed % 1000:03d}{st:06d}"[:16]
        ds.StudyDescription = "embedding benchmark"
        ds.StudyID = str(st + 1)
        ds.SeriesNumber = s % SERIES_PER_STUDY + 1
        if n not in cache:
            cache[n] = [phantom.slice(k - n / 2).astype("<u2").tobytes() for k in range(n)]
        for k in range(n):
            z = round(k - n / 2, 1)
            uid = generate_uid(entropy_srcs=[ns, f"instance {s}/{k}"])
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [-179.2, -179.2, z]
            ds.SliceLocation = z
            ds.PixelData = cache[n][k]
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            yield uid, buf.getvalue()


def write_files(out: Path, items: Iterator[tuple[str, bytes]]) -> list[Instance]:
    out.mkdir(parents=True)
    instances = []
    for i, (uid, data) in enumerate(items):
        path = out / f"{i + 1:06d}.dcm"
        path.write_bytes(data)
        instances.append(Instance(uid, path))
    return instances


# ------------------------------------------------------------ configuration
def preprocess_section(max_series: int) -> dict[str, Any]:
    """Every slice embedded: no spacing-based sampling, cap >= the largest series."""
    return {"slice_spacing_mm": 0, "max_slices_per_series": max(32, max_series)}


def load_cfg(path: Path, data: dict[str, Any], overrides: dict[str, str]) -> Any:
    from sidecar.config import load_config

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path, environ=overrides)  # only the deliberate overrides


def store_all(cfg: Any, items: Iterator[tuple[str, bytes]]) -> tuple[set[str], int]:
    """Store Part-10 byte strings with InstanceStore and mark every study stable."""
    from sidecar.archive.store import InstanceStore, Origin, Outcome
    from sidecar.db.connect import open_catalogue
    from sidecar.db.repository import utcnow

    engine, repo = open_catalogue(cfg)
    try:
        store = InstanceStore(cfg, repo)
        origin = Origin(ae_title="BENCHSETUP", host="bench")
        uids = set()
        for uid, data in items:
            res = store.store(data, None, origin)
            if res.outcome is not Outcome.STORED:
                raise BenchError(f"set-up store of {uid}: {res.outcome}")
            uids.add(uid)
        stable = repo.mark_stable_studies(1.0, now=utcnow() + dt.timedelta(days=1))
    finally:
        engine.dispose()
    return uids, stable


# ------------------------------------------------------------------ part A
@dataclass
class PassResult:
    repeat: int
    slices: int
    seconds: float
    slices_per_s: float
    job_runs: int
    series: int
    stage_seconds: dict[str, float]
    other_cpu_pct: float


def part_a(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from pydicom import dcmread

    from sidecar.db.connect import open_catalogue
    from sidecar.embeddings import preprocess
    from sidecar.embeddings.model import load_weights
    from sidecar.embeddings.worker import WorkStats
    from sidecar.service.lifecycle import Embedding

    root = work / "part-a"
    root.mkdir()
    sizes = series_sizes(args.slices, args.series_size, min_series=4)
    n = args.slices
    data = {
        "storage": {"data_dir": str(root / "data"), "min_free_mb": 16, "fsync": False},
        "preprocess": preprocess_section(max(sizes)),
        "embedding": {"threads": args.threads},
        "logging": {"level": "WARNING"},
    }
    cfg = load_cfg(root / "sidecar.yaml", data, args.sidecar_overrides)
    t0 = time.perf_counter()
    uids, stable = store_all(cfg, iter_instances("a", args.seed, sizes, Phantom(args.seed)))
    os.sync()
    log(f"  generated and stored {len(uids)} CT instances 512x512 in {len(sizes)} series "
        f"({', '.join(map(str, sizes))} slices, 1 mm apart) of {stable} studies in "
        f"{time.perf_counter() - t0:.1f} s")

    # The built-in weights are untrained (a WARNING at every load): say it once here.
    logging.getLogger("sidecar.embeddings.model").setLevel(logging.ERROR)
    _, winfo = load_weights(None)
    engine, repo = open_catalogue(cfg)
    emb = Embedding(cfg, engine)
    passes: list[PassResult] = []
    try:
        emb.open()
        model_id = emb.embedder.model_id
        size = emb.embedder.input_size
        log(f"  model: built-in {winfo.path.name} (trained={winfo.trained}), id {model_id}, "
            f"input {size}x{size}, dim {emb.embedder.dim}; embedding.threads "
            f"{cfg.embedding.threads} (torch {torch.get_num_threads()}), batch "
            f"{cfg.embedding.batch_size}; worker.batch_instances {cfg.worker.batch_instances}; "
            f"preprocess slice_spacing_mm {cfg.preprocess.slice_spacing_mm}, "
            f"max_slices_per_series {cfg.preprocess.max_slices_per_series}, "
            f"pixel_spacing_mm {cfg.preprocess.pixel_spacing_mm}")
        warm = np.random.default_rng(0).random((cfg.embedding.batch_size, size, size))
        emb.embedder.embed(warm.astype(np.float32))  # untimed warm-up

        for rep in range(1, args.repeats + 1):
            if rep > 1:  # what `sidecar reindex --reembed` does
                requeued = emb.vectors.requeue(model_id)
                emb.index.rebuild()
                if requeued != n:
                    raise BenchError(f"requeue gave {requeued} instances, expected {n}")
            os.sync()
            total = WorkStats()
            runs = 0
            busy0, _ = machine_busy()
            self0 = _self_cpu()
            start = time.perf_counter()
            while True:
                stats = emb.worker.run_once()
                runs += 1
                total.merge(stats)
                if stats.series == 0:
                    break
            wall = time.perf_counter() - start
            busy1, _ = machine_busy()
            self1 = _self_cpu()
            problems = []
            if total.slices_embedded != n or total.instances_embedded != n:
                problems.append(f"worker embedded {total.slices_embedded} slices of "
                                f"{total.instances_embedded} instances, expected {n} and {n}")
            if total.instances_failed:
                problems.append(f"{total.instances_failed} instances failed")
            vectors = emb.vectors.count_vectors().get(model_id, 0)
            if vectors != n:
                problems.append(f"{vectors} vectors in the database, expected {n}")
            if len(emb.index.index) != n:
                problems.append(f"index holds {len(emb.index.index)} vectors, expected {n}")
            states = {k: v for k, v in repo.status().instances_by_state.items() if v}
            if states != {"embedded": n}:
                problems.append(f"instance states {states}, expected {{'embedded': {n}}}")
            if problems:
                raise BenchError("part A verification failed:\n  - " + "\n  - ".join(problems))
            other = max(0.0, (busy1 - busy0) - (self1 - self0))
            p = PassResult(rep, n, wall, n / wall, runs, total.series,
                           dict(total.stage_seconds), 100 * other / wall)
            passes.append(p)
            log(f"  pass {rep}: {n} slices in {wall:6.2f} s = {p.slices_per_s:6.1f} slices/s "
                f"({runs} job runs, {total.series} series); other processes "
                f"{p.other_cpu_pct:3.0f}% of a core; verified: {vectors} vectors in the "
                f"database, {len(emb.index.index)} in the index")

        # References outside the worker: prepare alone, CNN alone.
        paths = sorted(cfg.storage_dir.rglob("*.dcm"))
        t0 = time.perf_counter()
        arrays = [preprocess.prepare(dcmread(p), cfg.preprocess, size)[0] for p in paths]
        prep_s = time.perf_counter() - t0
        batch = np.stack(arrays).astype(np.float32)
        cnn: dict[int, float] = {}
        configured = torch.get_num_threads()
        try:
            for threads in sorted({configured, 2}):
                torch.set_num_threads(threads)
                emb.embedder.embed(batch[: cfg.embedding.batch_size])
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    emb.embedder.embed(batch)
                    times.append(time.perf_counter() - t0)
                cnn[threads] = len(batch) / statistics.median(times)
        finally:
            torch.set_num_threads(configured)
    finally:
        emb.close()
        engine.dispose()
        shutil.rmtree(root, ignore_errors=True)

    rates = [p.slices_per_s for p in passes]
    med = statistics.median(rates)
    mid = min(passes, key=lambda p: abs(p.slices_per_s - med))
    log()
    log(f"  end-to-end (worker.run_once until nothing is due, {n} slices, "
        f"embedding.threads {args.threads}): median {med:.1f} slices/s "
        f"(min {min(rates):.1f}, max {max(rates):.1f}, {len(passes)} pass(es))")
    log(f"  per-stage breakdown of pass {mid.repeat} ({mid.seconds:.2f} s):")
    log(f"    {'stage':<34} {'ms/slice':>9} {'% of wall':>9}")
    accounted = 0.0
    breakdown = []
    for key, label in STAGES:
        s = mid.stage_seconds.get(key, 0.0)
        accounted += s
        breakdown.append({"stage": key, "label": label, "seconds": s,
                          "ms_per_slice": 1000 * s / n, "pct": 100 * s / mid.seconds})
        log(f"    {label:<34} {1000 * s / n:9.2f} {100 * s / mid.seconds:9.1f}")
    rest = max(0.0, mid.seconds - accounted)
    breakdown.append({"stage": "other", "label": "other (due-series queries, loop)",
                      "seconds": rest, "ms_per_slice": 1000 * rest / n,
                      "pct": 100 * rest / mid.seconds})
    log(f"    {'other (due-series queries, loop)':<34} {1000 * rest / n:9.2f} "
        f"{100 * rest / mid.seconds:9.1f}")
    log(f"    {'total':<34} {1000 * mid.seconds / n:9.2f} {100.0:9.1f}")
    log(f"  reference, outside the worker: dcmread + prepare alone "
        f"{1000 * prep_s / n:.2f} ms/slice ({n / prep_s:.0f} slices/s, one core); CNN alone "
        f"(embed on the prepared arrays, median of 3): "
        + ", ".join(f"{r:.0f} slices/s at {t} thread{'s' if t > 1 else ''}"
                    for t, r in sorted(cnn.items())))
    if any(p.other_cpu_pct > NOISY_PCT for p in passes):
        log(f"  note: other processes used > {NOISY_PCT}% of a core during "
            f"{sum(p.other_cpu_pct > NOISY_PCT for p in passes)} of {len(passes)} pass(es)")
    met = med >= GOAL_SLICES_PER_S
    goal_line = (f"goal end-to-end >= {GOAL_SLICES_PER_S:.0f} slices/s (512x512 CT, every slice, "
                 f"embedding.threads {args.threads}): {med:.1f} slices/s  "
                 f"{'MET' if met else 'NOT MET'}")
    return {
        "slices": n, "series_sizes": sizes, "model_id": model_id,
        "weights": winfo.path.name, "weights_trained": winfo.trained,
        "threads": args.threads, "batch_size": cfg.embedding.batch_size,
        "input_size": size, "passes": [asdict(p) for p in passes],
        "median_slices_per_s": med, "min_slices_per_s": min(rates),
        "max_slices_per_s": max(rates), "breakdown_pass": mid.repeat,
        "breakdown": breakdown, "prepare_only_ms_per_slice": 1000 * prep_s / n,
        "cnn_only_slices_per_s": {str(k): v for k, v in cnn.items()},
        "goal": GOAL_SLICES_PER_S, "met": met, "goal_line": goal_line,
    }


# ------------------------------------------------------------------ part B
class Backlog:
    """A data directory with M stored instances of stable studies, cloned per run."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.root.mkdir(parents=True)
        self.data_dir = root / "data"
        self.args = args
        self.uids: set[str] = set()
        self.studies = 0
        self.series = 0
        self.batches = 0
        self.phantom = Phantom(args.seed + 1)

    @property
    def size(self) -> int:
        return len(self.uids)

    def grow_to(self, target: int) -> None:
        unit = self.args.series_size * SERIES_PER_STUDY
        extra = max(0, math.ceil((target - self.size) / unit)) * unit
        if extra == 0:
            return
        sizes = [self.args.series_size] * (extra // self.args.series_size)
        t0 = time.perf_counter()
        data = {
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 16, "fsync": False},
            "logging": {"level": "WARNING"},
        }
        cfg = load_cfg(self.root / "setup.yaml", data, self.args.sidecar_overrides)
        self.batches += 1
        items = iter_instances(f"backlog{self.batches}", self.args.seed, sizes, self.phantom)
        uids, stable = store_all(cfg, items)
        self.uids |= uids
        self.studies += stable
        self.series += len(sizes)
        os.sync()
        log(f"  backlog: {self.size} instances ({self.series} series of "
            f"{self.args.series_size}, {self.studies} stable studies; +{len(uids)} in "
            f"{time.perf_counter() - t0:.1f} s)")

    def clone(self, dst: Path) -> None:
        """Stored files hard-linked (never modified in place), database copied."""
        def copy(src: str, dst_: str) -> object:
            if Path(src).name.startswith("sidecar.db"):
                return shutil.copy2(src, dst_)
            os.link(src, dst_)
            return dst_

        shutil.copytree(self.data_dir, dst, copy_function=copy)


class BenchServe(SidecarServe):
    """``sidecar serve`` on a backlog copy, worker enabled (busy) or disabled (idle)."""

    def __init__(self, run_dir: Path, args: argparse.Namespace, busy: bool,
                 backlog: Backlog, max_series: int) -> None:
        super().__init__(run_dir, args.ready_timeout, args.sidecar_exe, args.sidecar_overrides)
        self.busy = busy
        self.args = args
        self.backlog_uids = set(backlog.uids)
        self.backlog_studies = backlog.studies
        self.max_series = max_series

    def command(self) -> list[str]:
        cfg = {
            "dicom": {"ae_title": self.ae_title, "bind_address": "127.0.0.1",
                      "port": self.port},
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 16, "fsync": True},
            "stability": {"stable_age": STABLE_AGE},
            "preprocess": preprocess_section(self.max_series),
            "embedding": {"threads": self.args.threads},
            "worker": {"enabled": self.busy, "interval": self.args.worker_interval},
            "logging": {"level": "WARNING"},
        }
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return [str(self.exe), "--config", str(self.config_path), "serve"]

    def status_json(self) -> dict[str, Any]:
        try:
            res = subprocess.run(
                [str(self.exe), "--config", str(self.config_path), "status", "--json"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                env=sidecar_env(self.overrides), timeout=120,
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError("sidecar status --json timed out") from exc
        if res.returncode != 0:
            raise BenchError(f"sidecar status --json failed ({res.returncode}): "
                             f"{res.stderr.strip()[-2000:]}")
        status: dict[str, Any] = json.loads(res.stdout)
        return status

    def received(self) -> dict[str, Path]:
        """The new instances only (the backlog's files are there from the start)."""
        return {k: v for k, v in super().received().items() if k not in self.backlog_uids}

    def extra_checks(self, expected: int) -> list[str]:
        problems = []
        leftovers = [p for p in (self.data_dir / "storage" / ".tmp").glob("*") if p.is_file()]
        if leftovers:
            problems.append(f"{len(leftovers)} temporary file(s) left in storage/.tmp")
        quarantined = [p for p in (self.data_dir / "quarantine").glob("*") if p.is_file()]
        if quarantined:
            problems.append(f"{len(quarantined)} file(s) in quarantine")
        backlog_files = len(SidecarServe.received(self)) - len(self.received())
        if backlog_files != len(self.backlog_uids):
            problems.append(f"{backlog_files} backlog files, expected {len(self.backlog_uids)}")
        try:
            st = self.status_json()
        except BenchError as exc:
            return [*problems, str(exc)]
        self.status = st
        want = len(self.backlog_uids) + expected
        if st["instances_total"] != want:
            problems.append(f"sidecar status: instances_total {st['instances_total']} != "
                            f"{want} ({st['instances']})")
        if st["studies"] != self.backlog_studies + 1:
            problems.append(f"sidecar status: {st['studies']} studies, expected "
                            f"{self.backlog_studies + 1}")
        if st["failed_retrying"] or st["failed_given_up"]:
            problems.append(f"sidecar status: {st['failed_retrying']} failed (retrying), "
                            f"{st['failed_given_up']} given up")
        embedded = st["instances"].get("embedded", 0)
        vectors = sum(st["vectors_by_model"].values())
        if vectors != embedded:
            problems.append(f"sidecar status: {vectors} vectors for {embedded} embedded "
                            "instances (one slice each: expected equal)")
        if not self.busy and embedded:
            problems.append(f"worker disabled but {embedded} instances embedded")
        return problems


def db_counts(db: Path) -> tuple[int, int]:
    """(slice vectors, pending instances of stable studies), read-only."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        vectors = con.execute("SELECT count(*) FROM slice_vector").fetchone()[0]
        pending = con.execute(
            "SELECT count(*) FROM instance i JOIN series s ON i.series_pk = s.id "
            "JOIN study t ON s.study_pk = t.id WHERE t.stable AND i.state = 'pending'"
        ).fetchone()[0]
    finally:
        con.close()
    return int(vectors), int(pending)


def log_notes(path: Path) -> tuple[int, int, list[str]]:
    """(scheduler notices, untrained-weights notices, other warnings/errors) in a log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return 0, 0, []
    sched = weights = 0
    other = []
    for line in lines:
        if not (" WARNING " in line or " ERROR " in line or "Traceback" in line):
            continue
        if " apscheduler" in line:
            sched += 1  # e.g. "skipped: maximum number of running instances reached"
        elif "NOT TRAINED" in line:
            weights += 1
        else:
            other.append(line)
    return sched, weights, other


@dataclass
class IngestRun:
    mode: str
    associations: int
    repeat: int
    count: int
    seconds: float
    instances_per_s: float
    receivers_cpu_pct: float
    main_cpu_pct: float
    senders_cpu_pct: float
    other_cpu_pct: float
    backlog: int
    backlog_pending_before: int
    backlog_pending_after: int
    backlog_pending_at_end_of_ingest: int
    slices_embedded_during_ingest: int
    worker_slices_per_s: float
    start_to_ingest_s: float
    status_after_s: float
    serve_exit_code: int | None
    scheduler_notices: int
    log_problems: int
    loadavg_1m: float
    started_at: str


def ingest_run(mode: str, assoc: int, repeat: int, dirs: Sequence[Path],
               instances: Sequence[Instance], backlog: Backlog, max_series: int,
               work: Path, args: argparse.Namespace, run_no: str) -> IngestRun:
    busy = mode == "busy"
    run_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-x{assoc}-r{repeat}-", dir=work))
    receiver = BenchServe(run_dir, args, busy, backlog, max_series)
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        backlog.clone(receiver.data_dir)
        db = receiver.data_dir / "sidecar.db"
        os.sync()
        launched = time.perf_counter()
        receiver.start()
        assert receiver.proc is not None
        pid = receiver.proc.pid
        if busy:  # the worker has committed its first series
            deadline = time.monotonic() + args.ready_timeout
            while db_counts(db)[0] == 0:
                if receiver.proc.poll() is not None:
                    raise BenchError(f"sidecar died (exit code {receiver.proc.returncode}); "
                                     f"log:\n{tail(receiver.log_path)}")
                if time.monotonic() > deadline:
                    raise BenchError("the worker embedded nothing within "
                                     f"{args.ready_timeout:.0f} s; log:\n"
                                     f"{tail(receiver.log_path)}")
                time.sleep(0.05)
        st0 = receiver.status_json()
        pending_before = int(st0["instances"].get("pending", 0))
        os.sync()
        v0, _ = db_counts(db)
        snap0 = tree_snapshot(pid)
        busy0, _ = machine_busy()
        self0 = _self_cpu()
        start_to_ingest = time.perf_counter() - launched
        wall, senders_cpu = send(receiver, dirs, run_dir, args.timeout)
        busy1, _ = machine_busy()
        self1 = _self_cpu()
        snap1 = tree_snapshot(pid)
        v1, pending_t1 = db_counts(db)
        load1 = os.getloadavg()[0]
        t0 = time.perf_counter()
        st1 = receiver.status_json()
        status_after_s = time.perf_counter() - t0
        pending_after = int(st1["instances"].get("pending", 0)) - len(instances)
        if receiver.proc.poll() is not None:
            raise BenchError(f"sidecar died during the run (exit code "
                             f"{receiver.proc.returncode}); log:\n{tail(receiver.log_path)}")
        total_cpu = tree_cpu(snap0, snap1)
        main_cpu = snap1.times.get(pid, 0.0) - snap0.times.get(pid, 0.0)
        receiver.stop()
        verify(receiver, instances, run_no)
        sched, _, problems = log_notes(receiver.log_path)
        if problems:
            log(f"    {len(problems)} warning/error line(s) in the sidecar log, first: "
                f"{problems[0][:300]}")
        other = max(0.0, (busy1 - busy0) - total_cpu - senders_cpu - (self1 - self0))
        if busy and pending_after <= 0:
            raise BacklogExhausted(
                f"backlog pending after the ingest {pending_after} (at its end "
                f"{pending_t1}) of {backlog.size}")
        return IngestRun(
            mode=mode, associations=assoc, repeat=repeat, count=len(instances),
            seconds=wall, instances_per_s=len(instances) / wall,
            receivers_cpu_pct=100 * (total_cpu - main_cpu) / wall,
            main_cpu_pct=100 * main_cpu / wall,
            senders_cpu_pct=100 * senders_cpu / wall,
            other_cpu_pct=100 * other / wall,
            backlog=backlog.size, backlog_pending_before=pending_before,
            backlog_pending_after=pending_after, backlog_pending_at_end_of_ingest=pending_t1,
            slices_embedded_during_ingest=v1 - v0, worker_slices_per_s=(v1 - v0) / wall,
            start_to_ingest_s=start_to_ingest, status_after_s=status_after_s,
            serve_exit_code=receiver.exit_code, scheduler_notices=sched,
            log_problems=len(problems), loadavg_1m=load1, started_at=started_at,
        )
    finally:
        receiver.stop()
        if args.keep:
            log(f"    kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def backlog_needed(rate: float, start_s: float, idle_ingest_s: float, status_s: float) -> int:
    """Instances the worker could embed by the last status read, with margins.

    ``rate`` is its rate alone (part A), the busy ingest is taken as 1.5x the idle
    one, and the whole is x1.3; a shortfall is still caught after the run.
    """
    return math.ceil(1.3 * rate * (start_s + 1.5 * idle_ingest_s + status_s))


def part_b(args: argparse.Namespace, work: Path, rate_a: float) -> dict[str, Any]:
    root = work / "part-b"
    root.mkdir()
    t0 = time.perf_counter()
    instances = write_files(root / "src" / "all", iter_instances(
        "new", args.seed, [args.count], Phantom(args.seed + 2)))
    parts = {a: partition(root / "src", instances, a) for a in args.assoc_counts}
    log(f"  generated {len(instances)} instances of a new study (one series) to send, in "
        f"{time.perf_counter() - t0:.1f} s")
    backlog = Backlog(root / "backlog", args)
    # Timing guesses until measured: start-up to ingest, ingest at 60 inst/s, status read.
    start_s, status_s = 8.0, 2.0
    idle_s: dict[int, float] = {a: args.count / 60.0 for a in args.assoc_counts}
    measured: set[int] = set()
    if args.backlog:
        backlog.grow_to(args.backlog)
    else:
        backlog.grow_to(backlog_needed(rate_a, start_s, max(idle_s.values()), status_s))
    max_series = args.series_size
    runs: list[IngestRun] = []
    enlargements = 0
    total = args.repeats * len(args.assoc_counts) * 2
    n = 0
    log()
    for rep in range(1, args.repeats + 1):
        for a in args.assoc_counts:
            while True:
                pair = []
                for mode in ("idle", "busy"):
                    if mode == "busy" and not args.backlog:
                        need = backlog_needed(rate_a, start_s, idle_s[a], status_s)
                        if need > backlog.size:
                            log(f"  backlog {backlog.size} may be short for this busy run "
                                f"(need ~{need}): growing it")
                            backlog.grow_to(need)
                    n += 1
                    run_no = f"[{n}/{total}]"
                    try:
                        r = ingest_run(mode, a, rep, parts[a], instances, backlog, max_series,
                                       work, args, run_no)
                    except BacklogExhausted as exc:
                        enlargements += 1
                        n -= 2
                        if enlargements > MAX_ENLARGEMENTS:
                            raise BenchError(
                                f"{run_no} busy x{a}: the worker finished the backlog before "
                                f"the ingest ended ({exc}) although it was enlarged "
                                f"{MAX_ENLARGEMENTS} times") from exc
                        log(f"{run_no:>8} busy x{a} rep {rep}: the worker FINISHED THE BACKLOG "
                            f"before the ingest ended ({exc}); doubling the backlog and "
                            "repeating this pair")
                        backlog.grow_to(2 * backlog.size)
                        break
                    pair.append(r)
                    if mode == "idle":
                        idle_s[a] = max(idle_s[a] if a in measured else 0.0, r.seconds)
                        measured.add(a)
                    else:
                        start_s = max(r.start_to_ingest_s, 1.0)
                        status_s = max(r.status_after_s, 1.0)
                    notes = ""
                    if r.serve_exit_code != 0:
                        notes += f"  (serve exit code {r.serve_exit_code} on SIGTERM)"
                    if r.log_problems:
                        notes += f"  log problems {r.log_problems}"
                    worker = (f"  worker: {r.slices_embedded_during_ingest} slices during the "
                              f"ingest ({r.worker_slices_per_s:.0f}/s); backlog pending "
                              f"{r.backlog_pending_before} before -> {r.backlog_pending_after} "
                              "after" if mode == "busy" else "")
                    log(f"{run_no:>8} {mode} x{a} rep {rep}: {r.count} in {r.seconds:6.2f} s = "
                        f"{r.instances_per_s:6.1f} inst/s  CPU% receivers "
                        f"{r.receivers_cpu_pct:3.0f} serve-main {r.main_cpu_pct:3.0f} send "
                        f"{r.senders_cpu_pct:3.0f} other {r.other_cpu_pct:3.0f}{worker}"
                        f"{notes}  verified")
                else:
                    runs.extend(pair)
                    break
    shutil.rmtree(root, ignore_errors=True)
    return summarise_b(runs, args, backlog, enlargements)


def summarise_b(runs: Sequence[IngestRun], args: argparse.Namespace, backlog: Backlog,
                enlargements: int) -> dict[str, Any]:
    log()
    log(f"{'assoc':>5} {'worker':<6} {'median':>8} {'min':>7} {'max':>7} {'runs':>4} "
        f"{'recv CPU%':>9} {'main CPU%':>9} {'other%':>6} {'worker sl/s':>11}  "
        "(instances/s; CPU% of one core)")
    rows = []
    ratios = []
    for a in args.assoc_counts:
        med: dict[str, float] = {}
        for mode in ("idle", "busy"):
            sel = [r for r in runs if r.mode == mode and r.associations == a]
            ips = [r.instances_per_s for r in sel]
            med[mode] = statistics.median(ips)
            row = {
                "associations": a, "mode": mode, "runs": len(sel),
                "median_instances_per_s": med[mode], "min_instances_per_s": min(ips),
                "max_instances_per_s": max(ips),
                "median_receivers_cpu_pct": statistics.median(r.receivers_cpu_pct for r in sel),
                "median_main_cpu_pct": statistics.median(r.main_cpu_pct for r in sel),
                "median_other_cpu_pct": statistics.median(r.other_cpu_pct for r in sel),
                "median_worker_slices_per_s": statistics.median(
                    r.worker_slices_per_s for r in sel),
            }
            rows.append(row)
            log(f"{a:>5} {mode:<6} {med[mode]:8.1f} {min(ips):7.1f} {max(ips):7.1f} "
                f"{len(sel):>4} {row['median_receivers_cpu_pct']:9.0f} "
                f"{row['median_main_cpu_pct']:9.0f} {row['median_other_cpu_pct']:6.0f} "
                f"{row['median_worker_slices_per_s']:11.0f}")
        paired = []
        quiet = []
        for rep in range(1, args.repeats + 1):
            pi = [r for r in runs if r.associations == a and r.repeat == rep]
            idle = [r for r in pi if r.mode == "idle"]
            busy = [r for r in pi if r.mode == "busy"]
            if idle and busy:
                x = busy[-1].instances_per_s / idle[-1].instances_per_s
                paired.append(x)
                if max(idle[-1].other_cpu_pct, busy[-1].other_cpu_pct) <= NOISY_PCT:
                    quiet.append(x)
        ratio = med["busy"] / med["idle"]
        ratios.append({"associations": a, "ratio": ratio, "paired_ratios": paired,
                       "quiet_paired_ratios": quiet, "goal": GOAL_RATIO,
                       "met": ratio >= GOAL_RATIO})
    noisy = [r for r in runs if r.other_cpu_pct > NOISY_PCT]
    if noisy:
        log(f"  note: {len(noisy)} of {len(runs)} runs saw other processes use > {NOISY_PCT}% "
            "of a core; the machine was not quiet, trust ratios more than absolute figures")
    for r in ratios:
        if noisy and r["quiet_paired_ratios"]:
            log(f"  ratio busy/idle of the pairs where neither run saw other processes above "
                f"{NOISY_PCT}%, {r['associations']} association(s): "
                + " ".join(f"{x:.2f}" for x in r["quiet_paired_ratios"]))
    lines = []
    for r in ratios:
        a = r["associations"]
        line = (f"goal ingest with the worker busy >= {GOAL_RATIO} of ingest alone, {a} "
                f"association{'s' if a > 1 else ''}: ratio {r['ratio']:.2f} (per repeat: "
                + " ".join(f"{x:.2f}" for x in r["paired_ratios"])
                + f")  {'MET' if r['met'] else 'NOT MET'}")
        r["goal_line"] = line
        lines.append(line)
    return {"rows": rows, "ratios": ratios, "runs": [asdict(r) for r in runs],
            "backlog_instances": backlog.size, "backlog_series_size": args.series_size,
            "backlog_enlargements_after_exhaustion": enlargements, "goal_lines": lines}


# --------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Embedding worker slices/s with a per-stage breakdown (part A), and "
                    "sidecar ingest instances/s with the worker busy vs idle (part B).")
    p.add_argument("--slices", type=int, default=None,
                   help="part A: CT instances (1 slice each) to embed (default 400)")
    p.add_argument("--count", type=int, default=None,
                   help="part B: instances sent per run (default 500)")
    p.add_argument("--repeats", type=int, default=None,
                   help="part A passes and part B repeats of each pair (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="fast check: --slices 120 --count 200 --repeats 1 unless given")
    p.add_argument("--series-size", type=int, default=100,
                   help="slices per series (part A: at least 4 series; backlog) (default 100)")
    p.add_argument("--associations", default="1,4",
                   help="part B: comma-separated association counts (default 1,4)")
    p.add_argument("--threads", type=int, default=1,
                   help="embedding.threads in both parts (default 1, the shipped setting)")
    p.add_argument("--worker-interval", type=float, default=0.1,
                   help="part B: worker.interval of the busy runs, s (default 0.1: "
                        "the worker works nearly all the time)")
    p.add_argument("--backlog", type=int, default=0,
                   help="part B: backlog instances (default 0: sized automatically)")
    p.add_argument("--skip-a", action="store_true", help="skip part A (part B then assumes "
                   "300 slices/s to size the backlog)")
    p.add_argument("--skip-b", action="store_true", help="skip part B")
    p.add_argument("--seed", type=int, default=20240101, help="generation seed")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the results as JSON to PATH")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent of the temporary directories (default: system temp dir)")
    p.add_argument("--sidecar-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a sidecar setting in both parts; repeatable")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds allowed for one run's senders (default 600)")
    p.add_argument("--ready-timeout", type=float, default=120.0,
                   help="seconds allowed for sidecar serve to start (default 120)")
    p.add_argument("--keep", action="store_true",
                   help="keep part B run directories (logs, data) for inspection")
    args = p.parse_args(argv)
    if args.slices is None:
        args.slices = 120 if args.quick else 400
    if args.count is None:
        args.count = 200 if args.quick else 500
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if min(args.slices, args.count, args.repeats, args.series_size, args.threads) < 1:
        p.error("--slices, --count, --repeats, --series-size and --threads must be >= 1")
    if args.worker_interval <= 0:
        p.error("--worker-interval must be > 0")
    try:
        args.assoc_counts = [int(x) for x in args.associations.split(",") if x.strip()]
    except ValueError:
        p.error("--associations must be integers separated by commas")
    if not args.assoc_counts or min(args.assoc_counts) < 1 or max(args.assoc_counts) > 16:
        p.error("--associations must be between 1 and 16")
    if max(args.assoc_counts) > args.count:
        p.error("more associations than instances")
    args.sidecar_overrides = sidecar_overrides(p, args.sidecar_set)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), (STORESCU, ECHOSCU), "bench-embed-", _main)


def _main(args: argparse.Namespace, work: Path) -> int:
    from importlib import metadata

    args.sidecar_exe = find_sidecar()
    facts = machine_facts(work)
    for dist in ("torch", "hnswlib", "SimpleITK", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            facts["packages"][dist] = metadata.version(dist)
    print_header(
        "embedding", facts, work, args,
        f"part A {args.slices} slices x {args.repeats} pass(es); part B {args.count} "
        f"instances, associations {args.assoc_counts}, {args.repeats} repeat(s) of idle then "
        f"busy; embedding.threads {args.threads}; busy worker.interval {args.worker_interval} s",
    )

    result: dict[str, Any] = {"benchmark": "embed",
                              "date": dt.datetime.now(dt.UTC).isoformat(),
                              "machine": facts}
    rate_a = 300.0
    goal_lines = []
    if not args.skip_a:
        log()
        log("Part A: embedding throughput (worker in this process)")
        a = part_a(args, work)
        result["part_a"] = a
        rate_a = a["median_slices_per_s"]
        goal_lines.append(a["goal_line"])
        log("  load average after part A: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if not args.skip_b:
        log()
        log("Part B: ingest (DCMTK storescu -> sidecar serve) with the worker idle vs busy")
        b = part_b(args, work, rate_a)
        result["part_b"] = b
        goal_lines.extend(b["goal_lines"])
    facts["loadavg_end"] = os.getloadavg()
    log()
    for line in goal_lines:
        log(line)
    log("  load average at end: " + " ".join(f"{x:.2f}" for x in facts["loadavg_end"]))
    if args.json:
        result["params"] = {
            "slices": args.slices, "count": args.count, "repeats": args.repeats,
            "series_size": args.series_size, "associations": args.assoc_counts,
            "threads": args.threads, "worker_interval": args.worker_interval,
            "seed": args.seed, "max_send_pdu": MAX_PDU, "stable_age": STABLE_AGE,
            "sidecar_overrides": args.sidecar_overrides,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"  results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
