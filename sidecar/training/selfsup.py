"""Self-supervised training of the embedding CNN (no labels): the code behind ``sidecar train``.

Method
------
SimCLR-style contrastive learning (NT-Xent, Chen et al. 2020) on grey-level
slices exactly as the worker prepares them (``preprocess.prepare`` output,
``(N, 1, S, S)`` in ``[0, 1]``):

* Every training step draws ``batch_size`` images; each gives two views. The
  second view is the *same* image, or, for an image that belongs to a group
  (``groups``: the same series; images of a group in slice order), with
  probability ``neighbour_prob`` a *neighbouring slice* at most
  ``neighbour_span`` positions away: positives from the DICOM structure.
  Other images of the same group in the batch are left out of the negatives.
  With ``studies`` (the study of each image) and ``study_prob > 0``, the
  second view is first, with probability ``study_prob``, a slice of *another
  series of the same study* (another reconstruction, phase or sequence of the
  same anatomy: the unit the product ranks); images of one study are then
  left out of each other's negatives.
* Both views are augmented independently (:func:`augment`), with augmentations
  that suit medical grey-level images: a random resized crop of modest scale
  with a small rotation and shift (bilinear, zero margins like the
  pre-processing's), optional horizontal flip, gamma, contrast and
  brightness jitter, Gaussian blur and Gaussian noise. No colour. Views are
  made at the network's working resolution: with ``input_pool`` ``p`` the
  images are average-pooled once, as the network would pool them, and
  augmented at ``S / p`` (blur sigmas are given in pixels at ``S``).
* The CNN (:class:`~sidecar.embeddings.model.SliceNetV1`, output = its linear
  head) feeds a small projection MLP (Linear, BatchNorm, ReLU, Linear) used
  only for the loss and discarded afterwards; the embedding the product stores
  is the head's output (L2-normalised by the embedder).
* AdamW, linear warm-up then cosine decay of the learning rate, per step.

Everything is seeded (``TrainRecipe.seed``: initialisation, batch order,
augmentations); with the same torch version, thread count and data the
weights are the same bytes (:func:`train_model` sets the torch thread count
from the recipe).

Files
-----
:func:`save_weights` writes ``<name>.pt`` (the ``state_dict``, serialised in
memory so equal tensors give equal bytes) and ``<name>.json`` beside it in the
layout :func:`~sidecar.embeddings.model.load_weights` reads, plus the recipe,
the data manifest (every input with its SHA-256), the torch version, the
training time and the history of the loss.

Label-free model selection
--------------------------
:func:`label_free_score` compares models on held-out unlabelled images; see
its docstring.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from sidecar.embeddings.model import (
    WEIGHTS_FORMAT,
    Embedder,
    SliceNetV1,
    SliceNetV1Params,
    atomic_write,
    file_model_id,
    serialise_state_dict,
)
from sidecar.files import sha256_file, walk_files
from sidecar.training.npz import image_dataset, prepare_datasets

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


# ================================================================ augmentation
def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` ``(B, 1, H, W)`` with its own sigma (0: unchanged)."""
    b = x.shape[0]
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).to(x.dtype)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    y = x.reshape(1, b, *x.shape[2:])
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b)
    y = F.conv2d(y, k[:, None, :, None], groups=b)
    out = y.reshape_as(x)
    keep = (sigma <= 0)[:, None, None, None]
    return torch.where(keep, x, out)


def augment(x: torch.Tensor, recipe: TrainRecipe, gen: torch.Generator) -> torch.Tensor:
    """One random view of every image of ``x`` ``(B, 1, S, S)`` in [0, 1].

    Geometry (one bilinear resample, margins as ``padding`` says): crop of area fraction in
    ``crop_scale`` and aspect ratio in ``crop_ratio`` at a random position,
    rotated by up to ``rotation_deg``, shifted by up to ``shift`` of the side,
    flipped left-right with probability ``hflip``. Intensity: gamma, contrast
    around the image mean, brightness; Gaussian blur with probability
    ``blur_prob``; additive Gaussian noise. The result is clipped to [0, 1].
    """
    b = x.shape[0]
    if b == 0:
        return x
    area = _uniform(gen, b, *recipe.crop_scale)
    log_r = _uniform(gen, b, math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1]))
    ratio = torch.exp(log_r)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    angle = _uniform(gen, b, -1.0, 1.0) * math.radians(recipe.rotation_deg)
    tx = _uniform(gen, b, -1.0, 1.0) * (1.0 - sx) + _uniform(gen, b, -1.0, 1.0) * 2 * recipe.shift
    ty = _uniform(gen, b, -1.0, 1.0) * (1.0 - sy) + _uniform(gen, b, -1.0, 1.0) * 2 * recipe.shift
    flip = torch.where(torch.rand(b, generator=gen) < recipe.hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([sx * cos * flip, -sy * sin, tx], dim=1),
        torch.stack([sx * sin * flip, sy * cos, ty], dim=1),
    ], dim=1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode=recipe.padding, align_corners=False)

    g_lo = math.log(1.0 / (1.0 + recipe.gamma))
    gamma = torch.exp(_uniform(gen, b, g_lo, -g_lo))[:, None, None, None]
    y = y.clamp(0.0, 1.0).pow(gamma)
    contrast = _uniform(gen, b, 1.0 - recipe.contrast, 1.0 + recipe.contrast)[:, None, None, None]
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * contrast + mean
    y = y + _uniform(gen, b, -recipe.brightness, recipe.brightness)[:, None, None, None]
    if recipe.blur_prob > 0 and recipe.blur_sigma[1] > 0:
        sigma = _uniform(gen, b, *recipe.blur_sigma)
        sigma = torch.where(torch.rand(b, generator=gen) < recipe.blur_prob, sigma, 0.0)
        if bool((sigma > 0).any()):
            y = _gaussian_blur(y, sigma)
    if recipe.noise_std > 0:
        std = _uniform(gen, b, 0.0, recipe.noise_std)[:, None, None, None]
        y = y + std * torch.randn(y.shape, generator=gen, dtype=y.dtype)
    return y.clamp(0.0, 1.0)


def _scaled(recipe: TrainRecipe, pool: int) -> TrainRecipe:
    """The recipe with pixel-sized augmentation settings for images pooled by ``pool``."""
    if pool <= 1:
        return recipe
    lo, hi = recipe.blur_sigma
    data = recipe.to_dict()
    data.update(blur_sigma=(lo / pool, hi / pool), input_size=max(16, recipe.input_size // pool))
    return TrainRecipe.from_dict(data)


# ====================================================================== model
class _Projector(nn.Sequential):
    def __init__(self, cin: int, hidden: int, out: int) -> None:
        super().__init__(
            nn.Linear(cin, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )


def nt_xent(
    z: torch.Tensor, temperature: float, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """NT-Xent loss over ``z`` ``(2B, D)``, rows ``2i`` and ``2i + 1`` being positives.

    ``exclude``: ``(2B, 2B)`` True where a pair is neither positive nor
    negative (e.g. two slices of one series); the diagonal is always left out.
    """
    n = z.shape[0]
    z = F.normalize(z, dim=1)
    sim = z @ z.T / temperature
    mask = torch.eye(n, dtype=torch.bool)
    if exclude is not None:
        mask = mask | exclude
    pos = torch.arange(n) ^ 1
    mask[torch.arange(n), pos] = False
    sim = sim.masked_fill(mask, float("-inf"))
    return F.cross_entropy(sim, pos)


def _neighbours(groups: npt.NDArray[np.int64]) -> list[npt.NDArray[np.intp]]:
    """Per image, the indices of the images of its group (slice order), or an empty array."""
    out: list[npt.NDArray[np.intp]] = [np.zeros(0, dtype=np.intp)] * groups.shape[0]
    for g in np.unique(groups[groups >= 0]):
        members = np.flatnonzero(groups == g)
        for i in members:
            out[int(i)] = members
    return out


def _study_others(
    groups: npt.NDArray[np.int64], studies: npt.NDArray[np.int64]
) -> list[npt.NDArray[np.intp]]:
    """Per image, the images of the other series of its study (empty when there are none).

    An image without a series (group ``-1``) counts as a series of its own.
    """
    out: list[npt.NDArray[np.intp]] = [np.zeros(0, dtype=np.intp)] * studies.shape[0]
    for st in np.unique(studies[studies >= 0]):
        members = np.flatnonzero(studies == st)
        if members.size < 2:
            continue
        for i in members.tolist():
            g = groups[i]
            same = members == i if g < 0 else groups[members] == g
            out[i] = members[~same]
    return out


def pick_partners(
    idx: npt.NDArray[np.intp],
    series: Sequence[npt.NDArray[np.intp]],
    study_others: Sequence[npt.NDArray[np.intp]],
    recipe: TrainRecipe,
    rng: np.random.Generator,
) -> npt.NDArray[np.intp]:
    """The image of each second view: itself, a slice of another series of its
    study (probability ``recipe.study_prob``) or a neighbouring slice of its
    series (probability ``recipe.neighbour_prob``).

    ``rng`` is drawn from only for images that have such a partner, so data
    without studies trains exactly as before studies existed.
    """
    other = idx.copy()
    for j, i in enumerate(idx.tolist()):
        others = study_others[i]
        if recipe.study_prob > 0 and others.size and rng.random() < recipe.study_prob:
            other[j] = others[int(rng.integers(others.size))]
            continue
        group = series[i]
        if group.size > 1 and rng.random() < recipe.neighbour_prob:
            pos = int(np.searchsorted(group, i))
            lo = max(0, pos - recipe.neighbour_span)
            hi = min(group.size - 1, pos + recipe.neighbour_span)
            other[j] = group[int(rng.integers(lo, hi + 1))]
    return other


def negative_exclusions(
    idx: npt.NDArray[np.intp],
    groups: npt.NDArray[np.int64],
    studies: npt.NDArray[np.int64] | None,
    *,
    repeated: bool,
) -> torch.Tensor | None:
    """``(2B, 2B)`` mask of the pairs of a batch of view pairs that are no negatives.

    Views of one series; with ``studies`` (``study_prob > 0``), views of one
    study; with ``repeated`` (images drawn with replacement), views of the same
    image. ``None`` when nothing is excluded.
    """
    exclude: torch.Tensor | None = None
    for labels in (groups, studies):
        if labels is None:
            continue
        lab = np.repeat(labels[idx], 2)
        if (lab >= 0).any():
            t = torch.from_numpy(lab)
            mask = (t[:, None] == t[None, :]) & (t[:, None] >= 0)
            exclude = mask if exclude is None else exclude | mask
    if repeated:
        it = torch.from_numpy(np.repeat(idx, 2))
        same = it[:, None] == it[None, :]
        exclude = same if exclude is None else exclude | same
    return exclude


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
    members = _neighbours(grp)
    stu = np.full(n, -1, dtype=np.int64) if studies is None else np.asarray(studies, np.int64)
    if stu.shape != (n,):
        raise ValueError(f"studies must be ({n},) integers, got shape {stu.shape}")
    use_studies = recipe.study_prob > 0 and bool((stu >= 0).any())
    study_others = _study_others(grp, stu) if use_studies else [np.zeros(0, np.intp)] * n
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
        projector = _Projector(net.hparams.dim, recipe.projection_hidden, recipe.projection_dim)
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
                other = pick_partners(idx, members, study_others, recipe, rng)
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


# ======================================================================= data
@dataclass
class TrainingData:
    """Training images with their groups and where they came from.

    Attributes
    ----------
    images
        ``(N, 1, S, S)`` float32 in [0, 1], as ``preprocess.prepare`` outputs them.
    groups
        ``(N,)`` int64: one value per DICOM series (slices in order), ``-1``
        for images without a series (the 2-D images of an ``.npz``).
    studies
        ``(N,)`` int64: one value per DICOM study, ``-1`` for images without
        one (for ``TrainRecipe.study_prob``).
    manifest
        ``{"inputs": [...], "images": N, "groups": ...}``: each input with
        its kind, path, SHA-256 and what was read from it.
    sources
        ``(N,)`` int64: the input each image came from (each ``.npz`` is one
        source, all DICOM together another), for ``TrainRecipe.source_balance``.
    """

    images: F32
    groups: npt.NDArray[np.int64]
    manifest: dict[str, Any]
    sources: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    studies: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))


def npz_train_images(path: Path) -> npt.NDArray[np.uint8]:
    """The ``train_images`` array of an ``.npz`` (MedMNIST layout); no other array is read.

    Raises
    ------
    ValueError
        No ``train_images`` array, or not ``uint8`` ``(N, H, W[, 1|3])``.
    """
    with np.load(path, allow_pickle=False) as npz:
        if "train_images" not in npz.files:
            raise ValueError(f"{path}: no train_images array (MedMNIST layout expected)")
        arr = np.asarray(npz["train_images"])
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[3] == 3)):
        raise ValueError(f"{path}: train_images {arr.dtype} {arr.shape}, expected uint8 "
                         "(N, H, W) grey or (N, H, W, 3) colour")
    return np.ascontiguousarray(arr)


def prepare_npz(path: Path, cfg: Any, size: int) -> tuple[F32, dict[str, Any]]:
    """The train split of an ``.npz`` as model input, through the worker's DICOM path.

    Every image becomes a Secondary Capture instance (no pixel spacing), is
    written and read back and goes through ``preprocess.prepare`` with
    ``cfg`` (a :class:`~sidecar.config.Config`), as ``sidecar evaluate``'s path
    (a) does. Only ``train_images`` is read: never labels, val or test.
    """
    raw = npz_train_images(path)
    datasets = [image_dataset(im, key=f"{path.stem}/train/{i}", patient_id=f"TRAIN{i:06d}")
                for i, im in enumerate(raw)]
    images = prepare_datasets(datasets, cfg, size)[:, None]
    entry = {"kind": "npz", "path": str(path), "name": path.name, "sha256": sha256_file(path),
             "arrays_read": ["train_images"], "images": int(raw.shape[0]),
             "image_shape": list(raw.shape[1:])}
    return images, entry


class DicomSlices(NamedTuple):
    """What :func:`prepare_dicom` read."""

    images: F32
    """``(N, 1, S, S)`` prepared slices."""
    groups: npt.NDArray[np.int64]
    """``(N,)`` series of each slice (0, 1, ... per series)."""
    studies: npt.NDArray[np.int64]
    """``(N,)`` study of each slice (0, 1, ... per StudyInstanceUID)."""
    entries: list[dict[str, Any]]
    """One manifest entry per file used (path, SHA-256, series, study)."""


def prepare_dicom(paths: Sequence[Path], cfg: Any, size: int) -> DicomSlices:
    """Every slice of every image series under ``paths``, in slice order per series.

    Files that are not DICOM images (no pixel data, unreadable) are skipped.
    Slices are ordered along the slice normal as the worker orders them
    (``preprocess.frame_infos`` and ``preprocess.sample`` with no thinning);
    each series gets its own group number, each study (StudyInstanceUID) its
    own study number.
    """
    from pydicom import dcmread

    from sidecar.embeddings import preprocess

    series: dict[str, list[tuple[Path, Any]]] = {}
    for f in walk_files(paths):
        try:
            header = dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: skipped
            continue
        if "PixelData" not in header and "FloatPixelData" not in header \
                and "DoubleFloatPixelData" not in header:
            # stop_before_pixels leaves pixel data out; check by reading the tag list
            try:
                full = dcmread(f, specific_tags=["PixelData"])
            except Exception:  # noqa: BLE001
                continue
            if "PixelData" not in full:
                continue
        uid = str(header.get("SeriesInstanceUID", f.parent))
        series.setdefault(uid, []).append((f, header))
    study_of = {uid: str(members[0][1].get("StudyInstanceUID", "") or f"series:{uid}")
                for uid, members in series.items()}
    study_numbers = {st: k for k, st in enumerate(sorted(set(study_of.values())))}
    every = cfg.preprocess.model_copy(update={"slice_spacing_mm": 0.0,
                                              "max_slices_per_series": 1 << 30})
    images: list[F32] = []
    groups: list[int] = []
    studies: list[int] = []
    entries: list[dict[str, Any]] = []
    for g, uid in enumerate(sorted(series)):
        members = series[uid]
        study = study_numbers[study_of[uid]]
        infos = []
        for k, (_, header) in enumerate(members):
            try:
                infos.extend(preprocess.frame_infos(header, k))
            except Exception:  # noqa: BLE001 - a broken header: skipped
                continue
        order = preprocess.sample(infos, every)
        by_file: dict[int, Any] = {}
        used: set[int] = set()
        for k, frame in order:
            if k not in by_file:
                try:
                    by_file[k] = dcmread(members[k][0])
                except Exception:  # noqa: BLE001
                    by_file[k] = None
            ds = by_file[k]
            if ds is None:
                continue
            try:
                arr = preprocess.prepare(ds, cfg.preprocess, size, frames=[frame])
            except Exception:  # noqa: BLE001 - undecodable: skipped
                continue
            images.append(arr[0])
            groups.append(g)
            studies.append(study)
            used.add(k)
        for k in sorted(used):
            path = members[k][0]
            entries.append({"kind": "dicom", "path": str(path), "sha256": sha256_file(path),
                            "series": g, "study": study})
    if not images:
        empty = np.zeros(0, np.int64)
        return DicomSlices(np.zeros((0, 1, size, size), np.float32), empty, empty, entries)
    return DicomSlices(np.stack(images)[:, None].astype(np.float32),
                       np.asarray(groups, np.int64), np.asarray(studies, np.int64), entries)


def load_training_data(paths: Sequence[Path | str], cfg: Any, size: int) -> TrainingData:
    """Training images from ``.npz`` files (train split only) and DICOM files or folders.

    Parameters
    ----------
    paths
        ``.npz`` files in the MedMNIST layout (only ``train_images`` is read)
        and DICOM files or folders (every image series found).
    cfg
        The :class:`~sidecar.config.Config` whose pre-processing the worker uses.
    size
        Model input side (``embedding.input_size``).

    Raises
    ------
    ValueError
        A path does not exist, an ``.npz`` lacks ``train_images``, or no
        image was found.
    """
    parts: list[F32] = []
    groups: list[npt.NDArray[np.int64]] = []
    studies: list[npt.NDArray[np.int64]] = []
    inputs: list[dict[str, Any]] = []
    sources: list[npt.NDArray[np.int64]] = []
    dicom: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        if p.is_file() and p.suffix.lower() == ".npz":
            images, entry = prepare_npz(p, cfg, size)
            parts.append(images)
            groups.append(np.full(images.shape[0], -1, np.int64))
            studies.append(np.full(images.shape[0], -1, np.int64))
            sources.append(np.full(images.shape[0], len(sources), np.int64))
            inputs.append(entry)
        else:
            dicom.append(p)
    if dicom:
        read = prepare_dicom(dicom, cfg, size)
        parts.append(read.images)
        groups.append(read.groups)
        studies.append(read.studies)
        sources.append(np.full(read.images.shape[0], len(sources), np.int64))
        inputs.append({"kind": "dicom-folders", "paths": [str(p) for p in dicom],
                       "files": len(read.entries), "series": int(len(np.unique(read.groups))),
                       "studies": int(len(np.unique(read.studies))),
                       "slices": int(read.images.shape[0])})
        inputs.extend(read.entries)
    if not parts or sum(p.shape[0] for p in parts) == 0:
        raise ValueError("no training images found")
    all_images = np.concatenate(parts)
    all_groups = np.concatenate(groups)
    manifest = {
        "inputs": inputs,
        "images": int(all_images.shape[0]),
        "grouped_images": int((all_groups >= 0).sum()),
        "input_size": size,
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "images_sha256": hashlib.sha256(all_images.tobytes()).hexdigest(),
        "labels_used": False,
        "splits_read": ["train"],
    }
    return TrainingData(images=all_images, groups=all_groups, manifest=manifest,
                        sources=np.concatenate(sources), studies=np.concatenate(studies))


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
