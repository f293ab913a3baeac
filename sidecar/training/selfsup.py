"""Self-supervised training of the embedding CNN (no labels): the code behind ``sidecar train``.

SimCLR-style contrastive learning on slices exactly as the worker prepares them:
two augmented views per image (:mod:`~sidecar.training.augment`), positives from
the DICOM structure and NT-Xent (:mod:`~sidecar.training.contrastive`), AdamW with
warm-up and cosine decay; everything seeded (:class:`TrainRecipe`), so the same
torch version, threads and data give the same bytes. :func:`save_weights` writes
the ``.pt`` and its JSON (recipe, data manifest, history); :func:`label_free_score`
compares models on held-out unlabelled images. The method in full is in
docs/design/embeddings.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from sidecar.embeddings.model import Embedder, atomic_write
from sidecar.embeddings.network import (
    WEIGHTS_FORMAT,
    SliceNetV1,
    SliceNetV1Params,
    file_model_id,
    serialise_state_dict,
)
from sidecar.training.augment import augment
from sidecar.training.contrastive import (
    Projector,
    negative_exclusions,
    nt_xent,
    pick_partners,
    series_neighbours,
    study_others,
)

F32 = npt.NDArray[np.float32]

TRAINING_FORMAT: Final = 1
"""Version of the ``training`` record in the weights JSON."""

DEFAULT_HPARAMS: Final = SliceNetV1Params(input_pool=2)
"""Architecture the recipe trains by default (SliceNetV1: 128 px slices seen at 64 px)."""


# ======================================================================= recipe
@dataclass
class TrainRecipe:
    """Everything that determines a training run (with the data and the torch version).

    Attributes
    ----------
    epochs
        Passes over the training images.
    batch_size
        Images per step (each gives two views); the last incomplete batch of
        an epoch is dropped (a smaller one is used when there are fewer images).
    lr, weight_decay
        AdamW peak learning rate and weight decay.
    warmup_epochs
        Linear warm-up of the learning rate, then cosine decay to 0.
    temperature
        NT-Xent temperature.
    seed
        Seeds the initialisation, the batch order and every augmentation.
    input_size
        Side ``S`` of the training images (``embedding.input_size``).
    threads
        ``torch.set_num_threads`` during training.
    hparams
        SliceNetV1 hyper-parameters (:meth:`SliceNetV1Params.to_json`).
    projection_hidden, projection_dim
        Width of the projection MLP (discarded after training).
    crop_scale
        Area fraction range of the random resized crop.
    crop_ratio
        Aspect ratio range of the crop (log-uniform).
    rotation_deg
        Largest rotation either way.
    shift
        Largest extra translation, as a fraction of the image side.
    hflip
        Probability of a horizontal flip.
    padding
        What fills the view where the crop leaves the image: ``zeros`` (black,
        like the pre-processing's margins) or ``border`` (edge pixels
        repeated, like a shifted copy of an image with replicated edges).
    gamma, contrast, brightness
        Gamma in ``[1/(1+gamma), 1+gamma]`` (log-uniform), contrast factor in
        ``[1-contrast, 1+contrast]`` around the image mean, brightness offset
        in ``[-brightness, brightness]``.
    blur_prob, blur_sigma
        Probability and sigma range (pixels at ``input_size``) of a Gaussian blur.
    noise_std
        Largest standard deviation of additive Gaussian noise (uniform in ``[0, noise_std]``).
    neighbour_prob, neighbour_span
        Grouped images: probability that the second view is a neighbouring
        slice of the group, and how many positions away it may be.
    study_prob
        Images with a study (``studies``) that has other series: probability
        that the second view is a random slice of another series of the same
        study (tried before ``neighbour_prob``). 0 (the default) leaves
        studies unused.
    source_balance
        With ``sources`` (which input each image came from), an epoch draws
        ``N`` images with replacement, an image of a source of ``n`` images
        with probability proportional to ``n ** -source_balance``: 0 is plain
        shuffling (a large source dominates), 1 gives every source the same
        share. Small sources then supply more of each batch's negatives.
    max_seconds
        Stop after the step that passes this much training time (``None``: no
        limit); the learning-rate schedule is not shortened. A run stopped
        this way depends on the machine's speed, so it is not reproducible.
    """

    epochs: int = 40
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    temperature: float = 0.2
    seed: int = 0
    input_size: int = 128
    threads: int = 2
    hparams: dict[str, Any] = field(default_factory=DEFAULT_HPARAMS.to_json)
    projection_hidden: int = 256
    projection_dim: int = 128
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    rotation_deg: float = 10.0
    shift: float = 0.06
    hflip: float = 0.0
    padding: str = "zeros"
    gamma: float = 0.3
    contrast: float = 0.25
    brightness: float = 0.1
    blur_prob: float = 0.4
    blur_sigma: tuple[float, float] = (0.5, 3.0)
    noise_std: float = 0.04
    neighbour_prob: float = 0.5
    neighbour_span: int = 2
    study_prob: float = 0.0
    source_balance: float = 0.0
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        self.crop_ratio = (float(self.crop_ratio[0]), float(self.crop_ratio[1]))
        self.blur_sigma = (float(self.blur_sigma[0]), float(self.blur_sigma[1]))
        self.hparams = dict(self.hparams)
        problems = []
        if self.epochs < 1:
            problems.append("epochs must be >= 1")
        if self.batch_size < 2:
            problems.append("batch_size must be >= 2")
        if not self.lr > 0 or self.weight_decay < 0 or not self.temperature > 0:
            problems.append("lr and temperature must be > 0, weight_decay >= 0")
        if self.input_size < 16 or self.threads < 1 or self.warmup_epochs < 0:
            problems.append("input_size >= 16, threads >= 1, warmup_epochs >= 0")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            problems.append("crop_scale must satisfy 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append("crop_ratio must satisfy 0 < low <= high")
        if not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            problems.append("blur_sigma must satisfy 0 <= low <= high")
        for name in ("hflip", "blur_prob", "neighbour_prob", "study_prob", "source_balance"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        if self.padding not in ("zeros", "border"):
            problems.append("padding must be 'zeros' or 'border'")
        if self.max_seconds is not None and not self.max_seconds > 0:
            problems.append("max_seconds must be > 0 (or null)")
        if problems:
            raise ValueError("; ".join(problems))
        self.params()  # validates the architecture

    def params(self) -> SliceNetV1Params:
        """The architecture's hyper-parameters."""
        return SliceNetV1Params.from_json(self.hparams)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (tuples as lists)."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        data["hparams"] = self.params().to_json()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainRecipe:
        """Rebuild from :meth:`to_dict` output; missing keys take the defaults.

        Raises
        ------
        ValueError
            Unknown keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown} (known: {sorted(known)})")
        kwargs: dict[str, Any] = dict(data)
        for key in ("crop_scale", "crop_ratio", "blur_sigma"):
            if key in kwargs:
                value = kwargs[key]
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ValueError(f"{key} must be a pair [low, high]")
                kwargs[key] = (float(value[0]), float(value[1]))
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc


@dataclass
class TrainResult:
    """What :func:`train_model` returns.

    Attributes
    ----------
    state_dict
        The trained SliceNetV1's ``state_dict`` (CPU tensors; the projection
        head is not in it).
    model_id
        Model id of the weights file :func:`save_weights` writes for it (the
        first 16 hex digits of the SHA-256 of the serialised ``state_dict``).
    history
        Mean loss per epoch.
    seconds
        Wall-clock training time.
    hparams
        The architecture (:meth:`SliceNetV1Params.to_json`), or ``None``: the default.
    """

    state_dict: dict[str, torch.Tensor]
    model_id: str
    history: list[float]
    seconds: float
    hparams: dict[str, Any] | None = None

    def model(self, hparams: SliceNetV1Params | Mapping[str, Any] | None = None) -> SliceNetV1:
        """A SliceNetV1 holding these weights, in eval mode (``hparams``: else :attr:`hparams`)."""
        hparams = self.hparams if hparams is None else hparams
        if hparams is None:
            p = DEFAULT_HPARAMS
        elif isinstance(hparams, SliceNetV1Params):
            p = hparams
        else:
            p = SliceNetV1Params.from_json(hparams)
        net = SliceNetV1(p)
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval()

def _scaled(recipe: TrainRecipe, pool: int) -> TrainRecipe:
    """The recipe with pixel-sized augmentation settings for images pooled by ``pool``."""
    if pool <= 1:
        return recipe
    lo, hi = recipe.blur_sigma
    data = recipe.to_dict()
    data.update(blur_sigma=(lo / pool, hi / pool), input_size=max(16, recipe.input_size // pool))
    return TrainRecipe.from_dict(data)


def _check_images(images: np.ndarray, size: int) -> F32:
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != 1 or arr.shape[2:] != (size, size):
        raise ValueError(f"expected images of shape (N, 1, {size}, {size}), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected floating point pixels in [0, 1], got {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError("images hold NaN or infinite values")
    return out


def train_model(
    images: np.ndarray,
    recipe: TrainRecipe,
    *,
    init_state: Mapping[str, torch.Tensor] | None = None,
    groups: np.ndarray | None = None,
    progress: Callable[[int, float], None] | None = None,
    sources: np.ndarray | None = None,
    studies: np.ndarray | None = None,
) -> TrainResult:
    """Train SliceNetV1 without labels (see the module notes for the method).

    Parameters
    ----------
    images
        ``(N, 1, S, S)`` float32 in [0, 1] with ``S == recipe.input_size``,
        exactly as ``preprocess.prepare`` outputs them (``(N, S, S)`` is accepted).
    recipe
        Every training setting, seed included.
    init_state
        Start from these weights (a SliceNetV1 ``state_dict`` of
        ``recipe.hparams``; e.g. the shipped model for on-site adaptation)
        instead of the seeded random initialisation.
    groups
        ``(N,)`` integers: images with the same value ``>= 0`` belong to one
        series (in slice order), and neighbouring slices serve as positives;
        ``-1``: no group. ``None``: no groups.
    progress
        Called after every epoch with ``(epoch, mean loss)`` (epoch from 1).
    sources
        ``(N,)`` integers: which input (file, folder) each image came from,
        for ``recipe.source_balance``. ``None``: one source.
    studies
        ``(N,)`` integers: the study of each image (``-1``: none), for
        ``recipe.study_prob``. ``None``: no studies.

    Returns
    -------
    TrainResult
        The weights (eval-mode SliceNetV1 ``state_dict``), their model id,
        the loss history and the time taken.

    Raises
    ------
    ValueError
        Bad image array or groups, fewer than 2 images, or ``init_state``
        does not fit the architecture.
    """
    t0 = time.perf_counter()
    data = _check_images(images, recipe.input_size)
    n = data.shape[0]
    if n < 2:
        raise ValueError("training needs at least 2 images")
    grp = np.full(n, -1, dtype=np.int64) if groups is None else np.asarray(groups, np.int64)
    if grp.shape != (n,):
        raise ValueError(f"groups must be ({n},) integers, got shape {grp.shape}")
    members = series_neighbours(grp)
    stu = np.full(n, -1, dtype=np.int64) if studies is None else np.asarray(studies, np.int64)
    if stu.shape != (n,):
        raise ValueError(f"studies must be ({n},) integers, got shape {stu.shape}")
    use_studies = recipe.study_prob > 0 and bool((stu >= 0).any())
    in_study = study_others(grp, stu) if use_studies else [np.zeros(0, np.intp)] * n
    src = np.zeros(n, dtype=np.int64) if sources is None else np.asarray(sources, np.int64)
    if src.shape != (n,):
        raise ValueError(f"sources must be ({n},) integers, got shape {src.shape}")
    _, inverse, counts = np.unique(src, return_inverse=True, return_counts=True)
    weights = counts[inverse].astype(np.float64) ** -recipe.source_balance
    weights /= weights.sum()
    balanced = recipe.source_balance > 0 and counts.size > 1

    old_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        torch.manual_seed(recipe.seed)
        gen = torch.Generator().manual_seed(recipe.seed)
        rng = np.random.default_rng(recipe.seed)
        net = SliceNetV1(recipe.params())
        net.reset_parameters(gen)
        if init_state is not None:
            try:
                net.load_state_dict(dict(init_state), strict=True)
            except RuntimeError as exc:
                raise ValueError(f"init_state does not fit SliceNetV1: {exc}") from exc
        projector = Projector(net.hparams.dim, recipe.projection_hidden, recipe.projection_dim)
        for m in projector.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features), generator=gen)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        params = list(net.parameters()) + list(projector.parameters())
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe.lr,
        )
        batch = min(recipe.batch_size, n)
        steps_per_epoch = max(1, n // batch)
        total = steps_per_epoch * recipe.epochs
        warm = steps_per_epoch * recipe.warmup_epochs
        # Augment at the network's working resolution: the input pooling is done once
        # here (the same average pooling the model applies) instead of every step.
        pool = net.input_pool
        tensor = torch.from_numpy(data)
        if pool > 1:
            tensor = F.avg_pool2d(tensor, pool, ceil_mode=True)
        aug_recipe = _scaled(recipe, pool)
        net.input_pool = 1
        history: list[float] = []
        net.train()
        projector.train()
        step = 0
        stopped = False
        for epoch in range(1, recipe.epochs + 1):
            order = np.asarray(rng.choice(n, size=n, replace=True, p=weights) if balanced
                               else rng.permutation(n))
            losses = []
            for s in range(steps_per_epoch):
                idx = order[s * batch:(s + 1) * batch]
                other = pick_partners(idx, members, in_study, recipe, rng)
                v1 = augment(tensor[idx], aug_recipe, gen)
                v2 = augment(tensor[other], aug_recipe, gen)
                x = torch.stack([v1, v2], dim=1).reshape(-1, *v1.shape[1:])
                # balanced: an image drawn twice is no negative of itself
                exclude = negative_exclusions(idx, grp, stu if use_studies else None,
                                              repeated=balanced)
                lr = recipe.lr * (
                    (step + 1) / warm if step < warm
                    else 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
                )
                for group_ in opt.param_groups:
                    group_["lr"] = lr
                loss = nt_xent(projector(net(x)), recipe.temperature, exclude)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                if recipe.max_seconds is not None and \
                        time.perf_counter() - t0 > recipe.max_seconds:
                    stopped = True
                    break
            mean = float(np.mean(losses)) if losses else float("nan")
            history.append(mean)
            if progress is not None:
                progress(epoch, mean)
            if stopped:
                break
        net.input_pool = pool
        net.eval()
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        model_id = file_model_id(serialise_state_dict(net))
    finally:
        torch.set_num_threads(old_threads)
    return TrainResult(state_dict=state, model_id=model_id, history=history,
                       seconds=time.perf_counter() - t0, hparams=recipe.params().to_json())

# ====================================================================== files
def weights_name(recipe: TrainRecipe, model_id: str) -> str:
    """Default file stem of trained weights: ``slicenet-v1-ssl-seed<seed>-<model id[:8]>``."""
    return f"slicenet-v1-ssl-seed{recipe.seed}-{model_id[:8]}"


def save_weights(
    directory_or_path: Path | str,
    result: TrainResult,
    recipe: TrainRecipe,
    manifest: Mapping[str, Any],
    *,
    name: str | None = None,
) -> Path:
    """Write the trained weights and their JSON description; return the weights path.

    Parameters
    ----------
    directory_or_path
        A directory (the file is named by :func:`weights_name`, or ``name``)
        or a path ending in ``.pt``.
    result
        What :func:`train_model` returned.
    recipe
        The recipe it was trained with.
    manifest
        The data manifest (:attr:`TrainingData.manifest` or equivalent: the
        inputs with their SHA-256).

    Returns
    -------
    pathlib.Path
        The ``.pt`` file; ``.json`` beside it is what
        :func:`~sidecar.embeddings.model.load_weights` reads (architecture,
        hyper-parameters, input size, SHA-256, ``trained: true``) plus a
        ``training`` record: recipe, seed, data manifest, torch version,
        machine, time taken, loss history, model id.
    """
    target = Path(directory_or_path)
    params = recipe.params()
    net = result.model(params)
    data = serialise_state_dict(net)
    model_id = file_model_id(data)
    if target.suffix == ".pt":
        path = target
    else:
        path = target / f"{name or weights_name(recipe, model_id)}.pt"
    description: dict[str, Any] = {
        "format": WEIGHTS_FORMAT,
        "name": path.stem,
        "trained": True,
        "status": (
            "Trained without labels (self-supervised contrastive learning, "
            "sidecar.training.selfsup); see 'training' for the recipe and the data."
        ),
        "architecture": SliceNetV1.ARCHITECTURE,
        "hparams": params.to_json(),
        "input_size": recipe.input_size,
        "input": "N x 1 x S x S float32, pixels in [0, 1] after windowing",
        "output": f"N x {params.dim} float32, not normalised (embedders L2-normalise)",
        "dim": params.dim,
        "parameters": net.parameter_count(),
        "seed": recipe.seed,
        "made_by": "sidecar train (sidecar.training.selfsup.train_model)",
        "torch_version": torch.__version__,
        "weights_file": path.name,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "model_id": model_id,
        "training": {
            "format": TRAINING_FORMAT,
            "method": "SimCLR-style NT-Xent, projection MLP discarded; embedding = linear head",
            "recipe": recipe.to_dict(),
            "seed": recipe.seed,
            "data": dict(manifest),
            "labels_used": False,
            "seconds": round(result.seconds, 1),
            "threads": recipe.threads,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count()},
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "loss_history": [round(v, 5) for v in result.history],
        },
    }
    atomic_write(path, data)
    atomic_write(path.with_suffix(".json"),
                 (json.dumps(description, indent=2) + "\n").encode("utf-8"))
    return path


# ============================================================ label-free score
LABEL_FREE_AUGMENT: Final = {
    "crop_scale": (0.7, 1.0), "crop_ratio": (0.9, 1.1), "rotation_deg": 8.0, "shift": 0.04,
    "hflip": 0.0, "gamma": 0.2, "contrast": 0.2, "brightness": 0.05, "blur_prob": 0.3,
    "blur_sigma": (0.5, 2.0), "noise_std": 0.03,
}
"""The augmentation :func:`label_free_score` applies (milder than training's)."""


def label_free_report(embedder: Embedder, images: np.ndarray, *, seed: int) -> dict[str, float]:
    """The parts of :func:`label_free_score` (see there), as a dict.

    Keys: ``top1`` (fraction), ``alignment``, ``uniformity``, ``score``, ``n``.
    """
    size = embedder.input_size
    data = _check_images(images, size)
    n = data.shape[0]
    if n < 2:
        raise ValueError("label_free_score needs at least 2 images")
    recipe = TrainRecipe(input_size=size, seed=seed, **LABEL_FREE_AUGMENT)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    views = []
    for start in range(0, n, 256):
        views.append(augment(torch.from_numpy(data[start:start + 256]), recipe, gen).numpy())
    aug = np.concatenate(views)
    u = np.asarray(embedder.embed(data[:, 0]), dtype=np.float64)
    v = np.asarray(embedder.embed(aug[:, 0]), dtype=np.float64)
    sim = v @ u.T
    top1 = float((np.argmax(sim, axis=1) == np.arange(n)).mean())
    alignment = float(((u - v) ** 2).sum(axis=1).mean())
    sq = np.clip(2.0 - 2.0 * (u @ u.T), 0.0, None)
    off = ~np.eye(n, dtype=bool)
    uniformity = float(np.log(np.exp(-2.0 * sq[off]).mean()))
    au = min(1.0, max(0.0, -(alignment + uniformity) / 4.0))
    score = 0.8 * top1 + 0.2 * au
    return {"top1": top1, "alignment": alignment, "uniformity": uniformity, "score": score,
            "n": float(n)}


def label_free_score(embedder: Embedder, images: np.ndarray, *, seed: int) -> float:
    """Label-free quality of an embedder on held-out images; higher is better, in [0, 1].

    Every image gets one seeded random view (:data:`LABEL_FREE_AUGMENT`: a
    mild crop, rotation and shift, gamma/contrast/brightness, blur, noise).
    With ``u`` the unit embeddings of the images and ``v`` those of the views:

    * ``top1``: fraction of views whose nearest image (cosine, among all the
      held-out images) is their own: near-duplicate retrieval at rank 1.
    * ``alignment = mean ||u_i - v_i||^2`` (Wang & Isola 2020; 0 best, at most 4).
    * ``uniformity = log mean_{i != j} exp(-2 ||u_i - u_j||^2)`` (at most 0,
      more negative = better spread; a collapsed model scores 0).

    ``score = 0.8 * top1 + 0.2 * clip(-(alignment + uniformity) / 4, 0, 1)``.
    Scores are comparable for the same ``images`` and ``seed`` only; use a few
    hundred images or more (the task gets harder with more images).

    Parameters
    ----------
    embedder
        Any :class:`~sidecar.embeddings.model.Embedder`.
    images
        ``(N, 1, S, S)`` (or ``(N, S, S)``) float32 in [0, 1], ``S ==
        embedder.input_size``, ``N >= 2``: held-out images, never trained on.
    seed
        Seeds the views.
    """
    return label_free_report(embedder, images, seed=seed)["score"]
