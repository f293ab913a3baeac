"""Query by images: DICOM datasets sampled, prepared and embedded as the worker does.

The embedder must be the serving model's (docs/design/search.md, "Query vectors").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from sidecar.config import Config
from sidecar.embeddings import preprocess
from sidecar.errors import BadQuery, IndexUnavailable
from sidecar.search.caches import spread, unit_rows
from sidecar.search.readonly import EmbeddingParts
from sidecar.search.types import MAX_QUERY_SLICES, EmbeddedImages, FloatArray


def embed_images(
    embedding: EmbeddingParts | None, cfg: Config, datasets: Sequence[Dataset]
) -> EmbeddedImages:
    """Embed query images with the serving model (sampled as the worker samples).

    Raises
    ------
    BadQuery
        No dataset, or one that cannot be embedded (no pixel data, bad header).
    IndexUnavailable
        Embedding is off, or the process's model is not the serving model
        (a model change is being re-embedded).
    """
    if not datasets:
        raise BadQuery("no query image")
    if embedding is None:
        raise IndexUnavailable("query by image off: embedding is turned off "
                               "(worker.enabled)")
    embedder = embedding.embedder
    serving = embedding.serving
    model_id, dim = serving.model_id, serving.dim
    if embedder is None:
        raise IndexUnavailable("query by image is unavailable: no embedding model here")
    if embedder.model_id != model_id:
        raise IndexUnavailable(
            f"query by image is unavailable: the index serving queries holds vectors of "
            f"model {model_id}, the configured model is {embedder.model_id} (a model change "
            "is being re-embedded, or the configuration names another model); query by an "
            "archived UID instead"
        )
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ds in enumerate(datasets):
        if not isinstance(ds, Dataset):
            raise BadQuery(f"query image {i + 1} is not a DICOM dataset")
        groups[str(ds.get("SeriesInstanceUID", "") or "")].append(i)
    arrays: list[FloatArray] = []
    for members in groups.values():
        infos: list[preprocess.FrameInfo[tuple[int, int]]] = []
        for i in members:
            try:
                infos.extend(preprocess.frame_infos(datasets[i], i))
            except Exception as exc:  # noqa: BLE001 - any unusable header is the query's fault
                raise BadQuery(
                    f"query image cannot be read: {exc} (image {_sop(datasets[i])})"
                ) from exc
        frames: dict[int, list[int]] = defaultdict(list)
        for i, frame in preprocess.sample(infos, cfg.preprocess):
            frames[i].append(frame)
        for i, chosen in frames.items():
            try:
                arrays.append(preprocess.prepare(
                    datasets[i], cfg.preprocess, embedder.input_size,
                    frames=sorted(chosen), channels=embedder.channels,
                ))
            except Exception as exc:  # noqa: BLE001 - as the worker: the image is unusable
                raise BadQuery(
                    f"query image cannot be embedded: {exc} (image {_sop(datasets[i])})"
                ) from exc
    if not arrays:
        raise BadQuery("the query images hold no slice to embed")
    batch = np.concatenate(arrays).astype(np.float32)
    keep = spread(batch.shape[0], MAX_QUERY_SLICES)
    vectors = embedder.embed(batch[keep])
    if vectors.shape[1] != dim:
        raise IndexUnavailable(f"the embedder gives {vectors.shape[1]}-d vectors, the index "
                               f"holds {dim}-d")
    first = datasets[0]

    def text(keyword: str) -> str:
        return str(first.get(keyword, "") or "").strip()

    return EmbeddedImages(
        model_id=model_id,
        vectors=unit_rows(vectors.astype(np.float32)),
        sop_instance_uid=text("SOPInstanceUID"),
        series_instance_uid=text("SeriesInstanceUID"),
        study_instance_uid=text("StudyInstanceUID"),
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
    )


def _sop(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "") or "(no SOP Instance UID)")


__all__ = ["embed_images"]
