"""3D benchmark (issue 22): volumes sent as CT/MR series and searched by similarity C-FIND.

Run with ``make bench-3d`` (or ``.venv/bin/python bench/volumes.py --quick``). It
reuses the helpers of ``bench/ingest.py`` (``sidecar serve`` start-up, DCMTK
``storescu`` sender, machine facts) and of ``bench/query.py`` (the C-FIND client).

Part A: the shared 3D set (``../shared/data/medmnist3d/adrenalmnist3d_64.npz``)
-----------------------------------------------------------------------------
1. ``--gallery`` train volumes (default 500) and ``--queries`` volumes of
   ``--split`` (default 150 of ``val``, capped at the split's size; ``--split
   test`` is for the final report only: choose on val), both drawn with
   ``numpy.random.default_rng(--seed)`` (default 0). Each volume is written as one
   CT series of its own study and patient: one CT Image Storage instance per axial
   slice (64), ImagePositionPatient z step 1 mm, PixelSpacing 1\\1, SliceThickness 1,
   stored value v in 0..255 with RescaleSlope 400/255 and RescaleIntercept -160
   (v -> HU = v*400/255 - 160, i.e. 0..255 spans the soft-tissue window W 400 / L 40),
   WindowCenter/Width 40/400, unique UIDs.
2. Gallery and query studies are all sent by ``storescu`` (``--associations``
   parallel associations) to one ``sidecar serve`` (fresh data directory, the
   built-in model, every other setting the product's default except
   ``stability.stable_age`` 2 s, ``stability.check_interval`` 1 s,
   ``worker.interval`` 0.5 s and ``query.max_k`` 1000). The bench waits until
   ``sidecar status --json`` shows every instance received, every study stable,
   nothing pending (and no other ``*pending*`` count above 0), with the same counts
   (instances by state, studies, vectors) at two polls 1 s apart.
3. Every query study is queried by similarity C-FIND at STUDY level ((0099,1002)
   = its Study Instance UID) with top-K (0099,1004) = 10 + the number of query
   studies: the service already leaves out the query's own study; the bench then
   drops the hits that are other query studies (they are references, not the
   gallery) and keeps the first 10. So query studies never count as hits for each
   other, and the ranking is over the same gallery as the raw-voxel baseline.
4. Printed: P@1, P@10 and mAP@10 (Mahbod's AP@10, as in sidecar/lab/metrics.py:
   the mean of P@i over the hits in the top 10, divided by the hits in the top 10,
   0 when there is none) for the product, for raw voxels (centred cosine of the
   64^3 volumes, exact, same gallery and queries) and for a random ranking (P@k =
   the gallery rate of the query's class; mAP@10 by 2000 random rankings per
   query, seed 0); and seconds: send, wait for the worker, per-query C-FIND
   latency (median, p90).

Part B: real series in ``../shared/data/dicom`` and pydicom's test files
-----------------------------------------------------------------------
Every cross-sectional image series (CT, MR, PT, NM) with at least two slice
positions (or a Siemens mosaic, or an Enhanced multi-frame object with per-frame
positions) is kept; copies of one instance in other transfer syntaxes collapse to
one (the uncompressed one first). Each is grouped by modality and anatomy
(BodyPartExamined, else StudyDescription, else what the ImageType/series says; the
reason is printed), sent by pynetdicom as its own study (new Study/Series/SOP
Instance UIDs and Patient ID) to a second ``sidecar serve`` and queried at SERIES
level ((0099,1003)). Per query: its group, the rank of the first series of its
group (or "none in gallery"), the best related and best unrelated scores
(0099,1010), the gap, and the calibrated score (0099,1015) beside each when the
service returns one ("-" otherwise).

Exit code 0 whatever the figures (1 when the benchmark itself failed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import (  # noqa: E402  (bench/ is not a package)
    ECHOSCU,
    REPO,
    STORESCU,
    BenchError,
    Instance,
    SidecarServe,
    _template,
    find_sidecar,
    log,
    machine_facts,
    partition,
    print_header,
    run_benchmark,
    send,
    sidecar_env,
    sidecar_overrides,
    tail,
)
from query import CREATOR, _find_client, _nodelay  # noqa: E402

from sidecar.lab.metrics import (  # noqa: E402
    cosine_ranking,
    mahbod_map_at_k,
    precision_at_k,
    raw_pixel_vectors,
)

SHARED = Path(os.environ.get("SIDECAR_SHARED_DATA", REPO.parent / "shared" / "data"))
ADRENAL = SHARED / "medmnist3d" / "adrenalmnist3d_64.npz"
K = 10
RANDOM_DRAWS = 2000
SLOPE = f"{400 / 255:.12g}"  # stored 0..255 -> HU -160..240: the soft-tissue window
INTERCEPT = "-160"
SCORE, RANK, BEST_SERIES, CALIBRATED = 0x10, 0x11, 0x13, 0x15
CROSS_SECTIONAL = ("CT", "MR", "PT", "NM")


# ------------------------------------------------------------------ serve
class VolumeServe(SidecarServe):
    """``sidecar serve`` with a short stable age and a quick worker, HTTP off."""

    def command(self) -> list[str]:
        cfg = {
            "dicom": {"ae_title": self.ae_title, "bind_address": "127.0.0.1",
                      "port": self.port},
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 16},
            "stability": {"stable_age": 2.0, "check_interval": 1.0},
            "worker": {"interval": 0.5},
            "query": {"max_k": 1000},
            "http": {"enabled": False},
            "logging": {"level": "WARNING"},
        }
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return [str(self.exe), "--config", str(self.config_path), "serve"]

    def status_json(self) -> dict[str, Any]:
        res = subprocess.run(
            [str(self.exe), "--config", str(self.config_path), "status", "--json"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            env=sidecar_env(self.overrides), timeout=120,
        )
        if res.returncode != 0:
            raise BenchError(f"sidecar status --json failed ({res.returncode}): "
                             f"{res.stderr.strip()[-2000:]}")
        status: dict[str, Any] = json.loads(res.stdout)
        return status

    def series_with_vectors(self) -> int:
        """Series holding at least one slice vector (the catalogue, read-only)."""
        con = sqlite3.connect(f"file:{self.data_dir / 'sidecar.db'}?mode=ro", uri=True,
                              timeout=30)
        try:
            return int(con.execute(
                "SELECT count(DISTINCT series_pk) FROM slice_vector").fetchone()[0])
        finally:
            con.close()


def _other_pending(status: dict[str, Any]) -> dict[str, int]:
    """Top-level ``*pending*`` counts above 0 (work the service may add, e.g. series volumes)."""
    return {k: int(v) for k, v in status.items()
            if "pending" in k and isinstance(v, int | float) and v > 0}


def _volumes_on(args: argparse.Namespace) -> bool:
    """Whether the served sidecar builds volume vectors (``--sidecar-set volumes.enabled=true``)."""
    return any(x.replace(" ", "").lower() in ("volumes.enabled=true", "volumes.enabled=1")
               for x in args.sidecar_set)


def _volume_rows(status: dict[str, Any]) -> int:
    vol = status.get("volumes") or {}
    return int(vol.get("built", 0)) + int(vol.get("slice_wise_only", 0))


def wait_for_worker(server: VolumeServe, instances: int, studies: int,
                    timeout: float, volumes: int = 0) -> tuple[float, dict[str, Any]]:
    """Seconds until everything sent is received, stable and embedded (two equal polls).

    ``volumes``: series that get a volume row (vector or refusal) before it counts as done.
    """
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    previous: dict[str, Any] | None = None  # the counts of the last poll that looked done
    last_log = 0.0
    while True:
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise BenchError(f"sidecar died (exit code {server.proc.returncode}); log:\n"
                             f"{tail(server.log_path)}")
        st = server.status_json()
        by_state = st["instances"]
        done = (st["instances_total"] == instances and st["studies"] == studies
                and st["studies_stable"] == studies and by_state.get("pending", 0) == 0
                and not _other_pending(st) and _volume_rows(st) >= volumes)
        seen = {k: st[k] for k in ("instances", "studies", "studies_stable",
                                   "vectors_by_model", "failed_retrying")}
        if done and previous == seen:
            return time.perf_counter() - t0, st
        previous = seen if done else None
        if time.monotonic() > deadline:
            raise BenchError(f"the worker did not finish within {timeout:.0f} s: {by_state}, "
                             f"{st['studies_stable']}/{studies} studies stable; log:\n"
                             f"{tail(server.log_path)}")
        if time.perf_counter() - last_log > 30:
            last_log = time.perf_counter()
            log(f"    waiting: {by_state}, {st['studies_stable']}/{studies} studies stable")
        time.sleep(1.0)


# --------------------------------------------------------------- C-FIND
@dataclass
class Hit:
    uid: str  # the hit's Study (STUDY level) or Series (SERIES level) Instance UID
    score: float
    calibrated: float | None
    rank: int


@dataclass
class Answer:
    status: int
    comment: str
    hits: list[Hit]
    ms: float


def similarity_identifier(level: str, ref_uid: str, k: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    if level == "STUDY":
        ds.StudyInstanceUID = ""
    else:
        ds.SeriesInstanceUID = ""
    blk = ds.private_block(0x0099, CREATOR, create=True)
    blk.add_new(0x02 if level == "STUDY" else 0x03, "UI", ref_uid)
    blk.add_new(0x04, "US", k)
    return ds


def _private(ds: Dataset, offset: int) -> Any:
    try:
        return ds.private_block(0x0099, CREATOR)[offset].value
    except KeyError:
        return None


def similarity_find(assoc: Any, find: str, level: str, ref_uid: str, k: int) -> Answer:
    key = "StudyInstanceUID" if level == "STUDY" else "SeriesInstanceUID"
    t0 = time.perf_counter()
    responses = list(assoc.send_c_find(similarity_identifier(level, ref_uid, k), find))
    ms = 1000 * (time.perf_counter() - t0)
    hits: list[Hit] = []
    final, comment = -1, "no final status"
    for status, ident in responses:
        code = int(getattr(status, "Status", -1)) if status is not None else -1
        if code in (0xFF00, 0xFF01) and ident is not None:
            cal = _private(ident, CALIBRATED)
            hits.append(Hit(str(ident.get(key, "")), float(_private(ident, SCORE)),
                            None if cal is None else float(cal), int(_private(ident, RANK))))
        else:
            final = code
            comment = str(status.get("ErrorComment", "")) if status is not None else comment
    return Answer(final, comment, hits, ms)


@contextlib.contextmanager
def find_association(server: VolumeServe) -> Iterator[tuple[Any, str]]:
    from pynetdicom import evt

    ae, find = _find_client()
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise BenchError(f"cannot associate with sidecar serve; log:\n{tail(server.log_path)}")
    try:
        yield assoc, find
    finally:
        assoc.release()


# ------------------------------------------------------------------ part A
@dataclass
class Volume:
    name: str  # e.g. "train-17"
    label: int
    study_uid: str
    series_uid: str
    query: bool


def write_ct_series(out: Path, vol: np.ndarray, study_uid: str, series_uid: str,
                    patient_id: str, ns: str, description: str,
                    prefix: str = "") -> list[Instance]:
    """One CT instance per axial slice of ``vol`` (z, y, x) in uint8, 1 mm isotropic."""
    out.mkdir(parents=True, exist_ok=True)
    ds = _template(study_uid, series_uid, generate_uid(entropy_srcs=[ns, "frame"]))
    nz, ny, nx = vol.shape
    ds.Rows, ds.Columns = ny, nx
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = "1"
    ds.RescaleSlope = SLOPE
    ds.RescaleIntercept = INTERCEPT
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PatientID = patient_id
    ds.PatientName = "BENCH^VOLUMES"
    ds.AccessionNumber = patient_id[-16:]
    ds.StudyDescription = description
    ds.SeriesDescription = "axial 1 mm"
    ds.Manufacturer = "pacs-sidecar bench/volumes"
    x0, y0 = -(nx - 1) / 2, -(ny - 1) / 2
    instances = []
    for k in range(nz):
        uid = generate_uid(entropy_srcs=[ns, f"instance {k}"])
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [x0, y0, float(k)]
        ds.SliceLocation = float(k)
        ds.PixelData = vol[k].astype("<u2").tobytes()
        path = out / f"{prefix}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instances.append(Instance(uid, path))
    return instances


def choose(n_available: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n_available, size=min(n, n_available), replace=False))


def product_relevance(answers: Sequence[Answer], queries: Sequence[Volume],
                      gallery: dict[str, int], query_uids: set[str]) -> np.ndarray:
    """(Q, K) relevance of each query's first K gallery hits (query studies dropped)."""
    rel = np.zeros((len(queries), K), dtype=bool)
    for i, (ans, q) in enumerate(zip(answers, queries, strict=True)):
        kept = [h for h in ans.hits if h.uid not in query_uids][:K]
        for j, h in enumerate(kept):
            if h.uid not in gallery:
                raise BenchError(f"hit {h.uid} of query {q.name} is neither a gallery nor "
                                 "a query study")
            rel[i, j] = gallery[h.uid] == q.label
    return rel


def raw_voxel_relevance(gal: np.ndarray, gal_labels: np.ndarray, qry: np.ndarray,
                        qry_labels: np.ndarray, k: int = K) -> np.ndarray:
    """(Q, k) relevance of the exact centred-cosine ranking of raw voxels."""
    order, _ = cosine_ranking(raw_pixel_vectors(qry, centre=True),
                              raw_pixel_vectors(gal, centre=True), k=k)
    rel: np.ndarray = gal_labels[order] == qry_labels[:, None]
    return rel


def random_metrics(gal_labels: np.ndarray, qry_labels: np.ndarray,
                   seed: int = 0, draws: int = RANDOM_DRAWS) -> dict[str, float]:
    """Expected P@1, P@10 (gallery class rates) and mAP@10 (random rankings) in percent."""
    rates = np.array([(gal_labels == q).mean() for q in qry_labels])
    rng = np.random.default_rng(seed)
    k = min(K, len(gal_labels))
    aps = []
    for q in qry_labels:
        picks = np.argsort(rng.random((draws, len(gal_labels))), axis=1)[:, :k]
        aps.append(mahbod_map_at_k(gal_labels[picks] == q, k).mean())
    p = 100 * float(rates.mean())
    return {"p@1": p, "p@10": p, "map@10": 100 * float(np.mean(aps))}


def metrics(rel: np.ndarray) -> dict[str, float]:
    k = min(K, rel.shape[1])
    return {"p@1": 100 * float(precision_at_k(rel, 1).mean()),
            "p@10": 100 * float(precision_at_k(rel, k).mean()),
            "map@10": 100 * float(mahbod_map_at_k(rel, k).mean())}


def load_set(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def part_a(args: argparse.Namespace, work: Path, data: dict[str, np.ndarray],
           set_name: str) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    gi = choose(len(data["train_images"]), args.gallery, rng)
    qi = choose(len(data[f"{args.split}_images"]), args.queries, rng)
    gal, gal_labels = data["train_images"][gi], data["train_labels"].ravel()[gi].astype(int)
    qry = data[f"{args.split}_images"][qi]
    qry_labels = data[f"{args.split}_labels"].ravel()[qi].astype(int)
    if len(qi) < args.queries:
        log(f"  note: {args.split} holds {len(qi)} volumes, fewer than --queries "
            f"{args.queries}: all of them are queries")
    src = work / "a-src"
    ns = f"pacs-sidecar bench/volumes {set_name} seed={args.seed}"
    t0 = time.perf_counter()
    vols: list[Volume] = []
    instances: list[Instance] = []
    for arr, labels, idx, split, is_q in ((gal, gal_labels, gi, "train", False),
                                          (qry, qry_labels, qi, args.split, True)):
        for v, lab, i in zip(arr, labels, idx, strict=True):
            name = f"{split}-{int(i)}"
            st = generate_uid(entropy_srcs=[ns, name, "study"])
            se = generate_uid(entropy_srcs=[ns, name, "series"])
            instances += write_ct_series(src / "all", v, st, se, f"BV-{name}",
                                         f"{ns} {name}", f"bench 3D {set_name}",
                                         prefix=f"{len(vols):05d}-")
            vols.append(Volume(name, int(lab), st, se, is_q))
    dirs = partition(src, instances, args.associations)
    log(f"  wrote {len(vols)} CT series ({len(gi)} gallery from train, {len(qi)} queries from "
        f"{args.split}; {len(instances)} instances of {gal.shape[2]}x{gal.shape[3]}) in "
        f"{time.perf_counter() - t0:.1f} s")
    run_dir = work / "a-serve"
    run_dir.mkdir()
    server = VolumeServe(run_dir, args.ready_timeout, args.sidecar_exe, args.sidecar_overrides)
    try:
        server.start()
        send_s, _ = send(server, dirs, run_dir, args.timeout)
        log(f"  sent {len(instances)} instances by storescu ({args.associations} "
            f"association(s)) in {send_s:.1f} s ({len(instances) / send_s:.0f} inst/s)")
        wait_s, st = wait_for_worker(server, len(instances), len(vols), args.worker_timeout,
                                      volumes=len(vols) if _volumes_on(args) else 0)
        with_vectors = server.series_with_vectors()
        log(f"  worker done {wait_s:.1f} s after the last store: {st['instances']}, "
            f"{with_vectors}/{len(vols)} series with slice vectors, vectors "
            f"{st['vectors_by_model']}, failed {st['failed_retrying']} retrying / "
            f"{st['failed_given_up']} given up")
        queries = [v for v in vols if v.query]
        query_uids = {v.study_uid for v in queries}
        gallery = {v.study_uid: v.label for v in vols if not v.query}
        k_req = min(1000, K + len(queries))
        answers = []
        with find_association(server) as (assoc, find):
            for q in queries:
                ans = similarity_find(assoc, find, "STUDY", q.study_uid, k_req)
                if ans.status != 0:
                    raise BenchError(f"C-FIND for {q.name}: status 0x{ans.status:04X} "
                                     f"{ans.comment!r}")
                if q.study_uid in {h.uid for h in ans.hits}:
                    raise BenchError(f"C-FIND for {q.name} returned its own study")
                answers.append(ans)
    finally:
        server.stop()
    short = sum(1 for a in answers if len([h for h in a.hits if h.uid not in query_uids]) < K)
    rows = {
        "product (C-FIND, STUDY level)": metrics(
            product_relevance(answers, queries, gallery, query_uids)),
        "raw voxels (centred cosine)": metrics(
            raw_voxel_relevance(gal, gal_labels, qry, qry_labels)),
        "random ranking (expectation)": random_metrics(gal_labels, qry_labels),
    }
    ms = [a.ms for a in answers]
    log()
    log(f"  {set_name}: {len(gi)} gallery / {len(qi)} queries ({args.split}), seed {args.seed}; "
        f"gallery class rates " + ", ".join(
            f"{c}: {100 * (gal_labels == c).mean():.1f} %" for c in np.unique(gal_labels)))
    log(f"  {'ranking':<32} {'P@1':>6} {'P@10':>6} {'mAP@10':>7}")
    for name, m in rows.items():
        log(f"  {name:<32} {m['p@1']:6.1f} {m['p@10']:6.1f} {m['map@10']:7.1f}")
    log(f"  mAP@10: Mahbod's AP@10 (sidecar.lab.metrics.mahbod_map_at_k). C-FIND top-K "
        f"{k_req} (10 + the {len(queries)} query studies, which are then dropped)"
        + (f"; {short} answer(s) held fewer than {K} gallery hits" if short else ""))
    log(f"  seconds: send {send_s:.1f}, wait for the worker {wait_s:.1f}, C-FIND per query "
        f"median {statistics.median(ms):.0f} ms (p90 {np.percentile(ms, 90):.0f} ms, "
        f"{len(ms)} queries, one association)")
    return {"set": set_name, "gallery": len(gi), "queries": len(qi), "split": args.split,
            "seed": args.seed, "instances": len(instances), "top_k_requested": k_req,
            "metrics": rows, "send_s": send_s, "wait_s": wait_s,
            "cfind_ms_median": statistics.median(ms),
            "cfind_ms_p90": float(np.percentile(ms, 90)), "status": st,
            "series_with_vectors": with_vectors, "series": len(vols),
            "answers_short": short}


# ------------------------------------------------------------------ part B
LOSSLESS_FIRST = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")


@dataclass
class RealSeries:
    source: str  # folder or file of the first instance, relative to its root
    modality: str
    group: str
    reason: str
    files: list[Path]
    frames: int
    positions: int
    study_uid: str = ""
    series_uid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def dicom_roots() -> list[tuple[str, Path]]:
    import pydicom.data

    roots = [("shared", SHARED / "dicom"),
             ("pydicom", Path(pydicom.data.__file__).parent / "test_files")]
    with contextlib.suppress(ImportError):
        import pydicom_data  # type: ignore[import-not-found]  # noqa: PLC0415 - optional

        roots.append(("pydicom-data", Path(pydicom_data.__file__).parent))
    return [(n, p) for n, p in roots if p.is_dir()]


def _positions(ds: Dataset) -> set[tuple[float, ...]]:
    if "PerFrameFunctionalGroupsSequence" in ds:
        return {tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                for f in ds.PerFrameFunctionalGroupsSequence if "PlanePositionSequence" in f}
    if "ImagePositionPatient" in ds:
        return {tuple(float(v) for v in ds.ImagePositionPatient)}
    return set()


def _frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):  # a malformed IS in a test file
        return 1


def anatomy(ds: Dataset) -> tuple[str, str]:
    """(anatomy, reason) from the header: BodyPartExamined, StudyDescription, series hints."""
    body = str(ds.get("BodyPartExamined", "") or "").upper()
    study = str(ds.get("StudyDescription", "") or "")
    series = str(ds.get("SeriesDescription", "") or "")
    image_type = [str(x).upper() for x in ds.get("ImageType", [])]
    if body in ("HEAD", "BRAIN", "SKULL"):
        return "head/brain", f"BodyPartExamined {body}"
    if body:
        return body.lower(), f"BodyPartExamined {body}"
    if any(w in study.upper() for w in ("HEAD", "BRAIN")):
        return "head/brain", f"StudyDescription {study!r}"
    if "SMARTSCORE" in series.upper().replace(" ", "") or "GATED" in series.upper():
        return "heart", f"SeriesDescription {series!r} (gated calcium scoring)"
    coil = str(ds.get((0x0051, 0x100F)).value if (0x0051, 0x100F) in ds else "")
    if "HEA" in coil.upper():  # Siemens CoilString, e.g. 'T:HEA;HEP': the head coil
        return "head/brain", f"Siemens coil string {coil!r} (head coil)"
    if "PERFUSION" in image_type and any(t in image_type for t in ("RCBF", "RCBV", "MTT")):
        return "head/brain", f"ImageType {'/'.join(image_type)} (cerebral perfusion map)"
    return "unknown", "no BodyPartExamined, StudyDescription or series hint"


def discover_series() -> tuple[list[RealSeries], list[tuple[str, str]]]:
    """Multi-slice cross-sectional series in the roots, and what was left out (why)."""
    found: dict[str, dict[tuple[Any, ...], tuple[Path, Dataset, str]]] = {}
    for root_name, root in dicom_roots():
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.name in ("DICOMDIR",) or p.suffix in (".csv", ".txt"):
                continue
            try:
                ds = dcmread(p, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not DICOM (or unreadable): not a series
                continue
            if "Rows" not in ds or "SeriesInstanceUID" not in ds:
                continue
            rel = f"{root_name}:{p.relative_to(root)}"
            # One instance in several transfer syntaxes (some lossy copies with new UIDs):
            # keyed by what the instance shows, the uncompressed copy kept.
            key = (str(ds.get("InstanceNumber", "")), tuple(sorted(_positions(ds))),
                   str(ds.get("AcquisitionNumber", "")), _frames(ds))
            per = found.setdefault(str(ds.SeriesInstanceUID), {})
            ts = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
            old = per.get(key)
            old_ts = "" if old is None else str(getattr(old[1].file_meta, "TransferSyntaxUID", ""))
            if old is None or (ts in LOSSLESS_FIRST and old_ts not in LOSSLESS_FIRST):
                per[key] = (p, ds, rel)
    kept: list[RealSeries] = []
    left: list[tuple[str, str]] = []
    single = 0
    for per in found.values():
        items = sorted(per.values(), key=lambda t: t[2])
        p, ds, rel = items[0]
        modality = str(ds.get("Modality", "") or "")
        image_type = [str(x).upper() for x in ds.get("ImageType", [])]
        positions = set().union(*(_positions(d) for _, d, _ in items))
        frames = sum(_frames(d) for _, d, _ in items)
        parents = {str(Path(r).parent) for _, _, r in items}
        where = parents.pop() if len(items) > 1 and len(parents) == 1 and not rel.endswith(
            f":{Path(rel).name}") else rel + (f" (+{len(items) - 1})" if len(items) > 1 else "")
        if modality not in CROSS_SECTIONAL:
            if frames > 1 or len(items) > 1:
                left.append((where, f"modality {modality or '(none)'}: not cross-sectional"))
            continue
        if "LOCALIZER" in image_type:
            left.append((where, "localizer (scout) images"))
            continue
        if len(positions) < 2 and "MOSAIC" not in image_type:
            if len(items) > 1 or frames > 1:
                left.append((where, f"{len(items)} instance(s), {frames} frame(s) at one "
                                    "slice position"))
            else:
                single += 1
            continue
        group_anatomy, reason = anatomy(ds)
        mosaic = " (Siemens mosaic)" if "MOSAIC" in image_type else ""
        kept.append(RealSeries(where, modality, f"{modality} {group_anatomy}", reason + mosaic,
                               [t[0] for t in items], frames, len(positions)))
    kept.sort(key=lambda s: (s.group, s.source))
    if single:
        left.append((f"{single} single-slice {'/'.join(CROSS_SECTIONAL)} instances",
                     "one slice each (copies in other transfer syntaxes counted once)"))
    return kept, sorted(set(left))


def send_real(server: VolumeServe, series: Sequence[RealSeries]) -> tuple[float, int]:
    """pynetdicom C-STORE of every series as its own study (fresh UIDs and Patient ID)."""
    from pynetdicom import AE, evt

    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    datasets: list[Dataset] = []
    for n, s in enumerate(series):
        ns = f"pacs-sidecar bench/volumes real {n} {s.source}"
        s.study_uid = generate_uid(entropy_srcs=[ns, "study"])
        s.series_uid = generate_uid(entropy_srcs=[ns, "series"])
        for j, path in enumerate(s.files):
            ds = dcmread(path)
            ds.StudyInstanceUID = s.study_uid
            ds.SeriesInstanceUID = s.series_uid
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[ns, "instance", str(j)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"BV-REAL-{n:03d}"
            ds.PatientName = f"BENCH^REAL{n}"
            datasets.append(ds)
    ae = AE(ae_title="BENCH3D")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    for pair in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
                        for d in datasets}):
        ae.add_requested_context(*pair)
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise BenchError(f"cannot associate for C-STORE; log:\n{tail(server.log_path)}")
    try:
        for d in datasets:
            st = assoc.send_c_store(d)
            code = int(getattr(st, "Status", -1))
            if code != 0:
                raise BenchError(f"C-STORE of {d.SOPInstanceUID} answered 0x{code:04X} "
                                 f"{st.get('ErrorComment', '') if st else ''!r}")
    finally:
        assoc.release()
    return time.perf_counter() - t0, len(datasets)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def part_b(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    series, left = discover_series()
    log(f"  {len(series)} multi-slice series found; grouped by modality and anatomy:")
    log(f"  {'group':<16} {'slices':>6} {'pos':>4}  {'series (source)':<58} reason")
    for s in series:
        log(f"  {s.group:<16} {s.frames:>6} {s.positions:>4}  {s.source[:58]:<58} {s.reason}")
    for where, why in left:
        log(f"  left out: {where}: {why}")
    if len(series) < 2:
        log("  fewer than 2 series: part B skipped")
        return {"series": [], "left_out": left}
    run_dir = work / "b-serve"
    run_dir.mkdir()
    server = VolumeServe(run_dir, args.ready_timeout, args.sidecar_exe, args.sidecar_overrides)
    rows: list[dict[str, Any]] = []
    try:
        server.start()
        send_s, n_inst = send_real(server, series)
        wait_s, st = wait_for_worker(server, n_inst, len(series), args.worker_timeout,
                                      volumes=sum(1 for x in series if x.frames >= 16)
                                      if _volumes_on(args) else 0)
        log(f"  sent {n_inst} instances in {send_s:.1f} s; worker done after {wait_s:.1f} s: "
            f"{st['instances']}, {server.series_with_vectors()}/{len(series)} series with "
            f"slice vectors")
        group_of = {s.series_uid: s.group for s in series}
        with find_association(server) as (assoc, find):
            for s in series:
                ans = similarity_find(assoc, find, "SERIES", s.series_uid, len(series))
                rows.append(real_row(s, ans, group_of, series))
    finally:
        server.stop()
    log()
    log(f"  {'query (group)':<56} {'rank':>8} {'related':>8} {'cal':>6} {'unrel.':>8} "
        f"{'cal':>6} {'gap':>7}")
    for r in rows:
        label = f"{r['source'].removeprefix('shared:')[-38:]} ({r['group']})"
        log(f"  {label[:56]:<56} {r['rank_text']:>8} "
            f"{_fmt(r['best_related'])}  {_fmt(r['best_related_calibrated'], '.2f'):>6} "
            f"{_fmt(r['best_unrelated'])}  {_fmt(r['best_unrelated_calibrated'], '.2f'):>6} "
            f"{_fmt(r['gap'], '+.3f'):>7}" + (f"  {r['note']}" if r["note"] else ""))
    have = [r for r in rows if r["related_in_gallery"] and r["status"] == 0]
    first = sum(1 for r in have if r["rank"] == 1)
    gaps = [r["gap"] for r in have if r["gap"] is not None]
    scores = [h for r in rows for h in r["scores"]]
    log(f"  same-group series first for {first} of {len(have)} queries that have one"
        + (f"; gap best related - best unrelated: median {statistics.median(gaps):+.3f}, "
           f"min {min(gaps):+.3f}" if gaps else "")
        + (f"; every raw score in [{min(scores):.3f}, {max(scores):.3f}]" if scores else ""))
    return {"series": [{k: v for k, v in r.items() if k != "scores"} for r in rows],
            "left_out": left, "first": first, "with_related": len(have),
            "send_s": send_s, "wait_s": wait_s}


def real_row(s: RealSeries, ans: Answer, group_of: dict[str, str],
             series: Sequence[RealSeries]) -> dict[str, Any]:
    related_in_gallery = sum(1 for o in series if o.group == s.group) > 1
    row: dict[str, Any] = {"source": s.source, "group": s.group, "status": ans.status,
                           "related_in_gallery": related_in_gallery, "rank": None,
                           "rank_text": "none in gallery" if not related_in_gallery else "",
                           "best_related": None, "best_related_calibrated": None,
                           "best_unrelated": None, "best_unrelated_calibrated": None,
                           "gap": None, "note": "", "hits": len(ans.hits),
                           "scores": [h.score for h in ans.hits]}
    if ans.status != 0:
        row["note"] = f"C-FIND 0x{ans.status:04X} {ans.comment!r}"
        row["rank_text"] = "error"
        return row
    related = [h for h in ans.hits if group_of.get(h.uid) == s.group]
    unrelated = [h for h in ans.hits if group_of.get(h.uid) != s.group]
    if related:
        row["rank"] = related[0].rank
        row["best_related"] = related[0].score
        row["best_related_calibrated"] = related[0].calibrated
    if unrelated:
        row["best_unrelated"] = unrelated[0].score
        row["best_unrelated_calibrated"] = unrelated[0].calibrated
    if related_in_gallery:
        row["rank_text"] = str(row["rank"]) if related else "not found"
    if related and unrelated:
        row["gap"] = related[0].score - unrelated[0].score
    return row


# --------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="3D volumes sent as series and searched by "
                                            "similarity C-FIND (issue 22).")
    p.add_argument("--gallery", type=int, default=None,
                   help="part A gallery volumes from train (default 500, --quick 60)")
    p.add_argument("--queries", type=int, default=None,
                   help="part A query volumes from --split (default 150, --quick 20; "
                        "capped at the split's size)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="split of the queries (default val: choose on val; test for the "
                        "final report)")
    p.add_argument("--seed", type=int, default=0, help="choice of volumes (default 0)")
    p.add_argument("--quick", action="store_true", help="fast check: 60 gallery / 20 queries")
    p.add_argument("--data", type=Path, default=ADRENAL,
                   help=f"part A set, an .npz of (N, Z, Y, X) uint8 volumes (default {ADRENAL})")
    p.add_argument("--associations", type=int, default=2,
                   help="part A parallel storescu associations (default 2)")
    p.add_argument("--skip-a", action="store_true", help="skip part A")
    p.add_argument("--skip-b", action="store_true", help="skip part B")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the results as JSON to PATH")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent of the temporary directories (default: system temp dir)")
    p.add_argument("--sidecar-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a sidecar setting; repeatable")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds allowed for sending (default 1800)")
    p.add_argument("--worker-timeout", type=float, default=3600.0,
                   help="seconds allowed for the worker to finish (default 3600)")
    p.add_argument("--ready-timeout", type=float, default=120.0,
                   help="seconds allowed for sidecar serve to start (default 120)")
    args = p.parse_args(argv)
    if args.gallery is None:
        args.gallery = 60 if args.quick else 500
    if args.queries is None:
        args.queries = 20 if args.quick else 150
    if min(args.gallery, args.queries, args.associations) < 1:
        p.error("--gallery, --queries and --associations must be >= 1")
    args.sidecar_overrides = sidecar_overrides(p, args.sidecar_set)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), (STORESCU, ECHOSCU), "bench-3d-", _main)


def _main(args: argparse.Namespace, work: Path) -> int:
    args.sidecar_exe = find_sidecar()
    facts = machine_facts(work)
    print_header("3D volumes", facts, work, args,
                 f"part A {args.gallery} gallery / {args.queries} {args.split} queries "
                 f"(seed {args.seed}) from {args.data}; part B the real series")
    result: dict[str, Any] = {"benchmark": "volumes", "machine": facts,
                              "date": dt.datetime.now(dt.UTC).isoformat()}
    if not args.skip_a:
        log()
        log("Part A: 3D volumes as CT series, STUDY-level similarity C-FIND")
        if args.data.is_file():
            result["part_a"] = part_a(args, work, load_set(args.data), args.data.stem)
        else:
            log(f"  {args.data} is absent: part A skipped")
    if not args.skip_b:
        log()
        log("Part B: real series, each its own study, SERIES-level similarity C-FIND")
        result["part_b"] = part_b(args, work)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"  results written to {args.json}")
    shutil.rmtree(work / "a-src", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
