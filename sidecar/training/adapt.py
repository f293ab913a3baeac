"""On-site adaptation: fine-tune the model on the archive's own slices, keep it only if better.

One run (:func:`run_adaptation`) samples embedded slices of stable studies,
splits them by series, fine-tunes the current weights self-supervised, scores
both models on the held-out slices and records the candidate only when it is
better (:mod:`sidecar.embeddings.registry`). See docs/design/models.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from sidecar.archive.reader import read_stored
from sidecar.config import Config
from sidecar.db import model_queries
from sidecar.db.types import Engine
from sidecar.db.vectors import ACTIVE_MODEL_KEY, VectorRepository
from sidecar.embeddings import preprocess
from sidecar.embeddings.model import Embedder, ModelError, TorchEmbedder, load_weights
from sidecar.embeddings.network import SliceNetV1, builtin_weights_path
from sidecar.embeddings.registry import (
    MODELS_DIR,
    ModelRecord,
    record_adapted_model,
    weights_embedder,
    weights_for,
)
from sidecar.errors import SidecarError
from sidecar.training import selfsup
from sidecar.training.npz import image_dataset, load_labelled_npz, prepare_datasets

logger = logging.getLogger(__name__)

MIN_SERIES = 2
"""Fewest sampled series for a run (at least one for training, one held out)."""
MIN_SLICES = 8
"""Fewest sampled slices for a run."""

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class AdaptationBusy(SidecarError):
    """Another adaptation run holds the data directory's adaptation lock."""


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
    counts = model_queries.embedded_series(engine, model_id)
    study_of = {row.series_pk: row.study_pk for row in counts}
    order = np.random.default_rng(seed).permutation(len(counts))
    chosen: list[int] = []
    total = 0
    for i in order:
        series_pk, n = counts[i].series_pk, counts[i].slices
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
        rows = model_queries.embedded_slices(engine, series_pk, model_id)
        frames: dict[str, list[int]] = defaultdict(list)
        for _, frame, file_path in rows:
            frames[file_path].append(frame)
        for file_path, wanted in frames.items():
            room = max_slices - len(groups)
            if room <= 0:
                break
            wanted = sorted(wanted)[:room]
            try:
                ds = read_stored(storage, file_path)
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
    """The real training library (:mod:`sidecar.training.selfsup`)."""
    return TrainingLibrary(
        recipe_type=selfsup.TrainRecipe,
        train_model=selfsup.train_model,
        save_weights=selfsup.save_weights,
        label_free_score=selfsup.label_free_score,
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
    module = SliceNetV1(base_module.hparams)
    module.load_state_dict(state, strict=True)
    return TorchEmbedder(module, model_id=model_id, input_size=current.input_size,
                         batch_size=getattr(current, "batch_size", 32), source="candidate",
                         channels=module.hparams.in_channels)


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
        (the shipped or the recorded adapted weights, not a TorchScript or ONNX file).
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
        out.reason = ("skipped: embedding.model_path is set (a site model); adaptation "
                      "fine-tunes the built-in or an adapted SliceNetV1 model only")
        return out
    active = vectors.get_setting(ACTIVE_MODEL_KEY)
    if active and active != current.model_id:
        out.reason = (f"skipped: a model change is in progress (model {active} serves while "
                      f"{current.model_id} is embedded); try again when it has finished")
        return out
    weights = weights_for(config, vectors)
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
        The labelled set (MedMNIST layout, :func:`sidecar.training.npz.load_labelled_npz`).
    out_dir
        Where the candidate's ``.pt`` and ``.json`` go.
    weights
        SliceNetV1 weights to start from (default: the shipped weights).
    library
        The training functions (default: :func:`training_library`).
    """
    start = time.monotonic()
    weights = weights or builtin_weights_path()
    current = weights_embedder(weights, config.embedding)
    data = load_labelled_npz(npz)
    images, _ = data.split("train")
    n = min(len(images), config.adaptation.max_slices)
    chosen = np.sort(np.random.default_rng(config.adaptation.seed).permutation(len(images))[:n])
    datasets = [image_dataset(images[i], key=f"{data.name}/train/{i}",
                              patient_id=f"ADAPT-{i:06d}") for i in chosen]
    prepared = prepare_datasets(datasets, config, current.input_size)
    sample = SliceSample(prepared[:, None], chosen.astype(np.int64), grouped=False)
    outcome = fine_tune(config, sample, current, weights, out_dir, library=library,
                        keep_rejected=True)
    outcome.seconds = time.monotonic() - start
    logger.info("adaptation on %s: %s (%.0f s)", npz.name, outcome.reason, outcome.seconds)
    return outcome
