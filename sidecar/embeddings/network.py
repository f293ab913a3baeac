"""The SliceNetV1 CNN and what identifies its weights files.

:class:`SliceNetV1` (hyper-parameters in :class:`SliceNetV1Params`), the shipped
weights' location (:data:`WEIGHTS_DIR`, :func:`builtin_weights_path`), the
weights JSON layout version and the model id of a file (:func:`file_model_id`
over the bytes of :func:`serialise_state_dict`). Loading files into embedders
is :mod:`sidecar.embeddings.model`; see docs/design/embeddings.md.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

WEIGHTS_DIR: Final = Path(__file__).resolve().parent / "weights"
"""Directory of the shipped weights (package data)."""
BUILTIN_WEIGHTS: Final = "slicenet-v2-distil-seed0-56f97977.pt"
"""File name of the built-in weights in :data:`WEIGHTS_DIR`."""
WEIGHTS_FORMAT: Final = 1
"""Version of the weights JSON layout."""
MODEL_ID_HEX: Final = 16
"""Hex digits of SHA-256 in a model id."""


@dataclass(frozen=True)
class SliceNetV1Params:
    """Hyper-parameters of :class:`SliceNetV1`, recorded in the weights' JSON.

    Attributes
    ----------
    in_channels
        Input channels (1: grey-level slices; 3: RGB, and a grey ``(N, 1, S, S)``
        input is replicated to the three channels, see :meth:`SliceNetV1.features`).
    stem_width
        Channels of the stride-2 3x3 stem convolution.
    widths
        Output channels of each stage; every stage starts with stride 2.
    depths
        Blocks per stage.
    separable
        Per stage: depthwise-separable blocks (``True``) or ResNet basic
        blocks with dense 3x3 convolutions (``False``).
    dim
        Length of the embedding (the linear head's output).
    input_mean, input_std
        The network computes ``(x - input_mean) / input_std`` first, so its
        input stays ``[0, 1]`` pixels.
    input_pool
        Average-pooling factor applied to the input before the stem (1: none).
        With 2 (the shipped model), a 128 x 128 slice (2.5 mm pixels, 320 mm
        field of view) is seen at 64 x 64 (5 mm): the same field of view for
        a quarter of the compute. Descriptions written before this parameter
        existed load with 1 (:meth:`from_json`).
    """

    in_channels: int = 1
    stem_width: int = 16
    widths: tuple[int, ...] = (32, 64, 96, 256)
    depths: tuple[int, ...] = (1, 1, 1, 1)
    separable: tuple[bool, ...] = (False, False, False, True)
    dim: int = 128
    input_mean: float = 0.5
    input_std: float = 0.25
    input_pool: int = 1

    def __post_init__(self) -> None:
        stages = len(self.widths)
        if stages == 0 or len(self.depths) != stages or len(self.separable) != stages:
            raise ValueError("widths, depths and separable need one entry per stage (>= 1)")
        sizes = (self.in_channels, self.stem_width, self.dim, *self.widths, *self.depths)
        if min(sizes) < 1:
            raise ValueError("channel counts, depths and dim must be >= 1")
        if self.input_std <= 0:
            raise ValueError("input_std must be > 0")
        if self.input_pool < 1:
            raise ValueError("input_pool must be >= 1")

    def to_json(self) -> dict[str, Any]:
        """The hyper-parameters as JSON-ready data."""
        data = asdict(self)
        for key in ("widths", "depths", "separable"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SliceNetV1Params:
        """Rebuild from :meth:`to_json` output (missing ``input_pool``: 1).

        Raises
        ------
        ValueError
            Unknown or invalid keys.
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown hyper-parameters {unknown}")
        kwargs = dict(data)
        kwargs.setdefault("input_pool", 1)  # older descriptions: no input pooling
        for key in ("widths", "depths", "separable"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc


class ConvBNReLU(nn.Sequential):
    """Convolution (no bias), BatchNorm and optionally ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
        relu: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two dense 3x3 convolutions plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(cin, cout, 3, stride)
        self.conv2 = ConvBNReLU(cout, cout, 3, 1, relu=False)
        self.shortcut: nn.Module = (
            nn.Identity() if cin == cout and stride == 1
            else ConvBNReLU(cin, cout, 1, stride, relu=False)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out: torch.Tensor = self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))
        return out


class SeparableBlock(nn.Module):
    """Two depthwise 3x3 + pointwise 1x1 pairs plus a shortcut (few parameters)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNReLU(cin, cin, 3, stride, groups=cin),
            ConvBNReLU(cin, cout, 1),
            ConvBNReLU(cout, cout, 3, 1, groups=cout),
            ConvBNReLU(cout, cout, 1, relu=False),
        )
        self.shortcut: nn.Module = (
            nn.Identity() if cin == cout and stride == 1
            else ConvBNReLU(cin, cout, 1, stride, relu=False)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out: torch.Tensor = self.relu(self.body(x) + self.shortcut(x))
        return out


class SliceNetV1(nn.Module):
    """Compact ResNet-style CNN for single-channel slices (version 1).

    Stride-2 3x3 stem, then stages that each start with stride 2 (dense basic
    blocks at high resolution, depthwise-separable blocks where channels are
    many and pixels few), global average pooling and a linear head to ``dim``.
    With the default :class:`SliceNetV1Params` a 128 x 128 slice is
    average-pooled to 64 x 64 first and ends as a 2 x 2 x 256 map; about
    0.37 M parameters and 10 M multiply-adds (41 M without the input pooling).
    Any input size works (fully convolutional), but weights are made for one.

    The output is not normalised; embedders L2-normalise it. For contrastive
    training, put a projection MLP on top of :meth:`forward` (or of
    :meth:`features`) during training only.

    Parameters
    ----------
    hparams
        Hyper-parameters; the defaults define the shipped model.
    """

    ARCHITECTURE: Final = "SliceNetV1"

    def __init__(self, hparams: SliceNetV1Params | None = None) -> None:
        super().__init__()
        p = hparams if hparams is not None else SliceNetV1Params()
        self.hparams = p
        self.input_mean = float(p.input_mean)
        self.input_std = float(p.input_std)
        self.input_pool = int(p.input_pool)
        self.in_channels = int(p.in_channels)
        self.stem = ConvBNReLU(p.in_channels, p.stem_width, 3, 2)
        blocks: list[nn.Module] = []
        cin = p.stem_width
        for width, depth, separable in zip(p.widths, p.depths, p.separable, strict=True):
            block = SeparableBlock if separable else BasicBlock
            for i in range(depth):
                blocks.append(block(cin, width, 2 if i == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, p.dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, ``(N, widths[-1])``, for ``x`` ``(N, C, S, S)`` in [0, 1].

        A 3-channel network given grey ``(N, 1, S, S)`` slices sees them replicated
        to RGB (the same result as summing its stem weights over the channels).
        """
        if x.shape[1] == 1 and self.in_channels > 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        if self.input_pool > 1:
            x = nn.functional.avg_pool2d(x, self.input_pool, ceil_mode=True)
        x = (x - self.input_mean) / self.input_std
        pooled: torch.Tensor = self.pool(self.stages(self.stem(x)))
        return torch.flatten(pooled, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(N, dim)`` (not normalised) for ``x`` ``(N, C, S, S)`` in [0, 1]."""
        out: torch.Tensor = self.head(self.features(x))
        return out

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Deterministic initialisation from ``generator``.

        Convolutions: Kaiming normal (fan_out, ReLU). BatchNorm: weight 1,
        bias 0, running mean 0, running variance 1. Linear head: normal with
        standard deviation ``1 / sqrt(fan_in)``, bias 0.
        """
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(
                        module.weight, mode="fan_out", nonlinearity="relu", generator=generator
                    )
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
                    module.reset_running_stats()
                elif isinstance(module, nn.Linear):
                    std = 1.0 / math.sqrt(module.in_features)
                    nn.init.normal_(module.weight, 0.0, std, generator=generator)
                    nn.init.zeros_(module.bias)

    def parameter_count(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())


def inflate_stem(state: Mapping[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """A 1-channel SliceNetV1 ``state_dict`` made ``in_channels``-channel.

    The stem weights are replicated over the channels and divided by their
    number, so a grey slice replicated to every channel gives exactly the
    1-channel network's output (the start of the colour student, docs/design/models.md).
    """
    out = {k: v.detach().clone() for k, v in state.items()}
    weight = out["stem.0.weight"]
    if weight.shape[1] != 1:
        raise ValueError(f"the stem has {weight.shape[1]} input channels, expected 1")
    out["stem.0.weight"] = weight.repeat(1, in_channels, 1, 1) / in_channels
    return out


ARCHITECTURES: Final[dict[str, type[SliceNetV1]]] = {SliceNetV1.ARCHITECTURE: SliceNetV1}


# ------------------------------------------------------------------ files, ids
def file_model_id(data: bytes) -> str:
    """Model id of a model file: the first 16 hex digits of SHA-256 over its bytes."""
    return hashlib.sha256(data).hexdigest()[:MODEL_ID_HEX]


def serialise_state_dict(model: nn.Module) -> bytes:
    """``torch.save`` of the model's ``state_dict`` as bytes.

    Saving to memory makes the bytes independent of the file name (``torch.save``
    to a path names the archive's records after the file), so equal tensors
    give equal bytes and an equal model id.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def builtin_weights_path() -> Path:
    """Path of the weights file of the built-in model (inside the package)."""
    return WEIGHTS_DIR / BUILTIN_WEIGHTS
