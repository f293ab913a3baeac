"""On-site adaptation: fine-tune the model on the archive's own slices, keep it only if better.

One run (:func:`run_adaptation`), bounded in slices, epochs and time:

1. **Sample** up to ``adaptation.max_slices`` slices that the current model has
   embedded in stable studies: whole series in a seeded random order, exactly
   the slices the worker chose, read from storage through the catalogue and
   prepared with :func:`sidecar.embeddings.preprocess.prepare` as the worker
   prepares them. Each slice's group is its series and it carries its study
   (positives from the DICOM structure: neighbouring slices of a series and,
   with probability ``adaptation.study_positives``, slices of the study's
   other series).
2. **Split** the sampled series, seeded, into training and held-out series
   (``adaptation.holdout_fraction``); no series is on both sides, nor any
   study when the sample spans two studies or more.
3. **Fine-tune** from the current model's weights (``init_state``) with the
   training library (:mod:`sidecar.training.selfsup`), self-supervised, for
   ``adaptation.epochs`` epochs within what is left of
   ``adaptation.time_budget_minutes``.
4. **Score** the current and the fine-tuned model on the held-out slices with
   the library's label-free criterion (``label_free_score``, higher is better,
   same seed for both).
5. **Decide**: the candidate is accepted only when its score is higher by at
   least ``adaptation.min_improvement``. Rejected: logged at INFO with both
   scores, nothing is written. Accepted: the weights are saved under
   ``<data_dir>/models/<model_id>.pt`` (+ ``.json`` with the recipe and a
   manifest: slices, series, held-out scores, parent model, time), loaded back
   and checked, and only then recorded in the catalogue's settings
   (:data:`MODEL_HISTORY_KEY`, then :data:`ADAPTED_MODEL_KEY`, the commit
   point). The caller switches the running service to it
   (``sidecar.service.app.Embedding.switch_model``: background re-embedding while the
   old index serves, then an atomic swap).

An interrupted run leaves at most unreferenced files in ``models/``: nothing
is recorded before the weights file is complete and verified. One run at a
time per data directory (a lock file in ``models/``).

Which model a service loads (:func:`load_service_embedder`):
``embedding.model_path`` when set (a TorchScript file; adaptation is then
off), else the adapted model recorded in :data:`ADAPTED_MODEL_KEY`, else the
shipped weights. ``sidecar model restore`` changes the recorded model
(:func:`restore_model`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import torch
from pydicom import dcmread
from sqlalchemy import Engine, func, select

from sidecar.config import Config, EmbeddingConfig
from sidecar.db.models import (
    INSTANCE,
    SERIES,
    SERIES_VECTOR,
    SLICE_VECTOR,
    STUDY,
    InstanceState,
)
from sidecar.db.vectors import ACTIVE_MODEL_KEY, VectorRepository
from sidecar.embeddings import preprocess
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
MIN_SERIES = 2
"""Fewest sampled series for a run (at least one for training, one held out)."""
MIN_SLICES = 8
"""Fewest sampled slices for a run."""

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class AdaptationBusy(SidecarError):
    """Another adaptation run holds the data directory's adaptation lock."""


class RestoreError(SidecarError):
    """The model to restore is unknown, or its weights file is missing or corrupt."""


# ====================================================================== records
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


# ====================================================================== loading
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
                         batch_size=cfg.batch_size, source=str(path))


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
    from sidecar.embeddings import model as models  # looked up at call time (tests patch it)

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


def _weights_for(config: Config, vectors: VectorRepository) -> Path:
    recorded = selected_weights(vectors)
    return config.data_dir / recorded if recorded else builtin_weights_path()


# =================================================================== sampling
@dataclass
class SliceSample:
    """Prepared slices of the archive.

    Attributes
    ----------
    images
        ``(N, 1, S, S)`` float32 in [0, 1].
    groups
        ``(N,)`` series primary key of each slice (the held-out split keeps
        series whole).
    unreadable
        Slices that were chosen but could not be read or prepared.
    grouped
        The groups are series whose slices are positives for training
        (``False``: independent images, each its own group).
    studies
        ``(N,)`` study primary key of each slice (``-1``: unknown), for the
        positives from other series of a study (``adaptation.study_positives``).
    """

    images: F32
    groups: I64
    unreadable: int = 0
    grouped: bool = True
    studies: I64 | None = None

    @property
    def series(self) -> int:
        """Number of distinct series."""
        return len(np.unique(self.groups))

    def subset(self, mask: npt.NDArray[np.bool_]) -> SliceSample:
        """The slices where ``mask`` is true."""
        studies = None if self.studies is None else self.studies[mask]
        return SliceSample(self.images[mask], self.groups[mask], grouped=self.grouped,
                           studies=studies)


def sample_slices(
    config: Config,
    engine: Engine,
    model_id: str,
    *,
    max_slices: int,
    seed: int,
    input_size: int,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
) -> SliceSample:
    """Read and prepare up to ``max_slices`` slices embedded by ``model_id`` in stable studies.

    Whole series are taken in a seeded random order until the next one would
    exceed ``max_slices`` (the first one is cut to it); their slices are the
    ones the worker embedded (sampled along the series), read from storage and
    prepared as the worker prepares them. Reading stops at ``deadline``
    (``time.monotonic()``) or when ``cancel`` is set.
    """
    with engine.connect() as conn:
        counts = conn.execute(
            select(SLICE_VECTOR.c.series_pk, func.count(), func.min(SLICE_VECTOR.c.study_pk))
            .join(STUDY, STUDY.c.id == SLICE_VECTOR.c.study_pk)
            .where(SLICE_VECTOR.c.model_id == model_id, STUDY.c.stable.is_(True),
                   SLICE_VECTOR.c.frame >= 0)
            .group_by(SLICE_VECTOR.c.series_pk)
            .order_by(SLICE_VECTOR.c.series_pk)
        ).all()
    study_of = {int(row[0]): int(row[2]) for row in counts}
    order = np.random.default_rng(seed).permutation(len(counts))
    chosen: list[int] = []
    total = 0
    for i in order:
        series_pk, n = int(counts[i][0]), int(counts[i][1])
        if total + n > max_slices and chosen:
            continue  # a smaller series may still fit
        chosen.append(series_pk)
        total += n
        if total >= max_slices:
            break
    images: list[F32] = []
    groups: list[int] = []
    studies: list[int] = []
    unreadable = 0
    storage = config.storage_dir
    for series_pk in chosen:
        if cancel is not None and cancel.is_set():
            break
        if deadline is not None and time.monotonic() > deadline:
            logger.info("adaptation: time budget reached while reading slices")
            break
        with engine.connect() as conn:
            rows = conn.execute(
                select(SLICE_VECTOR.c.instance_pk, SLICE_VECTOR.c.frame, INSTANCE.c.file_path)
                .join(INSTANCE, INSTANCE.c.id == SLICE_VECTOR.c.instance_pk)
                .where(SLICE_VECTOR.c.series_pk == series_pk,
                       SLICE_VECTOR.c.model_id == model_id,
                       SLICE_VECTOR.c.frame >= 0,
                       INSTANCE.c.state == InstanceState.EMBEDDED)
                .order_by(SLICE_VECTOR.c.instance_pk, SLICE_VECTOR.c.frame)
            ).all()
        frames: dict[str, list[int]] = defaultdict(list)
        for _, frame, file_path in rows:
            frames[str(file_path)].append(int(frame))
        for file_path, wanted in frames.items():
            room = max_slices - len(groups)
            if room <= 0:
                break
            wanted = sorted(wanted)[:room]
            try:
                ds = dcmread(storage / file_path)
                prepared = preprocess.prepare(ds, config.preprocess, input_size, frames=wanted)
            except Exception as exc:  # noqa: BLE001 - counted; the run goes on without it
                logger.debug("adaptation: cannot read %s: %s", file_path, exc)
                unreadable += len(wanted)
                continue
            images.extend(prepared)
            groups.extend([series_pk] * len(prepared))
            studies.extend([study_of[series_pk]] * len(prepared))
    if not images:
        return SliceSample(np.zeros((0, 1, input_size, input_size), np.float32),
                           np.zeros(0, np.int64), unreadable, studies=np.zeros(0, np.int64))
    return SliceSample(np.stack(images)[:, None].astype(np.float32),
                       np.asarray(groups, dtype=np.int64), unreadable,
                       studies=np.asarray(studies, dtype=np.int64))


def split_by_series(
    groups: I64, fraction: float, seed: int, studies: I64 | None = None,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Seeded split of the slices into (training, held-out) masks, whole series on each side.

    At least one series is held out and at least one trains (needs two series).
    With ``studies`` (the study of each slice) whole studies are held out when
    there are at least two, so that no study has series on both sides (its
    other series are positives in training); ``fraction`` then counts studies.
    """
    series = np.unique(groups)
    if len(series) < 2:
        raise ValueError("need at least two series to hold one out")
    units, keys = series, groups
    if studies is not None and studies.shape == groups.shape and (studies >= 0).all():
        if len(np.unique(studies)) >= 2:
            units, keys = np.unique(studies), studies
    n_hold = min(len(units) - 1, max(1, round(fraction * len(units))))
    held = np.random.default_rng(seed + 1).permutation(units)[:n_hold]
    hold_mask = np.isin(keys, held)
    return ~hold_mask, hold_mask


# ==================================================================== training
@dataclass(frozen=True)
class TrainingLibrary:
    """The training functions a run uses (:mod:`sidecar.training.selfsup`; tests swap them)."""

    recipe_type: Any
    train_model: Callable[..., Any]
    save_weights: Callable[..., Path]
    label_free_score: Callable[..., float]


def training_library() -> TrainingLibrary:
    """The real training library (imports it)."""
    from sidecar.training import selfsup as training

    return TrainingLibrary(
        recipe_type=training.TrainRecipe,
        train_model=training.train_model,
        save_weights=training.save_weights,
        label_free_score=training.label_free_score,
    )


def make_recipe(
    library: TrainingLibrary, config: Config, *, input_size: int, hparams: dict[str, Any],
    seconds: float, parent: Mapping[str, Any] | None = None,
) -> Any:
    """The recipe of one run: the parent model's recipe with the ``adaptation`` settings.

    ``parent`` is the recipe the current model was trained with (its weights
    JSON, ``training.recipe``): fine-tuning continues the same objective
    (temperature, augmentations, margins) on the archive's slices; without
    one, the library's defaults. The architecture and input size are the
    current model's (fine-tuning keeps them), epochs, seed and
    ``study_positives`` the ``adaptation`` settings, the torch threads
    ``embedding.threads`` (a core stays free for ingest). ``seconds``, the
    training's share of the time budget, goes into the recipe when the recipe
    has a time-limit field; otherwise the budget is checked after every epoch.
    Source balancing is off (the archive is one source).
    """
    names = set(getattr(library.recipe_type, "__dataclass_fields__", ()))
    kwargs: dict[str, Any] = {k: v for k, v in (parent or {}).items() if k in names}
    kwargs.pop("source_balance", None)
    kwargs.pop("max_seconds", None)
    kwargs |= {
        "epochs": config.adaptation.epochs,
        "seed": config.adaptation.seed,
        "input_size": input_size,
        "hparams": hparams,
        "threads": config.embedding.threads,
        "study_prob": config.adaptation.study_positives,
    }
    names = names or set(kwargs)
    for name in ("max_seconds", "time_budget_s", "time_budget_seconds"):
        if name in names:
            kwargs[name] = max(1.0, seconds)
            break
    return library.recipe_type(**{k: v for k, v in kwargs.items() if k in names})


class _Stop(Exception):
    """Raised from the training's progress callback to end a run early."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


# ===================================================================== the run
@dataclass
class AdaptationOutcome:
    """What one adaptation run found and decided.

    Attributes
    ----------
    accepted
        The candidate replaced the current model (recorded in the catalogue).
    reason
        One line saying why (scores, or why nothing was trained).
    current_model_id
        The model the run started from.
    candidate_model_id
        The fine-tuned model's id (``None`` when nothing was trained).
    current_score, candidate_score
        Held-out label-free scores.
    slices, series, holdout_slices, holdout_series
        What was sampled, and the held-out part of it.
    seconds
        Wall time of the run.
    weights_path
        The saved weights (accepted runs, or every trained candidate with
        ``keep_rejected``).
    created_at
        UTC time the weights were saved, ISO 8601.
    embedder
        The accepted model, loaded from its saved file (accepted runs only).
    """

    accepted: bool
    reason: str
    current_model_id: str
    candidate_model_id: str | None = None
    current_score: float | None = None
    candidate_score: float | None = None
    slices: int = 0
    series: int = 0
    holdout_slices: int = 0
    holdout_series: int = 0
    seconds: float = 0.0
    weights_path: Path | None = None
    created_at: str = ""
    embedder: Embedder | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the embedder)."""
        out = {k: v for k, v in asdict(self).items() if k != "embedder"}
        out["weights_path"] = None if self.weights_path is None else str(self.weights_path)
        return out


_RUN_LOCK = threading.Lock()


@contextlib.contextmanager
def adaptation_lock(config: Config) -> Iterator[None]:
    """One adaptation run at a time: in this process and across processes (a lock file).

    Raises
    ------
    AdaptationBusy
        Another run holds the lock.
    """
    if not _RUN_LOCK.acquire(blocking=False):
        raise AdaptationBusy("an adaptation run is already in progress in this process")
    fh: TextIO | None = None
    try:
        directory = config.data_dir / MODELS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        fh = (directory / ".adapt.lock").open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise AdaptationBusy(
                f"an adaptation run is already in progress (lock {directory / '.adapt.lock'})"
            ) from exc
        yield
    finally:
        if fh is not None:
            fh.close()  # closing releases the flock
        _RUN_LOCK.release()


def _utc_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _candidate_embedder(state: Any, base_module: Any, current: Embedder, model_id: str) -> Any:
    """A TorchEmbedder of the trained ``state`` on the base model's architecture."""
    from sidecar.embeddings.network import SliceNetV1

    module = SliceNetV1(base_module.hparams)
    module.load_state_dict(state, strict=True)
    return TorchEmbedder(module, model_id=model_id, input_size=current.input_size,
                         batch_size=getattr(current, "batch_size", 32), source="candidate")


def run_adaptation(
    config: Config,
    engine: Engine,
    current: Embedder,
    *,
    library: TrainingLibrary | None = None,
    record: bool = True,
    cancel: threading.Event | None = None,
) -> AdaptationOutcome:
    """One adaptation run: sample, split, fine-tune, score, decide, and record when accepted.

    Parameters
    ----------
    config
        The configuration (``adaptation`` settings, data directory, preprocessing).
    engine
        The process's engine.
    current
        The running model; it must be the SliceNetV1 weights the service loads
        (the shipped or the recorded adapted weights, not a TorchScript file).
    library
        The training functions (default: :func:`training_library`).
    record
        Record an accepted model in the catalogue (``False``: only save its
        weights, e.g. for an evaluation outside the archive).
    cancel
        Set it to stop the run early (checked between series while reading and
        after every training epoch); nothing is recorded then.

    Returns
    -------
    AdaptationOutcome
        The decision and the figures; ``embedder`` is the accepted model.

    Raises
    ------
    AdaptationBusy
        Another run is in progress.
    """
    start = time.monotonic()
    deadline = start + config.adaptation.time_budget_minutes * 60.0
    with adaptation_lock(config):
        outcome = _run(config, engine, current, library, record, deadline,
                       cancel or threading.Event())
    outcome.seconds = time.monotonic() - start
    log = logger.warning if outcome.accepted else logger.info
    log("on-site adaptation: %s (%.0f s)", outcome.reason, outcome.seconds)
    return outcome


def _run(
    config: Config,
    engine: Engine,
    current: Embedder,
    library: TrainingLibrary | None,
    record: bool,
    deadline: float,
    cancel: threading.Event,
) -> AdaptationOutcome:
    acfg = config.adaptation
    vectors = VectorRepository(engine)
    out = AdaptationOutcome(accepted=False, reason="", current_model_id=current.model_id)
    if config.embedding.model_path is not None:
        out.reason = ("skipped: embedding.model_path is set (a TorchScript file); adaptation "
                      "fine-tunes the built-in or an adapted SliceNetV1 model only")
        return out
    active = vectors.get_setting(ACTIVE_MODEL_KEY)
    if active and active != current.model_id:
        out.reason = (f"skipped: a model change is in progress (model {active} serves while "
                      f"{current.model_id} is embedded); try again when it has finished")
        return out
    weights = _weights_for(config, vectors)
    try:
        base = weights_embedder(weights, config.embedding)
    except ModelError as exc:
        out.reason = f"skipped: cannot load the current weights: {exc}"
        return out
    if base.model_id != current.model_id:
        out.reason = (f"skipped: the running model {current.model_id} is not the weights "
                      f"{weights.name} ({base.model_id})")
        return out

    sample = sample_slices(
        config, engine, current.model_id, max_slices=acfg.max_slices, seed=acfg.seed,
        input_size=current.input_size, deadline=deadline, cancel=cancel,
    )
    if cancel.is_set():
        out.reason = f"cancelled while reading slices; model {current.model_id} stays"
        return out
    out = fine_tune(config, sample, current, weights, config.data_dir / MODELS_DIR,
                    library=library, deadline=deadline, cancel=cancel)
    if out.accepted and out.weights_path is not None and record:
        saved = out.weights_path
        try:
            rel = str(saved.resolve().relative_to(config.data_dir.resolve()))
        except ValueError:
            rel = str(saved.resolve())
        record_adapted_model(vectors, ModelRecord(
            model_id=str(out.candidate_model_id), path=rel, parent=current.model_id,
            created_at=out.created_at,
            scores={"parent": float(out.current_score or 0.0),
                    "candidate": float(out.candidate_score or 0.0)},
            slices=out.slices, series=out.series,
        ))
    return out


def fine_tune(
    config: Config,
    sample: SliceSample,
    current: Embedder,
    weights: Path,
    directory: Path,
    *,
    library: TrainingLibrary | None = None,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
    keep_rejected: bool = False,
) -> AdaptationOutcome:
    """Split, fine-tune, score and decide on prepared slices (steps 2 to 5; no recording).

    Parameters
    ----------
    config
        The ``adaptation`` settings (held-out fraction, epochs, seed, minimum
        improvement) and the embedding settings.
    sample
        The slices; ``groups`` are series (or unique ids for images without
        series, ``grouped`` false: each is then its own group).
    current
        The model to start from and to beat; ``weights`` are its SliceNetV1
        weights (``.pt`` with ``.json``).
    directory
        Where an accepted candidate's weights are saved.
    library
        The training functions (default: :func:`training_library`).
    deadline
        ``time.monotonic()`` by which training must have finished.
    cancel
        Stops the run at the next epoch when set.
    keep_rejected
        Save the candidate's weights even when it is rejected (evaluation).

    Returns
    -------
    AdaptationOutcome
        Not recorded anywhere; ``embedder`` is the accepted model loaded from
        its saved file.
    """
    acfg = config.adaptation
    cancel = cancel or threading.Event()
    deadline = deadline if deadline is not None else (
        time.monotonic() + acfg.time_budget_minutes * 60.0)
    out = AdaptationOutcome(accepted=False, reason="", current_model_id=current.model_id)
    out.slices, out.series = len(sample.groups), sample.series
    if out.slices < MIN_SLICES or out.series < MIN_SERIES:
        out.reason = (f"skipped: too few embedded slices of stable studies ({out.slices} slices "
                      f"in {out.series} series; at least {MIN_SLICES} in {MIN_SERIES} needed); "
                      f"model {current.model_id} stays")
        return out
    train_mask, hold_mask = split_by_series(sample.groups, acfg.holdout_fraction, acfg.seed,
                                            sample.studies if sample.grouped else None)
    train, held = sample.subset(train_mask), sample.subset(hold_mask)
    out.holdout_slices, out.holdout_series = len(held.groups), held.series

    lib = library or training_library()
    base_module, base_info = load_weights(weights)
    parent_recipe = (base_info.description.get("training") or {}).get("recipe")
    # Scoring both models costs about as much as embedding the held-out slices twice;
    # keep a tenth of the remaining budget for it.
    train_seconds = (deadline - time.monotonic()) * 0.9
    if train_seconds <= 1.0:
        out.reason = f"skipped: time budget spent reading slices; model {current.model_id} stays"
        return out
    recipe = make_recipe(lib, config, input_size=current.input_size,
                         hparams=base_module.hparams.to_json(), seconds=train_seconds,
                         parent=parent_recipe if isinstance(parent_recipe, Mapping) else None)
    train_deadline = time.monotonic() + train_seconds

    def progress(*_args: Any, **_kwargs: Any) -> None:
        if cancel.is_set():
            raise _Stop("cancelled during training")
        if time.monotonic() > train_deadline:
            raise _Stop(f"the time budget ({acfg.time_budget_minutes:g} min) ran out during "
                        "training (lower adaptation.max_slices or epochs, or raise the budget)")

    init_state = {k: v.detach().clone() for k, v in base_module.state_dict().items()}
    logger.info(
        "on-site adaptation: fine-tuning model %s on %d slices of %d series (%d slices of %d "
        "series held out), %d epochs", current.model_id, len(train.groups), train.series,
        out.holdout_slices, out.holdout_series, acfg.epochs,
    )
    try:
        result = lib.train_model(train.images, recipe, init_state=init_state,
                                 groups=train.groups if sample.grouped else None,
                                 studies=train.studies if sample.grouped else None,
                                 progress=progress)
    except _Stop as stop:
        out.reason = f"stopped: {stop.why}; model {current.model_id} stays"
        return out
    candidate_id = str(result.model_id)
    out.candidate_model_id = candidate_id
    candidate = _candidate_embedder(result.state_dict, base_module, current, candidate_id)
    out.current_score = float(lib.label_free_score(current, held.images, seed=acfg.seed))
    out.candidate_score = float(lib.label_free_score(candidate, held.images, seed=acfg.seed))
    gain = out.candidate_score - out.current_score
    scores = (f"held-out score {out.candidate_score:.4f} vs {out.current_score:.4f} of model "
              f"{current.model_id} ({gain:+.4f}; at least +{acfg.min_improvement:g} needed) on "
              f"{out.holdout_slices} slices of {out.holdout_series} series")
    accept = math.isfinite(out.candidate_score) and gain >= acfg.min_improvement
    if not accept:
        out.reason = f"candidate {candidate_id} rejected: {scores}; model {current.model_id} stays"
        if not keep_rejected:
            return out

    out.created_at = _utc_iso()
    manifest: dict[str, Any] = {
        "made_by": "on-site adaptation (sidecar.training.adapt)",
        "parent_model_id": current.model_id,
        "accepted": accept,
        "slices": out.slices,
        "series": out.series,
        "train_slices": len(train.groups),
        "train_series": train.series,
        "holdout_slices": out.holdout_slices,
        "holdout_series": out.holdout_series,
        "holdout_scores": {"parent": out.current_score, "candidate": out.candidate_score},
        "min_improvement": acfg.min_improvement,
        "seed": acfg.seed,
        "created_at": out.created_at,
        "train_seconds": float(getattr(result, "seconds", 0.0)),
    }
    saved = Path(lib.save_weights(directory / f"{candidate_id}.pt", result, recipe, manifest))
    try:
        loaded = weights_embedder(saved, config.embedding)
    except ModelError as exc:
        out.reason = f"candidate {candidate_id} not used: its saved weights do not load: {exc}"
        return out
    out.candidate_model_id = loaded.model_id
    out.weights_path = saved
    if accept:
        out.embedder = loaded
        out.accepted = True
        out.reason = f"model {loaded.model_id} accepted: {scores}"
    return out


def adapt_npz(
    config: Config,
    npz: Path,
    out_dir: Path,
    *,
    weights: Path | None = None,
    library: TrainingLibrary | None = None,
) -> AdaptationOutcome:
    """Adapt a model on the ``train`` pixels of a labelled ``.npz`` (labels unused).

    For evaluation outside an archive (``sidecar adapt --from-npz``): up to
    ``adaptation.max_slices`` train images (seeded sample) become DICOM and
    are prepared exactly as ``sidecar evaluate`` and the worker prepare them,
    then :func:`fine_tune` runs with the ``adaptation`` settings, each image
    being its own group. The candidate's weights are saved in ``out_dir``
    whether accepted or not (``sidecar evaluate FILE --model WEIGHTS`` then
    measures what adaptation adds); nothing is recorded in any catalogue.

    Parameters
    ----------
    config
        The configuration (``adaptation``, ``embedding``, ``preprocess``).
    npz
        The labelled set (MedMNIST layout, :func:`sidecar.lab.evaluate.load_labelled_npz`).
    out_dir
        Where the candidate's ``.pt`` and ``.json`` go.
    weights
        SliceNetV1 weights to start from (default: the shipped weights).
    library
        The training functions (default: :func:`training_library`).
    """
    from sidecar.lab import evaluate as ev

    start = time.monotonic()
    weights = weights or builtin_weights_path()
    current = weights_embedder(weights, config.embedding)
    data = ev.load_labelled_npz(npz)
    images, _ = data.split("train")
    n = min(len(images), config.adaptation.max_slices)
    chosen = np.sort(np.random.default_rng(config.adaptation.seed).permutation(len(images))[:n])
    datasets = [ev.image_dataset(images[i], key=f"{data.name}/train/{i}",
                                 patient_id=f"ADAPT-{i:06d}") for i in chosen]
    prepared = ev.prepare_datasets(datasets, config, current.input_size)
    sample = SliceSample(prepared[:, None], chosen.astype(np.int64), grouped=False)
    outcome = fine_tune(config, sample, current, weights, out_dir, library=library,
                        keep_rejected=True)
    outcome.seconds = time.monotonic() - start
    logger.info("adaptation on %s: %s (%.0f s)", npz.name, outcome.reason, outcome.seconds)
    return outcome


# ============================================================ list / restore
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


def missing_series(engine: Engine, model_id: str) -> int:
    """Series with embedded instances in stable studies that have no vectors of ``model_id``."""
    have = select(SERIES_VECTOR.c.series_pk).where(SERIES_VECTOR.c.model_id == model_id)
    with engine.connect() as conn:
        n = conn.execute(
            select(func.count(func.distinct(INSTANCE.c.series_pk)))
            .join(SERIES, SERIES.c.id == INSTANCE.c.series_pk)
            .join(STUDY, STUDY.c.id == SERIES.c.study_pk)
            .where(STUDY.c.stable.is_(True), INSTANCE.c.state == InstanceState.EMBEDDED,
                   INSTANCE.c.series_pk.not_in(have))
        ).scalar()
    return int(n or 0)


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
    missing = missing_series(engine, model_id)
    has_vectors = vectors.count_vectors().get(model_id, 0) > 0
    activated = False
    if has_vectors and missing == 0 and not service_running:
        vectors.set_setting(ACTIVE_MODEL_KEY, model_id)
        activated = True
    logger.warning("model %s restored (was %s): %s", model_id, current or "?",
                   "active now" if activated else
                   f"{missing} series to embed at the next start of sidecar serve")
    return RestorePlan(model_id, current, path, missing, activated)


def index_in_use(config: Config) -> bool:
    """Whether another process holds an index lock (``sidecar serve``, ``embed``, ``reindex``)."""
    root = config.index_dir
    if not root.is_dir():
        return False
    for lock in sorted(root.glob("*/.lock")):
        with lock.open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def describe(rows: Sequence[ModelInfo]) -> list[str]:
    """``sidecar model list`` as text lines."""
    lines = [f"{'':2}{'model':<22} {'source':<10} {'vectors':>8}  {'parent':<18} "
             f"{'held-out score':<17} created"]
    for r in rows:
        mark = ("*" if r.active else " ") + (">" if r.selected else " ")
        score = ""
        if "candidate" in r.scores and "parent" in r.scores:
            score = f"{r.scores['candidate']:.4f} ({r.scores['parent']:.4f})"
        source = r.source if r.available or r.source != "adapted" else "adapted!"
        lines.append(f"{mark}{r.model_id:<22} {source:<10} {r.vectors:>8}  "
                     f"{r.parent or '-':<18} {score or '-':<17} {r.created_at or '-'}")
    lines.append("* active (its index serves queries)   > loaded by the next start   "
                 "adapted!: weights file missing")
    return lines
