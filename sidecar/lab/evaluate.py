"""The harness behind ``sidecar evaluate``: the model to test, path (a), the baselines, the run.

Path (a) is the model alone (the worker's DICOM pre-processing, the embedder, exact
cosine); path (b), the product, is :mod:`sidecar.lab.pipeline`. The protocol and the
metrics are described in docs/design/lab.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from sidecar.config import Config
from sidecar.embeddings import model as m
from sidecar.embeddings.model import Embedder
from sidecar.embeddings.registry import weights_embedder
from sidecar.lab.metrics import cosine_ranking, majority_rate, raw_pixel_vectors, retrieval_metrics
from sidecar.lab.neardup import (
    NEAR_DUP_SAMPLE,
    NearDuplicates,
    make_near_duplicates,
    near_duplicate_hits,
)
from sidecar.lab.pipeline import evaluate_pipeline
from sidecar.lab.report import ModelVectors, PathResult, Report, summarise
from sidecar.training.npz import (
    EvaluationError,
    LabelledSet,
    image_dataset,
    load_labelled_npz,
    prepare_datasets,
)

logger = logging.getLogger(__name__)

F32 = NDArray[np.float32]

Which = Literal["a", "b", "both"]
"""Which paths to run."""


def embed_datasets(
    datasets: Sequence[Dataset], config: Config, embedder: Embedder, batch: int = 256
) -> F32:
    """Path (a) vectors: :func:`prepare_datasets` then ``embedder.embed``, in batches."""
    parts: list[F32] = []
    for start in range(0, len(datasets), batch):
        prepared = prepare_datasets(datasets[start:start + batch], config, embedder.input_size,
                                    embedder.channels)
        parts.append(np.asarray(embedder.embed(prepared), dtype=np.float32))
    if not parts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.concatenate(parts)


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
    summarise(result, per_query, hits, near, n_boot, seed, q_lab)
    result.seconds["total"] = time.perf_counter() - t0
    result.extra["centred"] = centre
    return result


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
    summarise(result, per_query, hits, near, n_boot, seed, q_lab)
    t3 = time.perf_counter()
    n_images = len(gallery_ds) + len(query_ds) + (len(near.datasets) if near else 0)
    result.seconds = {"dicom": t1 - t0, "prepare_and_embed": t2 - t1, "rank_and_metrics": t3 - t2,
                      "total": t3 - t0}
    result.extra["ms_per_image"] = round((t2 - t1) / max(n_images, 1) * 1000.0, 3)
    return result, ModelVectors(g_vec, q_vec, n_vec)


def load_model(config: Config, path: Path | None = None) -> Embedder:
    """The embedder to evaluate.

    ``None``: the configured model (``load_embedder(config.embedding)``). A
    file with a ``.json`` description beside it (the layout of the shipped
    weights): SliceNetV1 weights, loaded by ``load_weights`` and run at
    ``embedding.input_size``. A ``.onnx`` file (with its ``.onnx.json``
    contract) or any other file: as ``embedding.model_path`` would load it
    (ONNX or TorchScript).

    Raises
    ------
    sidecar.embeddings.model.ModelError
        The file is missing, corrupt or does not fit.
    """
    if path is None:
        return m.load_embedder(config.embedding)
    if path.suffix.lower() == m.ONNX_SUFFIX or not path.with_suffix(".json").is_file():
        return m.load_embedder(config.embedding.model_copy(update={"model_path": path}))
    embedder = weights_embedder(path, config.embedding)
    _, info = m.load_weights(path)
    if config.embedding.input_size != info.input_size:
        logger.warning("embedding.input_size %d differs from the %d the weights %s were made "
                       "for; model id %s", config.embedding.input_size, info.input_size,
                       path.name, embedder.model_id)
    if not info.trained:
        logger.warning("weights %s are marked as not trained", path.name)
    return embedder


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
