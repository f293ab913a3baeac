"""Model records and loading: which model a service embeds with, and the models it knows.

A service loads ``embedding.model_path`` when set (an ONNX or TorchScript file), else
the adapted model recorded in :data:`ADAPTED_MODEL_KEY`, else the shipped
weights (:func:`load_service_embedder`). See docs/design/models.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sidecar.config import Config, EmbeddingConfig
from sidecar.db import model_queries
from sidecar.db.types import Engine
from sidecar.db.vectors import ACTIVE_MODEL_KEY, VectorRepository
from sidecar.embeddings import model as models  # models.load_embedder: tests patch it
from sidecar.embeddings.model import Embedder, ModelError, TorchEmbedder, load_weights
from sidecar.embeddings.network import builtin_weights_path, file_model_id
from sidecar.errors import SidecarError

logger = logging.getLogger(__name__)

ADAPTED_MODEL_KEY = "embedding.adapted_model"
"""Setting: the weights file (relative to the data directory) the service loads
when ``embedding.model_path`` is empty; absent or empty: the shipped weights."""
MODEL_HISTORY_KEY = "embedding.model_history"
"""Setting: JSON list of the adapted models recorded so far (:class:`ModelRecord`)."""
MODELS_DIR = "models"
"""Directory of adapted weights under the data directory."""


class RestoreError(SidecarError):
    """The model to restore is unknown, or its weights file is missing or corrupt."""


@dataclass(frozen=True)
class ModelRecord:
    """One model in the catalogue's model history.

    Attributes
    ----------
    model_id
        The model id at ``embedding.input_size`` (what vectors record).
    path
        Weights file relative to the data directory; ``None`` for the shipped weights.
    parent
        Model it was fine-tuned from.
    created_at
        UTC time of the recording, ISO 8601.
    scores
        Held-out label-free scores: ``{"parent": ..., "candidate": ...}``.
    slices, series
        Slices and series the run sampled (training and held out together).
    """

    model_id: str
    path: str | None
    parent: str | None = None
    created_at: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    slices: int = 0
    series: int = 0

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ModelRecord | None:
        """Rebuild from :meth:`to_json` output; ``None`` when ``data`` is not a record."""
        if not isinstance(data, dict) or not isinstance(data.get("model_id"), str):
            return None
        path = data.get("path")
        scores = data.get("scores") or {}
        return cls(
            model_id=data["model_id"],
            path=path if isinstance(path, str) and path else None,
            parent=data.get("parent") if isinstance(data.get("parent"), str) else None,
            created_at=str(data.get("created_at") or ""),
            scores={str(k): float(v) for k, v in scores.items()
                    if isinstance(v, int | float)} if isinstance(scores, dict) else {},
            slices=int(data.get("slices") or 0),
            series=int(data.get("series") or 0),
        )


def model_history(vectors: VectorRepository) -> list[ModelRecord]:
    """The adapted models recorded in the catalogue, oldest first."""
    raw = vectors.get_setting(MODEL_HISTORY_KEY)
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("setting %s is not valid JSON; model history ignored", MODEL_HISTORY_KEY)
        return []
    records = [ModelRecord.from_json(x) for x in items] if isinstance(items, list) else []
    return [r for r in records if r is not None]


def selected_weights(vectors: VectorRepository) -> str | None:
    """The recorded adapted weights (relative to the data directory), or ``None`` (shipped)."""
    value = vectors.get_setting(ADAPTED_MODEL_KEY)
    return value or None


def record_adapted_model(vectors: VectorRepository, record: ModelRecord) -> None:
    """Add ``record`` to the history, then select it (the second write is the commit point)."""
    history = [r for r in model_history(vectors) if r.model_id != record.model_id]
    history.append(record)
    vectors.set_setting(MODEL_HISTORY_KEY, json.dumps([r.to_json() for r in history]))
    vectors.set_setting(ADAPTED_MODEL_KEY, record.path or "")


def weights_embedder(path: Path, cfg: EmbeddingConfig) -> TorchEmbedder:
    """An embedder running SliceNetV1 weights (a ``.pt`` with its ``.json`` beside it).

    The model id is the weights file's id, with ``-s<size>`` when
    ``cfg.input_size`` differs from the size the weights were made for (as for
    the shipped weights).

    Raises
    ------
    ModelError
        A file is missing or corrupt, or the tensors do not fit.
    """
    module, info = load_weights(path)
    torch.set_num_threads(cfg.threads)
    size = cfg.input_size
    model_id = info.model_id if size == info.input_size else f"{info.model_id}-s{size}"
    return TorchEmbedder(module, model_id=model_id, input_size=size,
                         batch_size=cfg.batch_size, source=str(path),
                         channels=module.hparams.in_channels)


def builtin_model_id(cfg: EmbeddingConfig) -> str:
    """Model id of the shipped weights at ``cfg.input_size`` (reads the JSON and the file)."""
    path = builtin_weights_path()
    desc = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    file_id = file_model_id(path.read_bytes())
    native = int(desc["input_size"])
    return file_id if native == cfg.input_size else f"{file_id}-s{cfg.input_size}"


def load_service_embedder(config: Config, vectors: VectorRepository) -> Embedder:
    """The model a service (or a one-shot command) embeds with.

    ``embedding.model_path`` when set; else the adapted model recorded by
    on-site adaptation or ``sidecar model restore``; else the shipped weights.

    Raises
    ------
    ModelError
        The model file is missing, corrupt or does not fit. A recorded adapted
        model that cannot be loaded is an error, not a silent fallback (that
        would re-embed the whole archive): restore another model first.
    """
    recorded = selected_weights(vectors)
    if config.embedding.model_path is not None:
        if recorded:
            logger.warning(
                "embedding.model_path is set: the adapted model %s recorded in the catalogue "
                "is not used", recorded,
            )
        return models.load_embedder(config.embedding)
    if not recorded:
        return models.load_embedder(config.embedding)
    path = config.data_dir / recorded
    try:
        embedder = weights_embedder(path, config.embedding)
    except ModelError as exc:
        raise ModelError(
            path,
            f"{exc.problem} (this adapted model is recorded in the catalogue as the model to "
            "use; `sidecar model restore` selects another one)",
        ) from exc
    logger.info(
        "embedding model %s: the adapted model %s recorded by on-site adaptation is used "
        "instead of the shipped weights (embedding.model_path is empty)",
        embedder.model_id, path,
    )
    return embedder


def weights_for(config: Config, vectors: VectorRepository) -> Path:
    """The SliceNetV1 weights the catalogue selects: the recorded adapted ones, else the shipped."""
    recorded = selected_weights(vectors)
    return config.data_dir / recorded if recorded else builtin_weights_path()


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``sidecar model list``."""

    model_id: str
    source: str  # "shipped", "adapted", "configured" or "unknown"
    path: str | None
    vectors: int
    active: bool  # its index serves queries (the catalogue's active model)
    selected: bool  # the model a service starting now loads
    parent: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    created_at: str = ""
    available: bool = True  # its weights can be loaded (restore possible)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return asdict(self)


def list_models(config: Config, vectors: VectorRepository) -> list[ModelInfo]:
    """Every model the catalogue knows: the shipped one, the adapted ones, those with vectors.

    With ``embedding.model_path`` set, no shipped or adapted model is
    ``selected`` (the configured file is loaded); models with vectors that are
    neither shipped nor adapted are listed with source ``other``.
    """
    counts = vectors.count_vectors()
    active = vectors.get_setting(ACTIVE_MODEL_KEY)
    recorded = selected_weights(vectors)
    configured = config.embedding.model_path is not None
    shipped = builtin_model_id(config.embedding)
    rows = [ModelInfo(
        model_id=shipped, source="shipped", path=str(builtin_weights_path()),
        vectors=counts.get(shipped, 0), active=active == shipped,
        selected=not configured and not recorded,
    )]
    seen = {shipped}
    for rec in model_history(vectors):
        if rec.model_id in seen:
            continue
        seen.add(rec.model_id)
        rows.append(ModelInfo(
            model_id=rec.model_id, source="adapted", path=rec.path,
            vectors=counts.get(rec.model_id, 0), active=active == rec.model_id,
            selected=not configured and rec.path is not None and rec.path == recorded,
            parent=rec.parent, scores=dict(rec.scores), created_at=rec.created_at,
            available=rec.path is not None and (config.data_dir / rec.path).is_file(),
        ))
    for model_id, n in sorted(counts.items()):
        if model_id not in seen:
            seen.add(model_id)
            rows.append(ModelInfo(model_id=model_id, source="other", path=None, vectors=n,
                                  active=active == model_id, selected=False, available=False))
    return rows


@dataclass(frozen=True)
class RestorePlan:
    """What ``sidecar model restore`` did."""

    model_id: str
    previous_model_id: str | None
    path: str | None  # None: the shipped weights
    missing_series: int  # embedded series without vectors of the restored model
    activated: bool  # recorded as the active model at once (its vectors are complete)


def restore_model(
    config: Config,
    engine: Engine,
    model_id: str | None = None,
    *,
    service_running: bool = False,
) -> RestorePlan:
    """Record another model as the one to use: the previous one, or ``model_id``.

    The previous model is the parent of the selected adapted model (the shipped
    weights when the shipped model is selected there is nothing to go back to).
    The restored model is recorded as the model to load (:data:`ADAPTED_MODEL_KEY`).
    When its stored vectors cover every embedded series and no service runs,
    it also becomes the active model at once (its index is loaded, or rebuilt
    from the stored vectors, at the next start: no CNN run). Otherwise the next
    start treats it as a model change: the current index keeps serving while
    the missing series are embedded in the background, then it swaps.

    Raises
    ------
    RestoreError
        ``embedding.model_path`` is set (the configuration decides), the model
        is unknown, there is no previous model, or its weights do not load.
    """
    if config.embedding.model_path is not None:
        raise RestoreError(
            "embedding.model_path is set: the configuration chooses the model; set it back "
            "to null to use the shipped or an adapted model"
        )
    vectors = VectorRepository(engine)
    history = {r.model_id: r for r in model_history(vectors)}
    by_path = {r.path: r for r in history.values() if r.path}
    shipped = builtin_model_id(config.embedding)
    recorded = selected_weights(vectors)
    current = by_path[recorded].model_id if recorded and recorded in by_path else (
        None if recorded else shipped)
    if model_id is None:
        if recorded is None:
            raise RestoreError(f"the shipped model {shipped} is in use: no previous model")
        parent = by_path[recorded].parent if recorded in by_path else None
        model_id = parent or shipped
    if model_id == shipped:
        path: str | None = None
    elif model_id in history and history[model_id].path:
        path = history[model_id].path
        assert path is not None
        try:
            weights_embedder(config.data_dir / path, config.embedding)
        except ModelError as exc:
            raise RestoreError(f"cannot restore model {model_id}: {exc}") from exc
    else:
        known = ", ".join([shipped, *history]) or "(none)"
        raise RestoreError(f"unknown model {model_id}; known models: {known}")
    vectors.set_setting(ADAPTED_MODEL_KEY, path or "")
    missing = model_queries.missing_series(engine, model_id)
    has_vectors = vectors.count_vectors().get(model_id, 0) > 0
    activated = False
    if has_vectors and missing == 0 and not service_running:
        vectors.set_setting(ACTIVE_MODEL_KEY, model_id)
        activated = True
    logger.warning("model %s restored (was %s): %s", model_id, current or "?",
                   "active now" if activated else
                   f"{missing} series to embed at the next start of sidecar serve")
    return RestorePlan(model_id, current, path, missing, activated)


