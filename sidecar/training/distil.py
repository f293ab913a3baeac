"""Model v2: a 3-channel SliceNetV1 student distilled from v1 and ImageNet Lite0 (no labels).

The student (SliceNetV1, ``in_channels`` 3, grey input replicated) starts as the
shipped v1 (:func:`~sidecar.embeddings.network.inflate_stem`). A fixed pool of
seeded augmented views per training image is made once (:func:`make_views`;
grey views tinted into colour with probability ``colour_prob``), the teachers'
outputs on them are computed once (:func:`teacher_parts`: v1 on the grey view,
Lite0 pooled blocks on the colour view), and the student learns to reproduce
the in-batch similarity structure of the weighted concatenation of the
L2-normalised parts (relational KL, :func:`relational_kl`). Everything is
seeded (:class:`DistilRecipe`); :func:`train_distil` runs it all and
:func:`save_distilled` writes the ``.pt`` and its JSON. See docs/design/models.md.
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

from sidecar.embeddings.model import atomic_write
from sidecar.embeddings.network import (
    WEIGHTS_FORMAT,
    SliceNetV1,
    SliceNetV1Params,
    file_model_id,
    inflate_stem,
    serialise_state_dict,
)
from sidecar.training.augment import augment
from sidecar.training.teacher import load_lite0, teacher_record

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

KIND: Final = "distil"
"""``kind`` of a distillation recipe (``sidecar train`` dispatches on it)."""
DISTIL_FORMAT: Final = 1
"""Version of the ``training`` record of distilled weights."""
_PAIRS: Final = ("crop_scale", "crop_ratio", "blur_sigma", "colour_gain")


@dataclass
class DistilRecipe:
    """Everything that determines a distillation run (with the data and the torch version).

    Attributes
    ----------
    kind
        Always ``"distil"``.
    seed, threads, input_size
        Seed of everything; ``torch.set_num_threads``; side of the input slices.
    hparams
        The student's SliceNetV1 hyper-parameters (``in_channels`` 3).
    init
        ``"v1"``: start from the 1-channel weights given to :func:`train_distil`
        (stem inflated); ``"random"``: seeded random initialisation.
    v1_weights
        File name, in the package's weights directory, of the 1-channel v1
        weights that are teacher and start (``sidecar train --init`` overrides).
    teacher_size
        Side of the views (the student's input after its ``input_pool``) and
        of the Lite0 input.
    teacher_blocks
        Lite0 MBConv blocks (0-based) whose pooled outputs are teacher parts.
    part_weights
        Weight of each teacher part: v1's vector first, then one per block.
    views
        Augmented views made per training image (two distinct ones per step).
    epochs
        Passes over the images (each image gives two views per pass).
    batch_size
        Views per step (an even number: two of each image).
    lr, weight_decay, warmup
        AdamW peak learning rate and weight decay; linear warm-up over this
        fraction of the steps, then cosine decay to 0.
    tau_teacher, tau_student
        Temperatures of the teacher's and the student's in-batch softmax.
    crop_scale ... noise_std
        Augmentation of the grey views, as in :class:`~sidecar.training.selfsup.TrainRecipe`
        (``blur_sigma`` in pixels at ``input_size``); no flips by default.
    colour_prob, colour_gamma, colour_gain, colour_offset
        Probability that a view is tinted into colour: per channel a gamma in
        ``[1/(1+g), 1+g]``, a gain in ``colour_gain`` and an offset up to
        ``colour_offset``.
    volume_slices
        Slices taken from each 3-D training volume (``sidecar.training.volumes``).
    max_seconds
        Stop after the step that passes this much time (not reproducible).
    """

    kind: str = KIND
    seed: int = 0
    threads: int = 2
    input_size: int = 128
    hparams: dict[str, Any] = field(
        default_factory=lambda: SliceNetV1Params(in_channels=3, input_pool=2).to_json())
    init: str = "v1"
    v1_weights: str = "slicenet-v1-ssl-seed0-98602748.pt"
    teacher_size: int = 64
    teacher_blocks: tuple[int, ...] = (10, 14)
    part_weights: tuple[float, ...] = (1.0, 0.5, 0.5)
    views: int = 6
    epochs: int = 20
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup: float = 0.05
    tau_teacher: float = 0.05
    tau_student: float = 0.05
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    rotation_deg: float = 10.0
    shift: float = 0.06
    hflip: float = 0.0
    padding: str = "zeros"
    gamma: float = 0.3
    contrast: float = 0.25
    brightness: float = 0.1
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.5, 3.0)
    noise_std: float = 0.03
    colour_prob: float = 0.5
    colour_gamma: float = 1.0
    colour_gain: tuple[float, float] = (0.4, 1.0)
    colour_offset: float = 0.15
    volume_slices: int = 2
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        for key in _PAIRS:
            value = getattr(self, key)
            setattr(self, key, (float(value[0]), float(value[1])))
        self.teacher_blocks = tuple(int(b) for b in self.teacher_blocks)
        self.part_weights = tuple(float(w) for w in self.part_weights)
        self.hparams = dict(self.hparams)
        problems = []
        if self.kind != KIND:
            problems.append(f"kind must be {KIND!r}")
        if self.init not in ("v1", "random"):
            problems.append("init must be 'v1' or 'random'")
        if len(self.part_weights) != 1 + len(self.teacher_blocks):
            problems.append("part_weights needs one weight for v1 and one per teacher block")
        if min(self.part_weights, default=0) < 0 or sum(self.part_weights) <= 0:
            problems.append("part_weights must be >= 0 with a positive sum")
        if self.views < 2 or self.epochs < 1 or self.batch_size < 4 or self.batch_size % 2:
            problems.append("views >= 2, epochs >= 1, batch_size even and >= 4")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1:
            problems.append("lr > 0, weight_decay >= 0, 0 <= warmup < 1")
        if not (self.tau_teacher > 0 and self.tau_student > 0):
            problems.append("temperatures must be > 0")
        if self.input_size < 16 or self.teacher_size < 16 or self.threads < 1:
            problems.append("input_size and teacher_size >= 16, threads >= 1")
        for name in ("hflip", "blur_prob", "colour_prob"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        if self.padding not in ("zeros", "border"):
            problems.append("padding must be 'zeros' or 'border'")
        if self.volume_slices < 1:
            problems.append("volume_slices must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))
        p = self.params()
        if p.in_channels != 3:
            raise ValueError("the distilled student has in_channels 3")
        if self.input_size // p.input_pool != self.teacher_size:
            raise ValueError("teacher_size must be input_size // hparams.input_pool")

    def params(self) -> SliceNetV1Params:
        """The student's hyper-parameters."""
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
    def from_dict(cls, data: Mapping[str, Any]) -> DistilRecipe:
        """Rebuild from :meth:`to_dict` output; missing keys take the defaults.

        Raises
        ------
        ValueError
            Unknown keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown distillation recipe keys {unknown}")
        kwargs = dict(data)
        for key in _PAIRS:
            value = kwargs.get(key)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 2):
                raise ValueError(f"{key} must be a pair [low, high]")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc


def is_distil_recipe(data: Mapping[str, Any]) -> bool:
    """Whether a recipe dict is a :class:`DistilRecipe` (``kind: "distil"``)."""
    return data.get("kind") == KIND


@dataclass
class Views:
    """The fixed pool of augmented views (:func:`make_views`)."""

    rgb: U8
    """``(N * views, 3, T, T)`` uint8 colour views (grey ones replicated)."""
    grey: U8
    """``(N * views, 1, T, T)`` uint8 grey views before tinting (v1's input)."""


@dataclass
class DistilResult:
    """What :func:`train_distil` returns."""

    state_dict: dict[str, torch.Tensor]
    model_id: str
    history: list[float]
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds spent making views, teacher outputs and fitting."""

    def model(self, params: SliceNetV1Params) -> SliceNetV1:
        """A SliceNetV1 holding these weights, in eval mode."""
        net = SliceNetV1(params)
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval()


# ======================================================================== views
def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def colourise(grey: torch.Tensor, recipe: DistilRecipe, gen: torch.Generator) -> torch.Tensor:
    """``(B, 3, T, T)`` views: grey ``(B, 1, T, T)`` images tinted with probability ``colour_prob``.

    Per image and channel a gamma, a gain and an offset (one random colour
    map of the grey level), the untinted ones replicated.
    """
    b = grey.shape[0]
    lg = math.log(1.0 + recipe.colour_gamma)
    gam = torch.exp(_uniform(gen, (b, 3), -lg, lg))[:, :, None, None]
    gain = _uniform(gen, (b, 3), *recipe.colour_gain)[:, :, None, None]
    off = _uniform(gen, (b, 3), 0.0, recipe.colour_offset)[:, :, None, None]
    tint = torch.rand(b, generator=gen) < recipe.colour_prob
    g3 = grey.expand(-1, 3, -1, -1)
    coloured = (g3.clamp(0, 1).pow(gam) * gain + off).clamp(0, 1)
    return torch.where(tint[:, None, None, None], coloured, g3)


def _to_u8(x: torch.Tensor) -> U8:
    out: U8 = (x * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def make_views(images: np.ndarray, recipe: DistilRecipe) -> Views:
    """``recipe.views`` seeded views of every image (``(N, 1, S, S)`` in [0, 1]).

    Images are average-pooled by the student's ``input_pool`` first (as the
    network does), views are made at that size (blur scaled accordingly) and
    stored as uint8; image ``i``'s views are rows ``i * views ... + views - 1``.
    """
    pool = recipe.params().input_pool
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if pool > 1:
        tensor = F.avg_pool2d(tensor, pool, ceil_mode=True)
    aug = DistilRecipe.from_dict({**recipe.to_dict(), "blur_sigma": [
        recipe.blur_sigma[0] / pool, recipe.blur_sigma[1] / pool]})
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    n, k, t = tensor.shape[0], recipe.views, tensor.shape[-1]
    rgb = np.empty((n, k, 3, t, t), np.uint8)
    grey = np.empty((n, k, 1, t, t), np.uint8)
    for start in range(0, n, 256):
        chunk = tensor[start:start + 256]
        for v in range(k):
            g = augment(chunk, aug, gen)
            grey[start:start + len(chunk), v] = _to_u8(g)
            rgb[start:start + len(chunk), v] = _to_u8(colourise(g, recipe, gen))
    return Views(rgb=rgb.reshape(n * k, 3, t, t), grey=grey.reshape(n * k, 1, t, t))


# ===================================================================== teachers
def _l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.to(torch.float32), dim=1)


def teacher_parts(
    views: Views, recipe: DistilRecipe, v1: nn.Module | None, *, batch: int = 64,
) -> list[F32]:
    """The L2-normalised teacher outputs for every view: v1's vector, then each Lite0 block.

    ``v1`` (a 1-channel SliceNetV1; ``None``: its part is left out and must have
    weight 0) sees the grey view; Lite0 (:func:`~sidecar.training.teacher.load_lite0`)
    the colour view.
    """
    lite = load_lite0(recipe.teacher_blocks, recipe.teacher_size)
    n = views.rgb.shape[0]
    parts: list[list[torch.Tensor]] = [[] for _ in range(1 + len(recipe.teacher_blocks))]
    pool = 1
    if isinstance(v1, SliceNetV1):
        pool, v1.input_pool = v1.input_pool, 1  # the views are already pooled
    try:
        with torch.inference_mode():
            for start in range(0, n, batch):
                rgb = torch.from_numpy(views.rgb[start:start + batch]).float() / 255.0
                if v1 is not None:
                    g = torch.from_numpy(views.grey[start:start + batch]).float() / 255.0
                    parts[0].append(_l2(v1(g)))
                for i, f in enumerate(lite.features(rgb), start=1):
                    parts[i].append(_l2(f))
    finally:
        if isinstance(v1, SliceNetV1):
            v1.input_pool = pool
    out: list[F32] = []
    for chunks in parts:
        out.append(torch.cat(chunks).numpy() if chunks else np.zeros((n, 0), np.float32))
    return out


def combine(parts: list[F32], weights: tuple[float, ...]) -> F32:
    """The teacher target: the weighted concatenation of the (unit) parts, L2-normalised."""
    cols = [w * p for w, p in zip(weights, parts, strict=True) if w > 0 and p.shape[1] > 0]
    t = np.concatenate(cols, axis=1)
    norm = np.linalg.norm(t, axis=1, keepdims=True)
    out: F32 = (t / np.maximum(norm, 1e-12)).astype(np.float32)
    return out


# ========================================================================= loss
def relational_kl(
    student: torch.Tensor, teacher: torch.Tensor, tau_student: float, tau_teacher: float,
) -> torch.Tensor:
    """KL(teacher || student) of each row's softmax over its in-batch cosine similarities.

    The diagonal (an item and itself) is left out; only the ranking of the
    other items matters, so student and teacher dimensions may differ.
    """
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher, dim=1)
    eye = torch.eye(s.shape[0], dtype=torch.bool)
    log_ps = F.log_softmax((s @ s.T / tau_student).masked_fill(eye, -1e4), dim=1)
    pt = F.softmax((t @ t.T / tau_teacher).masked_fill(eye, -1e4), dim=1)
    return F.kl_div(log_ps, pt, reduction="batchmean")


# ===================================================================== training
def fit_student(
    views: Views,
    target: F32,
    recipe: DistilRecipe,
    *,
    init_state: Mapping[str, torch.Tensor] | None,
    progress: Callable[[int, float], None] | None = None,
    t0: float | None = None,
) -> tuple[SliceNetV1, list[float]]:
    """Train the student on the views to the teacher ``target`` (one row per view)."""
    start = time.perf_counter() if t0 is None else t0
    k = recipe.views
    n = views.rgb.shape[0] // k
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    net = SliceNetV1(recipe.params())
    net.reset_parameters(gen)
    if init_state is not None:
        net.load_state_dict(dict(init_state), strict=True)
    pool, net.input_pool = net.input_pool, 1
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    half = min(recipe.batch_size // 2, n)
    steps_per_epoch = max(1, n // half)
    total = steps_per_epoch * recipe.epochs
    warm = int(recipe.warmup * total)
    target_t = torch.from_numpy(target)
    history: list[float] = []
    net.train()
    step = 0
    stopped = False
    for epoch in range(1, recipe.epochs + 1):
        order = rng.permutation(n)
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * half:(s + 1) * half]
            first = rng.integers(0, k, size=idx.size)
            second = (first + rng.integers(1, k, size=idx.size)) % k
            rows = np.stack([idx * k + first, idx * k + second], axis=1).reshape(-1)
            x = torch.from_numpy(views.rgb[rows]).float() / 255.0
            lr = recipe.lr * ((step + 1) / warm if step < warm else 0.5 * (
                1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = relational_kl(net(x), target_t[rows], recipe.tau_student, recipe.tau_teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if recipe.max_seconds is not None and time.perf_counter() - start > recipe.max_seconds:
                stopped = True
                break
        history.append(float(np.mean(losses)) if losses else float("nan"))
        if progress is not None:
            progress(epoch, history[-1])
        if stopped:
            break
    net.input_pool = pool
    return net.eval(), history


def train_distil(
    images: np.ndarray,
    recipe: DistilRecipe,
    v1: SliceNetV1 | None,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> DistilResult:
    """The whole run: views, teacher outputs, student (see the module notes).

    Parameters
    ----------
    images
        ``(N, 1, S, S)`` float32 in [0, 1], ``S == recipe.input_size``, as the
        worker's pre-processing outputs them.
    recipe
        Every setting, seed included.
    v1
        The 1-channel teacher and (``recipe.init == "v1"``) the student's
        start; ``None`` only with ``init == "random"`` and a zero v1 weight.

    Raises
    ------
    ValueError
        Bad images, or ``v1`` missing where the recipe needs it.
    ~sidecar.training.teacher.TeacherUnavailable
        The ``train`` extra is not installed.
    """
    t0 = time.perf_counter()
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 1 or arr.shape[2:] != (recipe.input_size,) * 2 \
            or arr.shape[0] < 2:
        raise ValueError(f"expected >= 2 images (N, 1, {recipe.input_size}, "
                         f"{recipe.input_size}), got {arr.shape}")
    if v1 is None and (recipe.init == "v1" or recipe.part_weights[0] > 0):
        raise ValueError("the recipe needs the v1 model (init 'v1' or a v1 part weight)")
    old = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        views = make_views(arr, recipe)
        t1 = time.perf_counter()
        parts = teacher_parts(views, recipe, v1.eval() if v1 is not None else None)
        target = combine(parts, recipe.part_weights)
        t2 = time.perf_counter()
        init = None
        if recipe.init == "v1" and v1 is not None:
            init = inflate_stem(v1.state_dict(), recipe.params().in_channels)
        net, history = fit_student(views, target, recipe, init_state=init,
                                   progress=progress, t0=t0)
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        model_id = file_model_id(serialise_state_dict(net))
    finally:
        torch.set_num_threads(old)
    t3 = time.perf_counter()
    return DistilResult(state_dict=state, model_id=model_id, history=history, seconds=t3 - t0,
                        stages={"views": round(t1 - t0, 1), "teacher": round(t2 - t1, 1),
                                "student": round(t3 - t2, 1)})


# ======================================================================== files
def distilled_name(recipe: DistilRecipe, model_id: str) -> str:
    """Default file stem: ``slicenet-v2-distil-seed<seed>-<model id[:8]>``."""
    return f"slicenet-v2-distil-seed{recipe.seed}-{model_id[:8]}"


def save_distilled(
    directory_or_path: Path | str,
    result: DistilResult,
    recipe: DistilRecipe,
    manifest: Mapping[str, Any],
    *,
    v1_record: Mapping[str, Any] | None = None,
) -> Path:
    """Write the student's ``.pt`` and its JSON (what ``load_weights`` reads + the recipe).

    The JSON records the architecture (``hparams.in_channels`` 3), the input
    contract, the teacher (:func:`~sidecar.training.teacher.teacher_record`),
    the v1 weights used (``v1_record``), the recipe, the data manifest and the
    loss history. ``directory_or_path``: a directory or a path ending in ``.pt``.
    """
    target = Path(directory_or_path)
    params = recipe.params()
    net = result.model(params)
    data = serialise_state_dict(net)
    model_id = file_model_id(data)
    path = target if target.suffix == ".pt" else target / f"{distilled_name(recipe, model_id)}.pt"
    description: dict[str, Any] = {
        "format": WEIGHTS_FORMAT,
        "name": path.stem,
        "trained": True,
        "status": ("Trained without labels: distilled from the v1 model and a frozen "
                   "ImageNet EfficientNet-Lite0 (sidecar.training.distil); see 'training'."),
        "architecture": SliceNetV1.ARCHITECTURE,
        "hparams": params.to_json(),
        "input_size": recipe.input_size,
        "input": ("N x 3 x S x S float32 RGB in [0, 1] after windowing; a grey N x 1 x S x S "
                  "input is replicated to the three channels"),
        "output": f"N x {params.dim} float32, not normalised (embedders L2-normalise)",
        "dim": params.dim,
        "parameters": net.parameter_count(),
        "seed": recipe.seed,
        "made_by": "sidecar train (sidecar.training.distil.train_distil)",
        "torch_version": torch.__version__,
        "weights_file": path.name,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "model_id": model_id,
        "training": {
            "format": DISTIL_FORMAT,
            "method": ("relational distillation (KL over in-batch cosine similarities) to the "
                       "weighted concatenation of v1's vector and pooled Lite0 blocks"),
            "recipe": recipe.to_dict(),
            "teacher": teacher_record(recipe.teacher_blocks, recipe.teacher_size),
            "v1": dict(v1_record or {}),
            "data": dict(manifest),
            "labels_used": False,
            "seconds": round(result.seconds, 1),
            "stages_seconds": dict(result.stages),
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
