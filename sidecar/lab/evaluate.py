"""Retrieval quality on a labelled image set: the harness behind ``sidecar evaluate``.

Input and protocol
------------------
A ``.npz`` in the MedMNIST layout: ``train_images, train_labels, val_images,
val_labels, test_images, test_labels`` (``val_*`` optional), images ``uint8``
``(N, H, W)`` grey (``(N, H, W, 1)`` is accepted, ``(N, H, W, 3)`` is written
as RGB DICOM and becomes luminance in pre-processing), labels integers ``(N,)``
or ``(N, 1)`` (multi-label sets are refused). :func:`load_labelled_npz`
validates the layout and names what is wrong (:class:`EvaluationError`).
The gallery is ``train``; the queries are ``test`` (``val`` for tuning: never
tune on ``test``). A query's relevant images are the gallery images with its
label.

Two paths
---------
(a) **The model alone** (:func:`evaluate_model`): every image becomes an
    in-memory DICOM Secondary Capture instance (MONOCHROME2, 8 bits, no pixel
    spacing, so the worker's *fit* mode applies), is written as a Part-10
    byte stream and read back, then goes through exactly the calls of
    :class:`~sidecar.embeddings.worker.EmbeddingWorker`:
    ``preprocess.prepare(ds, cfg.preprocess, embedder.input_size, frames=[0])``
    then ``embedder.embed``; the ranking is exact cosine over every gallery
    vector (:func:`cosine_ranking`).
(b) **The product** (:func:`evaluate_pipeline`): a :class:`~sidecar.service.app.Sidecar`
    runs in-process (one receiver, a temporary data directory, SQLite, the
    same embedder); the gallery is sent by C-STORE (one study and one
    distinct PatientID per image, a StudyDescription that says nothing about
    the label), the studies are marked stable and the embedding job runs until
    nothing is due; each query image is sent by C-STORE to
    ``query.example_ae_title`` (query by example) and a similarity C-FIND at
    STUDY level names its SOP Instance UID in (0099,1001) with (0099,1005)
    ``YES``. The top-K is the whole gallery when it has at most
    :data:`MAX_TOP_K` images (then mAP over the full ranking is computed),
    else 11 (enough for P@10, kNN-11 and mAP@5; ``map`` is then reported for
    path (a) only). Hits map back to gallery images by Study Instance UID.
    ``limit`` queries (a seeded sample) keep it short; path (a) is reported on
    the same queries beside it, with how often the two agree.

Metrics (per query, then the mean over queries, in percent)
-----------------------------------------------------------
``rel_i`` is 1 when the gallery image at rank ``i`` (1-based) has the query's
label, ``R`` the number of gallery images with that label.

* ``p@k`` (:func:`precision_at_k`): ``(1/k) * sum_{i<=k} rel_i``; ``p@1`` and ``p@10``.
* ``map`` (:func:`average_precision`): ``AP = (1/R) * sum_i P@i * rel_i`` over
  the full ranking (every gallery image); 0 when ``R == 0``.
* ``knn11`` (:func:`knn_accuracy`): 1 when the most frequent label among the
  top 11 is the query's; a tie goes to the tied label ranked highest.
* ``map@5_mahbod`` (:func:`mahbod_map_at_k`): Mahbod et al. 2024's mAP@5,
  ``AP@5 = (1/R5) * sum_{i<=5} P@i * rel_i`` where ``R5 = sum_{i<=5} rel_i``
  is the number of hits *in the top 5* (lenient: a query with one relevant
  image at rank 1 scores 1); 0 when ``R5 == 0``.
* ``acc@1_mahbod`` (:func:`accuracy_at_1`): 1 when the top hit has the
  query's label (Mahbod's ACC@1; numerically equal to ``p@1``).
* ``majority`` (:func:`majority_rate`): the fraction of queries whose label is
  the gallery's most frequent label: what answering one class always earns.
* ``near_dup@1``: see below.

Ranking (:func:`cosine_ranking`): exact cosine similarity in float64 of the
L2-normalised rows (a zero row scores 0 against everything), sorted by
decreasing score; equal scores keep the gallery order (lower index first).

Baselines
---------
``raw_pixel``: the same metrics with the flattened pixels (``uint8`` as float,
*not* mean-centred: plain "raw pixels + cosine", the baseline the literature
quotes) as vectors (:func:`raw_pixel_vectors`; ``centre=True`` subtracts each
image's mean, i.e. Pearson correlation). ``majority`` as above.

Near duplicates
---------------
A seeded sample of gallery images (:data:`NEAR_DUP_SAMPLE` by default), each
perturbed four ways (:func:`perturb`): ``noise`` (Gaussian, sigma 3 grey
levels, rounded and clipped), ``shift`` (by 1 or 2 pixels on at least one
axis, edges replicated), ``jpeg_ls`` (lossy JPEG-LS near-lossless re-encoding,
NEAR = 3, a real codec: the pipeline decodes it) and ``jpeg_q75`` (baseline
JPEG quality 75 quantisation simulated in numpy: 8x8 DCT, IJG luminance
table; the project's dependencies hold no baseline JPEG encoder, and the
JPEG 2000 encoder needs images of at least 32 pixels). A copy counts as found
when the gallery image at rank 1 is its original (or pixel-identical to it).
``near_dup@1`` is the rate over all copies; each kind is reported too.

Galleries can hold the same picture more than once (BreastMNIST: 83 of its
546 train images have another train image within 4 grey levels RMSE, e.g.
two exports of one frame), and a perturbed copy may then be as close to the
twin as to its original. ``near_dup_twins@1`` therefore also counts a rank-1
image whose pixels are within :data:`NEAR_DUP_TWIN_RMSE` grey levels RMSE of
the original (as copy-detection benchmarks count database duplicates of the
source), and ``near_dup_twin_originals`` says how many sampled originals have
such a twin. ``near_dup@1`` stays the strict figure.

Per label
---------
``p@1_by_label``: P@1 over the queries of each label (an imbalanced gallery
shows here: a minority-label query meets a majority-label image first more
often).

Confidence intervals
--------------------
:func:`bootstrap_cis`: percentile bootstrap over queries, ``n`` resamples
with replacement (default 1000) drawn once from ``numpy.random.default_rng(seed)``
and shared by every metric; the 2.5th and 97.5th percentiles of the
resampled means.
"""

from __future__ import annotations

import io
import logging
import math
import socket
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEGLSNearLossless,
    generate_uid,
)

from sidecar.config import Config
from sidecar.errors import SidecarError

if TYPE_CHECKING:
    from sidecar.embeddings.model import Embedder

logger = logging.getLogger(__name__)

U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]
F64 = NDArray[np.float64]
F32 = NDArray[np.float32]
IntP = NDArray[np.intp]
Bool = NDArray[np.bool_]

SECONDARY_CAPTURE: Final = "1.2.840.10008.5.1.4.1.1.7"
"""SOP Class of the DICOM written for every image (Secondary Capture Image Storage)."""
STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
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
NEAR_DUP_KINDS: Final = ("noise", "shift", "jpeg_ls", "jpeg_q75")
NEAR_DUP_SAMPLE: Final = 200
"""Gallery images perturbed per kind (seeded sample; all when the gallery is smaller)."""
NOISE_SIGMA: Final = 3.0
JPEG_LS_NEAR: Final = 3
JPEG_QUALITY: Final = 75
MAX_TOP_K: Final = 1000
"""The largest top-K a similarity query may ask for (``query.max_k``'s ceiling)."""
MIN_TOP_K: Final = 11
"""Hits the metrics other than full-ranking mAP need (kNN-11)."""
UID_PREFIX: Final = "1.2.826.0.1.3680043.8.498."
_EVAL_AE: Final = "EVALUATE"
_STUDY_DESCRIPTION: Final = "EVALUATION"


Which = Literal["a", "b", "both"]
"""Which paths to run."""


class EvaluationError(SidecarError):
    """The data set cannot be evaluated (bad file or layout) or the pipeline failed."""


# ===================================================================== data
@dataclass(frozen=True)
class LabelledSet:
    """A labelled image set in the MedMNIST layout.

    Attributes
    ----------
    path
        The ``.npz`` file.
    images
        Split name → ``uint8`` images ``(N, H, W)`` or ``(N, H, W, 3)``.
    labels
        Split name → ``int64`` labels ``(N,)``.
    """

    path: Path
    images: Mapping[str, U8]
    labels: Mapping[str, I64]

    @property
    def name(self) -> str:
        """The file name without ``.npz``."""
        return self.path.stem

    def split(self, name: str) -> tuple[U8, I64]:
        """Images and labels of one split.

        Raises
        ------
        EvaluationError
            The file has no such split.
        """
        if name not in self.images:
            raise EvaluationError(f"{self.path.name} has no {name!r} split "
                                  f"(it has {', '.join(sorted(self.images))})")
        return self.images[name], self.labels[name]


def load_labelled_npz(path: Path | str) -> LabelledSet:
    """Load and validate a labelled ``.npz`` in the MedMNIST layout.

    Required: ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels``; ``val_images`` and ``val_labels`` are optional but come
    together. Other arrays are ignored.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    LabelledSet
        Images as ``uint8`` ``(N, H, W)`` (a trailing channel axis of 1 dropped)
        or ``(N, H, W, 3)``, labels as ``int64`` ``(N,)``.

    Raises
    ------
    EvaluationError
        Unreadable or not ``.npz``; a missing array; images that are not
        ``uint8`` ``(N, H, W[, 1|3])`` or differ in size between splits;
        labels that are not integers ``(N,)``/``(N, 1)``, are negative or do
        not match the number of images; an empty ``train`` or ``test`` split.
    """
    p = Path(path)
    where = p.name
    try:
        npz = np.load(p, allow_pickle=False)
    except FileNotFoundError as exc:
        raise EvaluationError(f"{p}: no such file") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise EvaluationError(f"{p}: not a readable .npz file ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise EvaluationError(f"{p}: a single .npy array, not an .npz with named arrays")
    with npz:
        names = set(npz.files)
        splits = ["train", "test"]
        has_val = {"val_images", "val_labels"} & names
        if has_val:
            splits.insert(1, "val")
        missing = [f"{s}_{kind}" for s in splits for kind in ("images", "labels")
                   if f"{s}_{kind}" not in names]
        if missing:
            raise EvaluationError(
                f"{where}: missing {', '.join(missing)} (the MedMNIST layout has "
                "train_images, train_labels, val_images, val_labels, test_images, test_labels)"
            )
        images: dict[str, U8] = {}
        labels: dict[str, I64] = {}
        shape: tuple[int, ...] | None = None
        for s in splits:
            try:
                img = np.asarray(npz[f"{s}_images"])
                lab = np.asarray(npz[f"{s}_labels"])
            except (ValueError, OSError, zipfile.BadZipFile) as exc:
                raise EvaluationError(f"{where}: cannot read the {s} arrays ({exc})") from exc
            img = _check_images(img, f"{where}: {s}_images")
            if shape is None:
                shape = img.shape[1:]
            elif img.shape[1:] != shape:
                raise EvaluationError(
                    f"{where}: {s}_images are {img.shape[1:]}, train_images {shape}: "
                    "every split needs the same image size"
                )
            lab = _check_labels(lab, img.shape[0], f"{where}: {s}_labels")
            if s in ("train", "test") and img.shape[0] == 0:
                raise EvaluationError(f"{where}: the {s} split is empty")
            images[s], labels[s] = img, lab
    return LabelledSet(path=p, images=images, labels=labels)


def _check_images(arr: NDArray[Any], what: str) -> U8:
    if arr.dtype != np.uint8:
        raise EvaluationError(f"{what}: dtype {arr.dtype}, expected uint8 grey levels")
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[3] == 3)):
        raise EvaluationError(f"{what}: shape {arr.shape}, expected (N, H, W) grey images "
                              "(or (N, H, W, 3) colour)")
    if min(arr.shape[1:3]) < 1:
        raise EvaluationError(f"{what}: empty images {arr.shape[1:]}")
    out: U8 = np.ascontiguousarray(arr)
    return out


def _check_labels(arr: NDArray[Any], n: int, what: str) -> I64:
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise EvaluationError(
            f"{what}: shape {arr.shape}, expected (N,) or (N, 1) class labels "
            "(multi-label sets are not supported)"
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise EvaluationError(f"{what}: dtype {arr.dtype}, expected integer class labels")
    if arr.shape[0] != n:
        raise EvaluationError(f"{what}: {arr.shape[0]} labels for {n} images")
    if arr.size and int(arr.min()) < 0:
        raise EvaluationError(f"{what}: negative label {int(arr.min())}")
    out: I64 = arr.astype(np.int64)
    return out


# ================================================================== metrics
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
    q = _unit_rows(queries)
    g = _unit_rows(gallery)
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


def _unit_rows(x: NDArray[Any]) -> F64:
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


# ======================================================== images and DICOM
def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts]))


def image_dataset(
    image: U8,
    *,
    key: str,
    patient_id: str,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """One image as a Secondary Capture Image Storage dataset with file meta.

    MONOCHROME2 8-bit grey (RGB for ``(H, W, 3)``), no pixel spacing (the
    pre-processing fits the whole image), one study, series and instance whose
    UIDs derive from ``key`` (repeatable). ``transfer_syntax`` JPEG-LS
    near-lossless compresses the pixels with NEAR = :data:`JPEG_LS_NEAR`.
    """
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = _uid(key, "instance")
    ds.StudyInstanceUID = _uid(key, "study")
    ds.SeriesInstanceUID = _uid(key, "series")
    ds.PatientID = patient_id
    ds.PatientName = ""
    ds.StudyDescription = _STUDY_DESCRIPTION
    ds.StudyDate = "20000101"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    if arr.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    if transfer_syntax == JPEGLSNearLossless:
        ds.compress(JPEGLSNearLossless, jls_error=JPEG_LS_NEAR)
    elif transfer_syntax != ExplicitVRLittleEndian:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    return ds


def round_trip(ds: Dataset) -> Dataset:
    """``ds`` written as a Part-10 byte stream and read back, as the worker reads files."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))


def prepare_datasets(datasets: Sequence[Dataset], config: Config, size: int) -> F32:
    """Model input for one-frame datasets, exactly as the embedding worker prepares them.

    Each dataset is written and read back (:func:`round_trip`), then
    ``preprocess.prepare(ds, config.preprocess, size, frames=[0])``.
    """
    from sidecar.embeddings import preprocess

    out = np.empty((len(datasets), size, size), dtype=np.float32)
    for i, ds in enumerate(datasets):
        out[i] = preprocess.prepare(round_trip(ds), config.preprocess, size, frames=[0])[0]
    return out


def embed_datasets(
    datasets: Sequence[Dataset], config: Config, embedder: Embedder, batch: int = 256
) -> F32:
    """Path (a) vectors: :func:`prepare_datasets` then ``embedder.embed``, in batches."""
    parts: list[F32] = []
    for start in range(0, len(datasets), batch):
        prepared = prepare_datasets(datasets[start:start + batch], config, embedder.input_size)
        parts.append(np.asarray(embedder.embed(prepared), dtype=np.float32))
    if not parts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.concatenate(parts)


# ---------------------------------------------------------- near duplicates
_IJG_LUMA: Final = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=np.float64)


def _dct_matrix(n: int = 8) -> F64:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    out: F64 = m
    return out


def jpeg_quantise(image: U8, quality: int = JPEG_QUALITY) -> U8:
    """Baseline JPEG's loss simulated: 8x8 DCT, IJG luminance quantisation at ``quality``.

    The image is padded to whole blocks by edge replication, level-shifted
    by 128, transformed, quantised and restored, rounded and clipped; the
    padding is cut off again. Colour images are quantised per channel with the
    luminance table (no chroma subsampling).
    """
    if image.ndim == 3:
        return np.stack([jpeg_quantise(image[..., c], quality) for c in range(image.shape[2])],
                        axis=-1)
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    table = np.clip(np.floor((_IJG_LUMA * scale + 50.0) / 100.0), 1, 255)
    h, w = image.shape
    ph, pw = -h % 8, -w % 8
    arr = np.pad(image.astype(np.float64), ((0, ph), (0, pw)), mode="edge") - 128.0
    d = _dct_matrix()
    blocks = arr.reshape(arr.shape[0] // 8, 8, arr.shape[1] // 8, 8).transpose(0, 2, 1, 3)
    coef = d @ blocks @ d.T
    coef = np.round(coef / table) * table
    back = (d.T @ coef @ d).transpose(0, 2, 1, 3).reshape(arr.shape) + 128.0
    out: U8 = np.clip(np.round(back[:h, :w]), 0, 255).astype(np.uint8)
    return out


def perturb(image: U8, kind: str, rng: np.random.Generator) -> U8:
    """A near-duplicate of ``image`` (pixels; ``jpeg_ls`` is lossy only once encoded).

    ``noise``: Gaussian noise of sigma :data:`NOISE_SIGMA` grey levels,
    rounded and clipped. ``shift``: moved by ``(dy, dx)`` in ``{-2..2}``,
    not both 0, edges replicated. ``jpeg_q75``: :func:`jpeg_quantise`.
    ``jpeg_ls``: the pixels unchanged (:func:`image_dataset` encodes them
    lossily with JPEG-LS near-lossless).
    """
    if kind == "noise":
        noisy = image.astype(np.float64) + rng.normal(0.0, NOISE_SIGMA, size=image.shape)
        out: U8 = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
        return out
    if kind == "shift":
        while True:
            dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
            if dy or dx:
                break
        pad = [(2, 2), (2, 2)] + [(0, 0)] * (image.ndim - 2)
        big = np.pad(image, pad, mode="edge")
        h, w = image.shape[:2]
        shifted: U8 = big[2 - dy:2 - dy + h, 2 - dx:2 - dx + w].copy()
        return shifted
    if kind == "jpeg_q75":
        return jpeg_quantise(image, JPEG_QUALITY)
    if kind == "jpeg_ls":
        return image.copy()
    raise ValueError(f"unknown near-duplicate kind {kind!r} (known: {', '.join(NEAR_DUP_KINDS)})")


NEAR_DUP_TWIN_RMSE: Final = 4.0
"""Largest pixel RMSE (grey levels) between two gallery images that are counted as
the same picture by ``near_dup_twins@1``: the noise copies' own sigma."""


@dataclass(frozen=True)
class NearDuplicates:
    """Perturbed copies of gallery images.

    Attributes
    ----------
    originals
        ``(M,)`` gallery index of each copy's original.
    kinds
        ``(M,)`` perturbation kind of each copy.
    datasets
        The copies as DICOM (``jpeg_ls`` ones JPEG-LS near-lossless encoded).
    pixels
        ``(M, H, W[, 3])`` the copies' pixels as a viewer decodes them.
    has_twin
        ``(M,)`` whether the copy's original has a twin in the gallery
        (:func:`gallery_twins`).
    """

    originals: IntP
    kinds: NDArray[np.str_]
    datasets: list[Dataset]
    pixels: U8
    has_twin: NDArray[np.bool_]

    def subset(self, idx: IntP, datasets: list[Dataset]) -> NearDuplicates:
        """The copies ``idx`` (``datasets``: theirs, as they were sent)."""
        return NearDuplicates(self.originals[idx], self.kinds[idx], datasets, self.pixels[idx],
                              self.has_twin[idx])


def gallery_twins(gallery: U8, originals: NDArray[Any]) -> NDArray[np.bool_]:
    """Per original: another gallery image lies within :data:`NEAR_DUP_TWIN_RMSE` of it."""
    flat = gallery.reshape(gallery.shape[0], -1).astype(np.float64)
    found: dict[int, bool] = {}
    for i in np.unique(originals).tolist():
        d = np.sqrt(np.mean((flat - flat[i]) ** 2, axis=1))
        d[i] = np.inf
        found[i] = bool(d.min(initial=np.inf) <= NEAR_DUP_TWIN_RMSE)
    return np.array([found[i] for i in np.asarray(originals).tolist()], dtype=bool)


def make_near_duplicates(
    gallery: U8, *, n: int = NEAR_DUP_SAMPLE, seed: int = 0,
    kinds: Sequence[str] = NEAR_DUP_KINDS, key: str = "",
) -> NearDuplicates:
    """Perturb a seeded sample of ``min(n, G)`` gallery images in every way of ``kinds``."""
    rng = np.random.default_rng([seed, 0x4E44])
    sample = np.sort(rng.choice(gallery.shape[0], size=min(n, gallery.shape[0]), replace=False))
    originals: list[int] = []
    kind_list: list[str] = []
    datasets: list[Dataset] = []
    pixels: list[U8] = []
    for kind in kinds:
        for i in sample.tolist():
            img = perturb(gallery[i], kind, rng)
            ts = JPEGLSNearLossless if kind == "jpeg_ls" else ExplicitVRLittleEndian
            ds = image_dataset(img, key=f"{key}/near/{kind}/{i}",
                               patient_id=f"EVAL-N{len(datasets):06d}", transfer_syntax=ts)
            if kind == "jpeg_ls":
                img = np.asarray(round_trip(ds).pixel_array, dtype=np.uint8)
            originals.append(i)
            kind_list.append(kind)
            datasets.append(ds)
            pixels.append(img)
    shape = (0, *gallery.shape[1:])
    return NearDuplicates(
        has_twin=gallery_twins(gallery, np.asarray(originals, dtype=np.intp)),
        originals=np.asarray(originals, dtype=np.intp),
        kinds=np.asarray(kind_list, dtype=np.str_),
        datasets=datasets,
        pixels=np.stack(pixels) if pixels else np.zeros(shape, dtype=np.uint8),
    )


def pixel_rmse(a: NDArray[Any], b: NDArray[Any]) -> float:
    """Root mean square difference of two images' pixels, in grey levels."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt(np.mean(diff * diff)))


@dataclass(frozen=True)
class NearHits:
    """Per copy (fractions 0/1): found at rank 1, strictly and counting gallery twins."""

    strict: F64
    """Rank 1 is the original or pixel-identical to it."""
    twins: F64
    """Rank 1 is within :data:`NEAR_DUP_TWIN_RMSE` grey levels RMSE of the original."""
    twin_originals: int
    """Distinct originals with another gallery image within that distance
    (:attr:`NearDuplicates.has_twin`)."""


def near_duplicate_hits(top1: NDArray[Any], near: NearDuplicates, gallery: U8) -> NearHits:
    """Per copy: whether the rank-1 gallery image is its original (see :class:`NearHits`)."""
    top = np.asarray(top1)
    originals = near.originals[: top.shape[0]]
    strict = top == originals
    twins = strict.copy()
    for j in np.flatnonzero(~strict & (top >= 0)):
        rmse = pixel_rmse(gallery[top[j]], gallery[originals[j]])
        strict[j] = rmse == 0.0
        twins[j] = rmse <= NEAR_DUP_TWIN_RMSE
    with_twin = len(np.unique(originals[near.has_twin[: top.shape[0]]]))
    return NearHits(strict.astype(np.float64), twins.astype(np.float64), with_twin)


# ================================================================== results
@dataclass
class PathResult:
    """The metrics of one path (or baseline) on a set of queries.

    Attributes
    ----------
    name
        ``a`` (model alone), ``b`` (pipeline) or ``raw_pixel``.
    query_indices
        Indices of the queries used in the query split.
    metrics
        Metric → mean in percent (``near_dup@1`` included when measured).
    ci95
        Metric → bootstrap 95 % interval in percent.
    near_dup
        Near-duplicate kind → rate in percent, and ``n`` copies.
    ranking
        ``(Q, K)`` gallery indices best first (not serialised).
    scores
        ``(Q, K)`` scores of ``ranking`` (not serialised).
    per_query
        Metric → per-query values (fractions; not serialised).
    seconds
        Stage → seconds.
    extra
        Anything else worth reporting (serialised as is).
    """

    name: str
    query_indices: IntP
    metrics: dict[str, float] = field(default_factory=dict)
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    near_dup: dict[str, float] = field(default_factory=dict)
    ranking: IntP = field(default_factory=lambda: np.zeros((0, 0), dtype=np.intp), repr=False)
    scores: F64 = field(default_factory=lambda: np.zeros((0, 0)), repr=False)
    per_query: dict[str, F64] = field(default_factory=dict, repr=False)
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        out: dict[str, Any] = {"queries": int(self.query_indices.shape[0])}
        out.update(self.metrics)
        out["ci95"] = {k: list(v) for k, v in self.ci95.items()}
        if self.near_dup:
            out["near_dup"] = {k: int(v) if k == "n" else v for k, v in self.near_dup.items()}
        out["seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
        out.update(self.extra)
        return out


def _summarise(
    result: PathResult,
    per_query: dict[str, F64],
    near_hits: NearHits | None,
    near: NearDuplicates | None,
    n_boot: int,
    seed: int,
    labels: NDArray[Any] | None = None,
) -> None:
    result.per_query = per_query
    result.metrics = {m: round(float(v.mean()) * 100.0, 2) for m, v in per_query.items()}
    result.ci95 = bootstrap_cis(per_query, n_boot, seed)
    if labels is not None and "p@1" in per_query and labels.shape[0]:
        result.extra["p@1_by_label"] = {
            str(label): round(float(per_query["p@1"][labels == label].mean()) * 100.0, 2)
            for label in np.unique(labels).tolist()
        }
    if near_hits is not None and near is not None and near_hits.strict.size:
        hits = near_hits.strict
        kinds = near.kinds[: hits.shape[0]]
        result.metrics["near_dup@1"] = round(float(hits.mean()) * 100.0, 2)
        result.ci95.update(bootstrap_cis({"near_dup@1": hits}, n_boot, seed))
        result.near_dup = {"n": float(hits.shape[0])}
        for kind in dict.fromkeys(kinds.tolist()):
            result.near_dup[kind] = round(float(hits[kinds == kind].mean()) * 100.0, 2)
        result.extra["near_dup_twins@1"] = round(float(near_hits.twins.mean()) * 100.0, 2)
        result.extra["near_dup_twins_by_kind"] = {
            kind: round(float(near_hits.twins[kinds == kind].mean()) * 100.0, 2)
            for kind in dict.fromkeys(kinds.tolist())
        }
        result.extra["near_dup_twin_originals"] = near_hits.twin_originals


def _query_sample(n_queries: int, limit: int | None, seed: int) -> IntP:
    if limit is None or limit >= n_queries:
        return np.arange(n_queries, dtype=np.intp)
    rng = np.random.default_rng([seed, 0x5142])
    out: IntP = np.sort(rng.choice(n_queries, size=limit, replace=False)).astype(np.intp)
    return out


# ====================================================================== path (a)
def evaluate_raw_pixels(
    data: LabelledSet, *, split: str = "test", near: NearDuplicates | None = None,
    n_boot: int = 1000, seed: int = 0, centre: bool = False,
) -> PathResult:
    """The raw-pixel baseline (:func:`raw_pixel_vectors` + exact cosine) on every query."""
    t0 = time.perf_counter()
    g_img, g_lab = data.split("train")
    q_img, q_lab = data.split(split)
    gallery = raw_pixel_vectors(g_img, centre=centre)
    ranking, scores = cosine_ranking(raw_pixel_vectors(q_img, centre=centre), gallery)
    result = PathResult("raw_pixel", np.arange(q_img.shape[0], dtype=np.intp),
                        ranking=ranking, scores=scores)
    per_query = retrieval_metrics(ranking, g_lab, q_lab, full_ranking=True)
    hits = None
    if near is not None and near.pixels.shape[0]:
        top1, _ = cosine_ranking(raw_pixel_vectors(near.pixels, centre=centre), gallery, 1)
        hits = near_duplicate_hits(top1[:, 0], near, g_img)
    _summarise(result, per_query, hits, near, n_boot, seed, q_lab)
    result.seconds["total"] = time.perf_counter() - t0
    result.extra["centred"] = centre
    return result


@dataclass
class ModelVectors:
    """Path (a) vectors, kept to compare path (b) with."""

    gallery: F32
    queries: F32
    near: F32


def evaluate_model(
    data: LabelledSet, config: Config, embedder: Embedder, *, split: str = "test",
    near: NearDuplicates | None = None, n_boot: int = 1000, seed: int = 0,
) -> tuple[PathResult, ModelVectors]:
    """Path (a): the worker's pre-processing, the embedder, exact cosine over the gallery."""
    g_img, g_lab = data.split("train")
    q_img, q_lab = data.split(split)
    key = data.name
    t0 = time.perf_counter()
    gallery_ds = [image_dataset(im, key=f"{key}/train/{i}", patient_id=f"EVAL-G{i:06d}")
                  for i, im in enumerate(g_img)]
    query_ds = [image_dataset(im, key=f"{key}/{split}/{i}", patient_id=f"EVAL-Q{i:06d}")
                for i, im in enumerate(q_img)]
    t1 = time.perf_counter()
    g_vec = embed_datasets(gallery_ds, config, embedder)
    q_vec = embed_datasets(query_ds, config, embedder)
    n_vec = (embed_datasets(near.datasets, config, embedder) if near is not None
             else np.zeros((0, embedder.dim), dtype=np.float32))
    t2 = time.perf_counter()
    ranking, scores = cosine_ranking(q_vec, g_vec)
    result = PathResult("a", np.arange(q_img.shape[0], dtype=np.intp),
                        ranking=ranking, scores=scores)
    per_query = retrieval_metrics(ranking, g_lab, q_lab, full_ranking=True)
    hits = None
    if near is not None and n_vec.shape[0]:
        top1, _ = cosine_ranking(n_vec, g_vec, 1)
        hits = near_duplicate_hits(top1[:, 0], near, g_img)
    _summarise(result, per_query, hits, near, n_boot, seed, q_lab)
    t3 = time.perf_counter()
    n_images = len(gallery_ds) + len(query_ds) + (len(near.datasets) if near else 0)
    result.seconds = {"dicom": t1 - t0, "prepare_and_embed": t2 - t1, "rank_and_metrics": t3 - t2,
                      "total": t3 - t0}
    result.extra["ms_per_image"] = round((t2 - t1) / max(n_images, 1) * 1000.0, 3)
    return result, ModelVectors(g_vec, q_vec, n_vec)


# ====================================================================== path (b)
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


def _no_delay(assoc: Any) -> None:
    """TCP_NODELAY on an SCU association (Nagle and delayed ACKs cost ~40 ms per message)."""
    try:
        transport = assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # pragma: no cover - platform specific
        logger.debug("could not set TCP_NODELAY: %s", exc)


def _similarity_identifier(sop_uid: str, top_k: int) -> Dataset:
    from sidecar.dicom.find import SIMILARITY_CREATOR

    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    block = ident.private_block(0x0099, SIMILARITY_CREATOR, create=True)
    block.add_new(0x01, "UI", sop_uid)
    block.add_new(0x04, "US", top_k)
    block.add_new(0x05, "CS", "YES")
    return ident


@dataclass
class PipelineRun:
    """What path (b) returned for its queries."""

    ranking: IntP
    scores: F64
    short: int
    lost: int
    seconds: dict[str, float]


class _LostMessage(Exception):
    """No response came (the association was aborted): worth one more try."""


class _Client:
    """An SCU association that is opened again after a lost message.

    pynetdicom (3.0.4) has a race between its reactor thread and back-to-back
    requests on one association (pydicom/pynetdicom#875): now and then a
    response is taken by the reactor ("Received unexpected C-STORE service
    message"), the request waits for ``dimse_timeout`` and the association is
    aborted. The harness then opens a new association and repeats the request
    (:data:`_ATTEMPTS` tries); the sidecar treats the repeat like the first
    (duplicate C-STORE of identical bytes, example images replaced by UID).
    """

    def __init__(self, host: str, port: int, called: str, contexts: Sequence[tuple[str, str]]):
        self._host, self._port, self._called = host, port, called
        self._contexts = list(contexts)
        self._assoc: Any = None
        self.lost = 0

    def get(self) -> Any:
        """The established association (opened when needed)."""
        from pynetdicom import AE

        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        ae = AE(ae_title=_EVAL_AE)
        ae.acse_timeout = ae.network_timeout = 300
        ae.dimse_timeout = _DIMSE_TIMEOUT
        for abstract, ts in self._contexts:
            ae.add_requested_context(abstract, ts)
        assoc = ae.associate(self._host, self._port, ae_title=self._called)
        if not assoc.is_established:
            raise EvaluationError(f"cannot associate with {self._called} at "
                                  f"{self._host}:{self._port}")
        _no_delay(assoc)
        self._assoc = assoc
        return assoc

    def drop(self) -> None:
        """Forget the association (aborting it if it is still up)."""
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.abort()
        self._assoc = None

    def close(self) -> None:
        """Release the association."""
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def store(self, ds: Dataset, what: str) -> None:
        """C-STORE ``ds``; :class:`_LostMessage` when no response came."""
        status = self.get().send_c_store(ds)
        if "Status" not in status:
            raise _LostMessage(what)
        if int(status.Status) != 0:
            raise EvaluationError(f"{what}: C-STORE failed: status 0x{int(status.Status):04X} "
                                  f"{status.get('ErrorComment', '')}")

    def find(self, ident: Dataset, what: str) -> list[Dataset]:
        """Similarity C-FIND: the Pending identifiers in order."""
        found: list[Dataset] = []
        final: Dataset | None = None
        for rsp, ds in self.get().send_c_find(ident, STUDY_ROOT_FIND):
            if "Status" not in rsp:
                raise _LostMessage(what)
            if int(rsp.Status) in (0xFF00, 0xFF01):
                if ds is not None:
                    found.append(ds)
            else:
                final = rsp
        if final is None:
            raise _LostMessage(what)
        if int(final.Status) != 0:
            raise EvaluationError(f"{what}: similarity C-FIND failed: status "
                                  f"0x{int(final.Status):04X} {final.get('ErrorComment', '')}")
        return found


_ATTEMPTS: Final = 3
_DIMSE_TIMEOUT: Final = 30.0


def _retrying(client: _Client, what: str, action: Any) -> Any:
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return action()
        except _LostMessage:
            client.lost += 1
            client.drop()
            if attempt == _ATTEMPTS:
                raise EvaluationError(f"{what}: no response in {_ATTEMPTS} tries") from None
            logger.warning("path (b): %s: no response (association aborted), trying again",
                           what)
    raise AssertionError("unreachable")  # pragma: no cover


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
    from sidecar.dicom.find import SIMILARITY_CREATOR
    from sidecar.dicom.similarity import RANK, SCORE
    from sidecar.service.app import Sidecar

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
        store = _Client(host, port, config.dicom.ae_title,
                        [(SECONDARY_CAPTURE, ExplicitVRLittleEndian)])
        try:
            for n, ds in enumerate(gallery):
                what = f"gallery image {n}"
                _retrying(store, what, lambda ds=ds, what=what: store.store(ds, what))
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
        client = _Client(host, port, config.query.example_ae_title, [
            (SECONDARY_CAPTURE, ExplicitVRLittleEndian),
            (SECONDARY_CAPTURE, JPEGLSNearLossless),
            (STUDY_ROOT_FIND, ExplicitVRLittleEndian),
        ])

        def ask(ds: Dataset, k: int, what: str) -> list[Dataset]:
            client.store(ds, what)
            return client.find(_similarity_identifier(str(ds.SOPInstanceUID), k), what)

        try:
            for qi, ds in enumerate(queries):
                k, what = ks[qi], f"query {qi}"
                found: list[Dataset] = _retrying(client, what,
                                                 lambda ds=ds, k=k, what=what: ask(ds, k, what))
                got = 0
                for hit in found:
                    block = hit.private_block(0x0099, SIMILARITY_CREATOR)
                    rank = int(block[RANK].value) - 1
                    if 0 <= rank < k:
                        ranking[qi, rank] = study_index.get(str(hit.StudyInstanceUID), -1)
                        scores[qi, rank] = float(block[SCORE].value)
                        got += 1
                if got < min(k, len(gallery)):
                    short += 1
                if (qi + 1) % 200 == 0:
                    logger.info("path (b): %d of %d queries answered", qi + 1, len(queries))
        finally:
            client.close()
            lost += client.lost
        seconds["queries"] = time.perf_counter() - t2
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
    _summarise(result, per_query, hits, sub_near, n_boot, seed, q_lab[chosen])
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
    _summarise(same, per_query, a_hits, near, n_boot, seed, q_lab[chosen])
    kk = min(10, b.ranking.shape[1])
    top1_same = float((b.ranking[:, 0] == a_rank[:, 0]).mean()) * 100.0 if nq else 0.0
    order_same = (float((b.ranking[:, :kk] == a_rank[:, :kk]).all(axis=1).mean()) * 100.0
                  if nq else 0.0)
    diffs = {m: round(b.metrics[m] - same.metrics[m], 2) for m in same.metrics if m in b.metrics}
    q = _unit_rows(model.queries[chosen])
    g = _unit_rows(model.gallery)
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


# ================================================================== model
def load_model(config: Config, path: Path | None = None) -> Embedder:
    """The embedder to evaluate.

    ``None``: the configured model (``load_embedder(config.embedding)``). A
    file with a ``.json`` description beside it (the layout of the shipped
    weights): SliceNetV1 weights, loaded by ``load_weights`` and run at
    ``embedding.input_size``. Any other file: a TorchScript model, as
    ``embedding.model_path`` would load it.

    Raises
    ------
    sidecar.embeddings.model.ModelError
        The file is missing, corrupt or does not fit.
    """
    from sidecar.embeddings import model as m

    if path is None:
        return m.load_embedder(config.embedding)
    if not path.with_suffix(".json").is_file():
        return m.load_embedder(config.embedding.model_copy(update={"model_path": path}))
    module, info = m.load_weights(path)
    # the thread count from_config would set (torch is only imported in sidecar.embeddings)
    getattr(m, "torch").set_num_threads(config.embedding.threads)  # noqa: B009
    size = config.embedding.input_size
    model_id = info.model_id if size == info.input_size else f"{info.model_id}-s{size}"
    if size != info.input_size:
        logger.warning("embedding.input_size %d differs from the %d the weights %s were made "
                       "for; model id %s", size, info.input_size, path.name, model_id)
    if not info.trained:
        logger.warning("weights %s are marked as not trained", path.name)
    return m.TorchEmbedder(module, model_id=model_id, input_size=size,
                           batch_size=config.embedding.batch_size, source=str(path))


# ================================================================== report
@dataclass
class Report:
    """Everything ``sidecar evaluate`` prints."""

    dataset: str
    split: str
    gallery: int
    queries: int
    model_id: str
    seed: int
    bootstrap: int
    majority: float
    raw_pixel: PathResult
    path_a: PathResult | None = None
    path_b: PathResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def primary(self) -> PathResult:
        """Path (a) when run, else path (b)."""
        result = self.path_a or self.path_b
        assert result is not None
        return result

    def to_dict(self) -> dict[str, Any]:
        """One JSON-able object: the primary path's metrics at the top level (percent)."""
        primary = self.primary
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "split": self.split,
            "gallery": self.gallery,
            "queries": self.queries,
            "model_id": self.model_id,
            "path": primary.name,
        }
        for m in (*METRICS, "near_dup@1"):
            if m in primary.metrics:
                out[m] = primary.metrics[m]
        for key in ("near_dup_twins@1", "p@1_by_label"):
            if key in primary.extra:
                out[key] = primary.extra[key]
        out["majority"] = round(self.majority * 100.0, 2)
        out["raw_pixel_p@1"] = self.raw_pixel.metrics["p@1"]
        out["ci95"] = {k: list(v) for k, v in primary.ci95.items()}
        out["raw_pixel"] = self.raw_pixel.to_dict()
        if self.path_a is not None:
            out["path_a"] = self.path_a.to_dict()
        if self.path_b is not None:
            out["path_b"] = self.path_b.to_dict()
        out["seed"] = self.seed
        out["bootstrap"] = self.bootstrap
        out["seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
        return out


def evaluate(
    path: Path | str,
    config: Config,
    embedder: Embedder,
    *,
    which: Which = "a",
    split: str = "test",
    limit: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    near_dup: int = NEAR_DUP_SAMPLE,
    workdir: Path | None = None,
) -> Report:
    """Run the harness: load, baselines, path (a) and/or (b), near duplicates.

    Parameters
    ----------
    path
        The labelled ``.npz``.
    config
        Pre-processing settings (and the base of path (b)'s configuration).
    embedder
        The model under test.
    which
        ``a``, ``b`` or ``both``.
    split
        Query split, ``test`` (report) or ``val`` (tuning).
    limit
        Path (b) only: at most this many queries and near-duplicate copies
        (seeded samples). Path (a) always uses every query.
    n_boot
        Bootstrap resamples (0: no intervals).
    seed
        Seed of every sample (queries, near duplicates, noise, bootstrap).
    near_dup
        Gallery images perturbed per kind (0: no near-duplicate test).
    workdir
        Parent directory of path (b)'s temporary data directory.

    Raises
    ------
    EvaluationError
        Bad file or layout, or path (b) failed.
    """
    t0 = time.perf_counter()
    data = load_labelled_npz(path)
    if split not in ("test", "val"):
        raise EvaluationError(f"queries come from 'test' or 'val', not {split!r}")
    g_img, g_lab = data.split("train")
    q_img, q_lab = data.split(split)
    if q_img.shape[0] == 0:
        raise EvaluationError(f"{data.path.name}: the {split} split is empty")
    near = (make_near_duplicates(g_img, n=near_dup, seed=seed, key=data.name)
            if near_dup > 0 else None)
    seconds = {"load": time.perf_counter() - t0}
    raw = evaluate_raw_pixels(data, split=split, near=near, n_boot=n_boot, seed=seed)
    report = Report(
        dataset=data.path.name, split=split, gallery=int(g_img.shape[0]),
        queries=int(q_img.shape[0]), model_id=embedder.model_id, seed=seed, bootstrap=n_boot,
        majority=majority_rate(g_lab, q_lab), raw_pixel=raw, seconds=seconds,
    )
    model: ModelVectors | None = None
    if which in ("a", "both"):
        logger.info("path (a): embedding %d gallery and %d query images", len(g_img), len(q_img))
        report.path_a, model = evaluate_model(data, config, embedder, split=split, near=near,
                                              n_boot=n_boot, seed=seed)
        seconds["path_a"] = report.path_a.seconds["total"]
    if which in ("b", "both"):
        logger.info("path (b): sidecar in-process, %d gallery images, %s queries",
                    len(g_img), limit if limit is not None else len(q_img))
        report.path_b = evaluate_pipeline(
            data, config, embedder, split=split, limit=limit, near=near, n_boot=n_boot,
            seed=seed, model=model, model_result=report.path_a, workdir=workdir,
        )
        seconds["path_b"] = report.path_b.seconds["total"]
    seconds["total"] = time.perf_counter() - t0
    return report


# ================================================================== table
def _cell(result: PathResult | None, metric: str) -> str:
    if result is None:
        return ""
    if metric not in result.metrics:
        return "n/a"
    value = f"{result.metrics[metric]:5.1f}"
    ci = result.ci95.get(metric)
    return f"{value} [{ci[0]:5.1f}, {ci[1]:5.1f}]" if ci else value


def format_table(report: Report) -> str:
    """The report as a plain-text table (percentages, bootstrap 95 % intervals)."""
    a, b, raw = report.path_a, report.path_b, report.raw_pixel
    lines = [
        f"{report.dataset}: gallery = train ({report.gallery}), queries = {report.split} "
        f"({report.queries}); model {report.model_id}; seed {report.seed}, "
        f"{report.bootstrap} bootstrap resamples",
        "",
    ]
    cols = [("metric (%)", 20)]
    if a is not None:
        cols.append(("path (a) model alone", 24))
    if b is not None:
        cols.append((f"path (b) pipeline, N={b.query_indices.shape[0]}", 28))
    cols.append(("raw pixels", 24))
    lines.append("  ".join(f"{name:<{w}}" for name, w in cols).rstrip())
    lines.append("  ".join("-" * w for _, w in cols))
    for metric in (*METRICS, "near_dup@1"):
        row = [f"{METRIC_LABELS[metric]:<20}"]
        if a is not None:
            row.append(f"{_cell(a, metric):<24}")
        if b is not None:
            row.append(f"{_cell(b, metric):<28}")
        row.append(f"{_cell(raw, metric):<24}")
        lines.append("  ".join(row).rstrip())
    lines.append("")
    lines.append(f"majority-class rate: {report.majority * 100:.1f} %   "
                 f"raw-pixel P@1: {raw.metrics['p@1']:.1f} % (flattened pixels, not centred)")
    for result in (a, b, raw):
        if result is not None and "p@1_by_label" in result.extra:
            by = ", ".join(f"label {k} {v:.1f}" for k, v in result.extra["p@1_by_label"].items())
            lines.append(f"P@1 by query label, {result.name}: {by}")
    for result in (a, b, raw):
        if result is not None and result.near_dup:
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in result.near_dup.items() if k != "n")
            lines.append(f"near duplicates @1, {result.name} (n={int(result.near_dup['n'])}): "
                         f"{kinds}; counting gallery twins "
                         f"{result.extra['near_dup_twins@1']:.1f} "
                         f"({result.extra['near_dup_twin_originals']} originals have a twin "
                         f"within {NEAR_DUP_TWIN_RMSE:g} grey levels RMSE)")
    if b is not None:
        lines.append(f"path (b): top-K {b.extra['top_k']}, {b.extra['short_answers']} short "
                     f"answers; {b.extra.get('note', 'mAP over the full ranking')}")
        cmp = b.extra.get("vs_path_a")
        if cmp:
            order_key = next(k for k in cmp if k.endswith("_order_same_percent"))
            lines.append(
                f"path (b) vs (a) on the same {cmp['queries']} queries: max |b - a| "
                f"{cmp['max_abs_difference_points']:.2f} points (goal <= 1), top-1 same "
                f"{cmp['top1_same_percent']:.1f} %, {order_key.split('_')[0]} order same "
                f"{cmp[order_key]:.1f} %, max |score b - a| {cmp['max_abs_score_difference']:.2g}"
            )
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    lines.append(f"timings: {secs}")
    if a is not None:
        lines.append(f"  path (a): {a.extra['ms_per_image']:.2f} ms per image "
                     "(DICOM round trip, pre-processing, CNN)")
    if b is not None:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in b.seconds.items())
        lines.append(f"  path (b): {parts} (s; ms_per_query in ms)")
    return "\n".join(lines)
