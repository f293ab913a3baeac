"""Slice embedders: the :class:`Embedder` contract and loading model files into one.

An embedder turns ``(N, S, S)`` grey (or ``(N, 3, S, S)`` RGB, when its
``channels`` is 3) slices in [0, 1] into ``(N, dim)`` float32 unit rows and names
its vector space by ``model_id``. :class:`TorchEmbedder` runs the built-in
SliceNetV1 weights (:func:`load_weights`) or a TorchScript file
(``embedding.model_path``, :func:`load_torchscript`, :func:`export_torchscript`;
deprecated by torch); a ``.onnx`` model_path is run by onnxruntime
(:mod:`sidecar.embeddings.onnx_model`). :class:`TinyEmbedder` is a pure-numpy
stand-in for unit tests. The contract, the model id rules and the thread setting
are in docs/design/embeddings.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from sidecar.config import EmbeddingConfig

# ModelError, FloatBatch and Vectors live in modelbase (shared with the ONNX embedder)
from sidecar.embeddings.modelbase import FloatBatch as FloatBatch
from sidecar.embeddings.modelbase import ModelError as ModelError
from sidecar.embeddings.modelbase import Vectors as Vectors
from sidecar.embeddings.modelbase import check_batch
from sidecar.embeddings.modelbase import first_line as _first_line
from sidecar.embeddings.modelbase import read_model_bytes as _read_bytes
from sidecar.embeddings.network import (
    ARCHITECTURES,
    MODEL_ID_HEX,
    WEIGHTS_FORMAT,
    SliceNetV1,
    SliceNetV1Params,
    builtin_weights_path,
    file_model_id,
)
from sidecar.files import write_durably

logger = logging.getLogger(__name__)

TORCHSCRIPT_META: Final = "sidecar.json"
"""Name of the metadata record that :func:`export_torchscript` adds to a TorchScript file."""
ONNX_SUFFIX: Final = ".onnx"
"""An ``embedding.model_path`` ending so (any case) is an ONNX model; any other is TorchScript."""


# --------------------------------------------------------------------- interface
@runtime_checkable
class Embedder(Protocol):
    """Turns pre-processed slices into unit vectors."""

    @property
    def model_id(self) -> str:
        """Identifies the vector space; stored with every vector."""
        ...

    @property
    def dim(self) -> int:
        """Length of each vector."""
        ...

    @property
    def input_size(self) -> int:
        """Side ``S`` of the square slices :meth:`embed` accepts."""
        ...

    @property
    def channels(self) -> int:
        """1: the model takes grey slices ``(N, S, S)``; 3: RGB slices ``(N, 3, S, S)``."""
        ...

    def embed(self, batch: FloatBatch) -> Vectors:
        """Embed a batch of slices.

        Parameters
        ----------
        batch
            ``(N, S, S)`` floating point, values in ``[0, 1]``; ``N`` may be 0.
            With ``channels == 3``: ``(N, 3, S, S)``, RGB order (grey
            ``(N, S, S)`` slices are replicated into the three channels).

        Returns
        -------
        numpy.ndarray
            ``(N, dim)`` float32, every row of unit L2 norm.

        Raises
        ------
        ValueError
            The batch has the wrong shape or holds NaN or infinite values.
        ModelError
            The model produced unusable output (model files only).
        """
        ...


# ------------------------------------------------------------------ files, ids
def _model_id(file_id: str, native_size: int | None, input_size: int) -> str:
    return file_id if native_size == input_size else f"{file_id}-s{input_size}"


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a model file durably (:func:`sidecar.files.write_durably`), creating its folder.

    The file gets exactly ``mode``, whatever the umask: model files must be
    readable by the service's user.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, data, mode=mode, exact_mode=True)


@dataclass(frozen=True)
class WeightsInfo:
    """What the JSON next to a weights file says, checked against the file.

    Attributes
    ----------
    path
        The weights file.
    model_id
        Its model id (hash of the file) at ``input_size``.
    sha256
        SHA-256 of the file, hex.
    input_size
        Input size the weights were made for.
    trained
        False for an initialisation that was never trained.
    hparams
        Architecture hyper-parameters.
    description
        The whole JSON.
    """

    path: Path
    model_id: str
    sha256: str
    input_size: int
    trained: bool
    hparams: SliceNetV1Params
    description: dict[str, Any] = field(repr=False)


def load_weights(path: Path | None = None) -> tuple[SliceNetV1, WeightsInfo]:
    """Load SliceNetV1 weights (a ``state_dict`` file and the JSON next to it).

    Parameters
    ----------
    path
        Weights file; its description is the same name with ``.json``.
        ``None``: the built-in weights.

    Returns
    -------
    tuple
        The model in eval mode, and what its JSON says.

    Raises
    ------
    ModelError
        A file is missing or unreadable, the JSON does not describe this file
        (checked by SHA-256) or names an unknown architecture, or the tensors
        do not fit the architecture.
    """
    path = builtin_weights_path() if path is None else path
    json_path = path.with_suffix(".json")
    data = _read_bytes(path)
    try:
        desc = json.loads(_read_bytes(json_path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(json_path, f"not valid JSON ({_first_line(exc)})") from exc
    if not isinstance(desc, dict):
        raise ModelError(json_path, "not a JSON object")
    sha = hashlib.sha256(data).hexdigest()
    if desc.get("weights_sha256") != sha:
        raise ModelError(
            path,
            f"SHA-256 {sha[:MODEL_ID_HEX]}... does not match {json_path.name} "
            f"({str(desc.get('weights_sha256'))[:MODEL_ID_HEX]}...): the file is corrupt "
            "or the two files do not belong together",
        )
    arch = desc.get("architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(json_path, f"unknown architecture {arch!r} (known: {list(ARCHITECTURES)})")
    try:
        hparams = SliceNetV1Params.from_json(desc["hparams"])
        input_size = int(desc["input_size"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(json_path, f"invalid description: {_first_line(exc)}") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt archives raise RuntimeError, UnpicklingError, ...
        raise ModelError(path, f"not a readable torch weights file ({_first_line(exc)})") from exc
    if not isinstance(state, Mapping):
        raise ModelError(path, "does not hold a state_dict")
    model = ARCHITECTURES[arch](hparams)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(path, f"tensors do not fit {arch}: {_first_line(exc)}") from exc
    model.eval()
    info = WeightsInfo(
        path=path,
        model_id=file_model_id(data),
        sha256=sha,
        input_size=input_size,
        trained=bool(desc.get("trained", False)),
        hparams=hparams,
        description=desc,
    )
    return model, info


@contextmanager
def _quiet_torchscript() -> Iterator[None]:
    # torch 2.13 marks all of torch.jit deprecated; the configuration's model_path
    # is a TorchScript file, so this module keeps using it without the noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        yield


def load_torchscript(path: Path) -> tuple[nn.Module, str, dict[str, Any]]:
    """Load a TorchScript model file.

    Returns
    -------
    tuple
        The module (eval mode), the file's model id (hash of its bytes, no
        input-size suffix) and the metadata :func:`export_torchscript` stored in
        it (empty for other files).

    Raises
    ------
    ModelError
        The file is missing, unreadable, not TorchScript, or its metadata is
        not valid JSON.
    """
    data = _read_bytes(path)
    extra: dict[str, Any] = {TORCHSCRIPT_META: ""}
    try:
        with _quiet_torchscript():
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                io.BytesIO(data), map_location="cpu", _extra_files=extra
            )
    except Exception as exc:  # corrupt archives raise RuntimeError and others
        raise ModelError(
            path,
            f"not a readable TorchScript file ({_first_line(exc)}); embedding.model_path "
            "must name a file written by torch.jit.save or export_torchscript, "
            "not a state_dict (an ONNX model must be named *.onnx)",
        ) from exc
    raw = extra.get(TORCHSCRIPT_META) or b""
    meta: dict[str, Any] = {}
    if raw:
        try:
            loaded = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(path, f"metadata {TORCHSCRIPT_META} is not valid JSON") from exc
        if not isinstance(loaded, dict):
            raise ModelError(path, f"metadata {TORCHSCRIPT_META} is not a JSON object")
        meta = loaded
    if not isinstance(module, nn.Module):
        raise ModelError(path, "does not hold a TorchScript module")
    module.eval()
    return module, file_model_id(data), meta


def export_torchscript(
    model: nn.Module,
    path: Path,
    *,
    input_size: int = 128,
    source_model_id: str | None = None,
    channels: int = 1,
) -> str:
    """Write ``model`` as a TorchScript file usable as ``embedding.model_path``.

    A plain module is traced with an example batch ``(2, C, S, S)``; pass a
    ``torch.jit.ScriptModule`` for models with data-dependent control flow.
    The file records ``input_size``, ``channels``, the output dimension and
    ``source_model_id`` as metadata. The model is put in eval mode.
    TorchScript is deprecated by torch: prefer
    :func:`sidecar.embeddings.onnx_model.export_onnx`.

    Parameters
    ----------
    model
        Maps ``(N, C, S, S)`` in [0, 1] to ``(N, D)``.
    path
        Destination; written atomically.
    input_size
        The input size ``S`` the model is made for (its native size).
    source_model_id
        Model id of what was exported, for provenance.
    channels
        ``C``: 1 (grey) or 3 (RGB).

    Returns
    -------
    str
        The model id of the new file at ``input_size``.

    Raises
    ------
    ModelError
        The model fails on the example batch or its output is not ``(2, D)``.
    """
    model.eval()
    example = torch.rand(2, channels, input_size, input_size,
                         generator=torch.Generator().manual_seed(0))
    try:
        with _quiet_torchscript(), torch.no_grad():
            if isinstance(model, torch.jit.ScriptModule):
                scripted: nn.Module = model
            else:
                scripted = torch.jit.trace(model, example)  # type: ignore[no-untyped-call]
            out = scripted(example)
    except Exception as exc:
        raise ModelError(path, f"cannot export the model: {_first_line(exc)}") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        raise ModelError(path, "cannot export the model: output is not an N x D tensor")
    meta = {
        "format": WEIGHTS_FORMAT,
        "input_size": input_size,
        "channels": channels,
        "dim": int(out.shape[1]),
        "source_model_id": source_model_id,
        "exported_by": f"{__name__}.export_torchscript",
        "torch_version": torch.__version__,
    }
    buffer = io.BytesIO()
    with _quiet_torchscript():
        torch.jit.save(
            scripted, buffer, _extra_files={TORCHSCRIPT_META: json.dumps(meta, sort_keys=True)}
        )
    data = buffer.getvalue()
    atomic_write(path, data)
    return _model_id(file_model_id(data), input_size, input_size)


# ------------------------------------------------------------------- embedders
class TorchEmbedder:
    """Embedder running a torch module on the CPU in batches.

    Parameters
    ----------
    module
        Maps ``(N, C, S, S)`` float32 in [0, 1] to ``(N, D)``; put in eval mode.
    model_id
        Identifies the vector space (see the module notes).
    input_size
        Side ``S`` of the input slices.
    batch_size
        Most slices per forward pass; larger batches are split.
    source
        The model file, for error messages.
    channels
        ``C``: 1 (grey) or 3 (RGB).

    Raises
    ------
    ModelError
        The dry run on a ``(2, C, S, S)`` batch fails or does not give ``(2, D)``.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        model_id: str,
        input_size: int,
        batch_size: int = 32,
        source: str = "model",
        channels: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        self._channels = channels
        self._module = module.eval()
        self._model_id = model_id
        self._input_size = input_size
        self._batch_size = batch_size
        self._source = source
        probe = torch.linspace(0.0, 1.0, 2 * channels * input_size * input_size)
        try:
            with torch.inference_mode():
                out = self._module(probe.reshape(2, channels, input_size, input_size))
        except Exception as exc:
            raise ModelError(
                source,
                f"fails on a 2 x {channels} x {input_size} x {input_size} input: "
                f"{_first_line(exc)}",
            ) from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(source, f"output for a batch of 2 is {shape}, expected (2, D)")
        if not out.is_floating_point() or out.shape[1] < 1:
            raise ModelError(source, f"output must be floating point with D >= 1, got {out.dtype}")
        self._dim = int(out.shape[1])

    @classmethod
    def from_config(cls, cfg: EmbeddingConfig) -> TorchEmbedder:
        """The built-in model, or ``cfg.model_path`` (a TorchScript file) when set.

        Sets ``torch.set_num_threads(cfg.threads)``, which is process-global.
        A TorchScript file is logged with a WARNING: torch deprecates
        TorchScript; export it to ONNX (``sidecar model export-onnx``).

        Raises
        ------
        ModelError
            The weights or TorchScript file is missing, corrupt or does not fit.
        """
        torch.set_num_threads(cfg.threads)
        channels = 1
        if cfg.model_path is None:
            model, info = load_weights(None)
            module: nn.Module = model
            channels = info.hparams.in_channels
            model_id = _model_id(info.model_id, info.input_size, cfg.input_size)
            source = str(info.path)
            if not info.trained:
                logger.warning(
                    "built-in embedding weights %s are NOT TRAINED (random initialisation): "
                    "similarity results are not meaningful yet",
                    info.path.name,
                )
            if cfg.input_size != info.input_size:
                logger.warning(
                    "embedding.input_size %d differs from the %d the built-in weights were "
                    "made for; model id %s",
                    cfg.input_size, info.input_size, model_id,
                )
        else:
            module, file_id, meta = load_torchscript(cfg.model_path)
            native = meta.get("input_size")
            model_id = _model_id(file_id, native if isinstance(native, int) else None,
                                 cfg.input_size)
            source = str(cfg.model_path)
            channels = 3 if meta.get("channels") == 3 else 1
            logger.warning(
                "embedding.model_path %s is a TorchScript file: torch deprecates TorchScript "
                "and a later torch may not load it. Export it to ONNX (`sidecar model "
                "export-onnx --out FILE.onnx`, or torch.onnx.export with the JSON contract of "
                "docs/admin-guide.md) and set embedding.model_path to the .onnx file",
                source,
            )
        embedder = cls(
            module,
            model_id=model_id,
            input_size=cfg.input_size,
            batch_size=cfg.batch_size,
            source=source,
            channels=channels,
        )
        logger.info(
            "embedding model %s from %s: input %d x %d x %d, dim %d, batch %d, %d torch threads",
            model_id, source, channels, cfg.input_size, cfg.input_size, embedder.dim,
            cfg.batch_size, cfg.threads,
        )
        return embedder

    @property
    def model_id(self) -> str:
        """Identifies the vector space; stored with every vector."""
        return self._model_id

    @property
    def dim(self) -> int:
        """Length of each vector (found by the dry run)."""
        return self._dim

    @property
    def input_size(self) -> int:
        """Side of the square input slices."""
        return self._input_size

    @property
    def channels(self) -> int:
        """Input channels: 1 (grey), or 3 (RGB) for weights with ``in_channels`` 3."""
        return self._channels

    @property
    def batch_size(self) -> int:
        """Most slices per forward pass."""
        return self._batch_size

    def embed(self, batch: FloatBatch) -> Vectors:
        """Embed ``(N, S, S)`` (or RGB ``(N, 3, S, S)``) slices in [0, 1] as ``(N, dim)`` unit rows.

        See :class:`Embedder`. Runs under ``torch.inference_mode`` in chunks of
        ``batch_size``; the module is not modified, so calls from several
        threads are safe.
        """
        arr = check_batch(batch, self._input_size, self._channels)
        if arr.ndim == 3:
            arr = arr[:, None]
        n = arr.shape[0]
        result = np.empty((n, self._dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, self._batch_size):
                stop = min(start + self._batch_size, n)
                x = torch.from_numpy(arr[start:stop])
                out = self._module(x)
                result[start:stop] = self._normalised(out, stop - start)
        return result

    def _normalised(self, out: Any, n: int) -> Vectors:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, self._dim):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(self._source, f"output is {shape}, expected ({n}, {self._dim})")
        vec = out.to(torch.float32)
        norms = torch.linalg.vector_norm(vec, dim=1, keepdim=True)
        if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
            raise ModelError(self._source, "output holds NaN, infinite or all-zero vectors")
        result: Vectors = (vec / norms).numpy()
        return result


class TinyEmbedder:
    """Tiny deterministic pure-numpy embedder for unit tests.

    Block-averages each slice to ``grid x grid``, subtracts 0.5, adds a small
    constant feature (so a uniform grey slice still has a direction), applies a
    fixed random projection seeded by ``seed`` and L2-normalises. Slices that
    differ by small noise get nearly equal vectors.

    Parameters
    ----------
    input_size
        Side of the square input slices (>= ``grid``).
    dim
        Length of each vector.
    grid
        Side of the block-average grid.
    seed
        Seed of the projection matrix.
    """

    def __init__(self, input_size: int = 64, dim: int = 32, grid: int = 8, seed: int = 0) -> None:
        if grid < 1 or dim < 1 or input_size < grid:
            raise ValueError("need grid >= 1, dim >= 1 and input_size >= grid")
        self._input_size = input_size
        self._dim = dim
        self._model_id = f"tiny-g{grid}-d{dim}-seed{seed}-s{input_size}"
        edges = np.linspace(0, input_size, grid + 1).round().astype(np.intp)
        self._starts = edges[:-1]
        counts = np.diff(edges).astype(np.float32)
        self._area = np.outer(counts, counts).reshape(-1)
        rng = np.random.default_rng(seed)
        proj = rng.standard_normal((grid * grid + 1, dim)) / math.sqrt(dim)
        self._proj = proj.astype(np.float32)

    @property
    def model_id(self) -> str:
        """``tiny-g<grid>-d<dim>-seed<seed>-s<input_size>``."""
        return self._model_id

    @property
    def dim(self) -> int:
        """Length of each vector."""
        return self._dim

    @property
    def input_size(self) -> int:
        """Side of the square input slices."""
        return self._input_size

    @property
    def channels(self) -> int:
        """1: grey slices."""
        return 1

    def embed(self, batch: FloatBatch) -> Vectors:
        """Embed ``(N, S, S)`` slices in [0, 1] as unit rows (see :class:`Embedder`)."""
        arr = check_batch(batch, self._input_size)
        n = arr.shape[0]
        if n == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        sums = np.add.reduceat(np.add.reduceat(arr, self._starts, axis=1), self._starts, axis=2)
        pooled = sums.reshape(n, -1) / self._area - 0.5
        feats = np.concatenate([pooled, np.full((n, 1), 0.01, dtype=np.float32)], axis=1)
        vec = feats.astype(np.float32) @ self._proj
        norms = np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        result: Vectors = (vec / norms).astype(np.float32)
        return result


def load_embedder(cfg: EmbeddingConfig) -> Embedder:
    """The embedder the configuration asks for.

    A ``cfg.model_path`` ending in ``.onnx``:
    :meth:`sidecar.embeddings.onnx_model.OnnxEmbedder.from_config`; otherwise
    :meth:`TorchEmbedder.from_config` (built-in weights or TorchScript).

    Raises
    ------
    ModelError
        The weights, TorchScript or ONNX file (or its JSON) is missing, corrupt
        or does not fit.
    """
    if cfg.model_path is not None and cfg.model_path.suffix.lower() == ONNX_SUFFIX:
        # onnxruntime is loaded only when the configuration names an ONNX model
        from sidecar.embeddings.onnx_model import OnnxEmbedder  # noqa: PLC0415

        return OnnxEmbedder.from_config(cfg)
    return TorchEmbedder.from_config(cfg)
