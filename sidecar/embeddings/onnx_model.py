"""ONNX site models: an ``embedding.model_path`` ending in ``.onnx``, run by onnxruntime on the CPU.

:class:`OnnxContract` is the input contract in the JSON beside the model
(``model.onnx`` + ``model.onnx.json``: size, channels, optional mean/std, output
dim, name, licence); :func:`load_onnx` checks the graph against it and gives the
model id; :class:`OnnxEmbedder` runs it with onnxruntime.
Writing such a pair from a torch model is :mod:`sidecar.embeddings.onnx_export`.
The contract, the model id and the checks are in docs/design/embeddings.md; the
settings in docs/admin-guide.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from sidecar.config import EmbeddingConfig
from sidecar.embeddings.modelbase import (
    FloatBatch,
    ModelError,
    Vectors,
    check_batch,
    first_line,
    read_model_bytes,
    unit_rows,
)
from sidecar.embeddings.network import file_model_id

logger = logging.getLogger(__name__)

CONTRACT_SUFFIX: Final = ".json"
"""The contract of ``model.onnx`` is ``model.onnx.json`` (the whole file name + this)."""
CONTRACT_FORMAT: Final = 1
"""Version of the contract's layout."""
_REQUIRED: Final = ("input_size", "channels", "dim")
_OPTIONAL: Final = ("format", "mean", "std", "name", "licence", "license", "description",
                    "sha256", "provenance")
_FLOAT_TYPES: Final = {"tensor(float)", "tensor(float16)", "tensor(double)"}


def contract_path(model_path: Path) -> Path:
    """Where the contract of ``model_path`` lives: ``<name>.onnx.json`` beside it."""
    return model_path.with_name(model_path.name + CONTRACT_SUFFIX)


@dataclass(frozen=True)
class OnnxContract:
    """What the JSON beside an ONNX model says about its input and output.

    Attributes
    ----------
    input_size
        ``S``: the model takes ``S x S`` slices (the pipeline prepares them at
        this size, whatever ``embedding.input_size`` says).
    channels
        1: the graph's input is ``(N, 1, S, S)`` grey; 3: ``(N, 3, S, S)`` RGB.
    dim
        ``D``: the graph's (first) output is ``(N, D)``.
    mean, std
        Per channel; when given, the runtime feeds ``(x - mean) / std`` to the
        graph instead of the pixels ``x`` in [0, 1]. ``None``: pixels as they are.
    name, licence, description
        Shown at load and by ``sidecar model list``; no effect on the vectors.
    sha256
        When given, the model file's SHA-256 must equal it (written by
        :func:`export_onnx`: the pair belongs together).
    provenance
        Free-form record of how the file was made.
    """

    input_size: int
    channels: int
    dim: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    name: str = ""
    licence: str = ""
    description: str = ""
    sha256: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, source: Path) -> OnnxContract:
        """Check a parsed contract; :class:`ModelError` naming ``source`` and the problem."""
        if not isinstance(data, dict):
            raise ModelError(source, "not a JSON object")
        unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ModelError(source, f"unknown key(s) {unknown} (known: "
                                     f"{list(_REQUIRED) + list(_OPTIONAL)})")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ModelError(source, f"missing {missing}: an ONNX model's contract needs "
                                     "input_size, channels and dim")
        if data.get("format", CONTRACT_FORMAT) != CONTRACT_FORMAT:
            raise ModelError(source, f"format {data['format']!r} is not {CONTRACT_FORMAT}")

        def integer(key: str, low: int, high: int) -> int:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ModelError(source, f"{key} must be an integer in [{low}, {high}], "
                                         f"got {value!r}")
            return value

        size = integer("input_size", 16, 1024)
        channels = integer("channels", 1, 3)
        if channels == 2:
            raise ModelError(source, "channels must be 1 (grey) or 3 (RGB), got 2")
        dim = integer("dim", 1, 65536)
        if ("mean" in data) != ("std" in data):
            raise ModelError(source, "give both mean and std, or neither")
        mean = std = None
        if "mean" in data:
            mean = _per_channel(data["mean"], channels, "mean", source)
            std = _per_channel(data["std"], channels, "std", source)
            if min(std) <= 0:
                raise ModelError(source, f"std must be > 0, got {list(std)}")
        text = {}
        for key in ("name", "licence", "license", "description"):
            value = data.get(key, "")
            if not isinstance(value, str):
                raise ModelError(source, f"{key} must be a string")
            text[key] = value
        sha = data.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
            raise ModelError(source, "sha256 must be 64 hex digits")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise ModelError(source, "provenance must be a JSON object")
        return cls(size, channels, dim, mean, std, text["name"],
                   text["licence"] or text["license"], text["description"], sha, provenance)

    def to_json(self) -> dict[str, Any]:
        """The contract as the JSON :meth:`from_json` reads (empty fields left out)."""
        out: dict[str, Any] = {"format": CONTRACT_FORMAT, "input_size": self.input_size,
                               "channels": self.channels, "dim": self.dim}
        if self.mean is not None and self.std is not None:
            out["mean"], out["std"] = list(self.mean), list(self.std)
        for key in ("name", "licence", "description", "sha256"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out


def _per_channel(value: Any, channels: int, key: str, source: Path) -> tuple[float, ...]:
    items = value if isinstance(value, list) else [value]
    if len(items) == 1:
        items = items * channels
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
             for x in items)
    if not ok or len(items) != channels:
        raise ModelError(source, f"{key} must be one number or {channels} (one per channel), "
                                 f"got {value!r}")
    return tuple(float(x) for x in items)


def read_contract(model_path: Path) -> OnnxContract:
    """The checked contract beside ``model_path``; :class:`ModelError` if missing or invalid."""
    path = contract_path(model_path)
    try:
        raw = read_model_bytes(path)
    except ModelError as exc:
        raise ModelError(path, f"{exc.problem}: an ONNX model needs its input contract beside "
                               f"it ({path.name}; see docs/admin-guide.md)") from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(path, f"not valid JSON ({first_line(exc)})") from exc
    return OnnxContract.from_json(data, path)


def _dim_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX model file checked against its contract (:func:`load_onnx`).

    Attributes
    ----------
    path
        The ``.onnx`` file.
    session
        Its onnxruntime session (CPU).
    contract
        What its JSON says.
    model_id
        See :func:`onnx_model_id`.
    input_name
        The graph's input.
    output_name
        The graph's first output (the embedding; others are not computed).
    fixed_batch
        The graph's batch size when its first input axis is fixed, else ``None``.
    """

    path: Path
    session: ort.InferenceSession
    contract: OnnxContract
    model_id: str
    input_name: str
    output_name: str
    fixed_batch: int | None


def onnx_model_id(data: bytes, contract: OnnxContract, input_shape: Sequence[Any]) -> str:
    """The model id of an ONNX file with its contract.

    The file's id (:func:`~sidecar.embeddings.network.file_model_id`), plus what
    the contract adds to it when the file does not fix it: ``-s<S>`` when the
    graph's height and width are symbolic, ``-c<C>`` when its channel axis is,
    and ``-n<8 hex>`` (hash of mean and std) when the runtime normalises.
    Name, licence and description change no vector and no id.
    """
    parts = [file_model_id(data)]
    if not all(isinstance(d, int) for d in input_shape[2:]):
        parts.append(f"s{contract.input_size}")
    if not isinstance(input_shape[1], int):
        parts.append(f"c{contract.channels}")
    if contract.mean is not None:
        norm = json.dumps([list(contract.mean), list(contract.std or ())])
        parts.append("n" + hashlib.sha256(norm.encode()).hexdigest()[:8])
    return "-".join(parts)


def load_onnx(path: Path, threads: int = 1) -> OnnxModel:
    """Load an ONNX model and its contract, check one against the other.

    Parameters
    ----------
    path
        The ``.onnx`` file; its contract is :func:`contract_path`.
    threads
        onnxruntime intra-op threads (``embedding.threads``); spinning is off,
        so idle threads leave the CPU to the DICOM receivers.

    Raises
    ------
    ModelError
        The file or its JSON is missing, unreadable or invalid, or the graph
        does not have one float input ``(N, C, S, S)`` and a 2-D float output
        ``(N, D)`` matching the JSON.
    """
    data = read_model_bytes(path)
    contract = read_contract(path)
    if contract.sha256 is not None and hashlib.sha256(data).hexdigest() != contract.sha256:
        raise ModelError(path, f"SHA-256 does not match {contract_path(path).name}: the file "
                               "is corrupt or the two files do not belong together")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelError(path, f"not a readable ONNX model ({first_line(exc)})") from exc
    json_name = contract_path(path).name
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ModelError(path, f"the graph has {len(inputs)} inputs {names}; the sidecar "
                               "feeds exactly one, (N, C, S, S) float32")
    inp = inputs[0]
    shape = list(inp.shape)
    if inp.type != "tensor(float)":
        raise ModelError(path, f"input {inp.name!r} is {inp.type}, expected tensor(float)")
    want = f"[N, {contract.channels}, {contract.input_size}, {contract.input_size}]"
    if len(shape) != 4:
        raise ModelError(path, f"input {inp.name!r} has shape {_dim_text(shape)}, expected "
                               f"{want} ({json_name})")
    fixed = [(a, d) for a, d in enumerate(shape) if isinstance(d, int)]
    expected = {1: contract.channels, 2: contract.input_size, 3: contract.input_size}
    if any(a in expected and d != expected[a] for a, d in fixed):
        raise ModelError(path, f"input {inp.name!r} has shape {_dim_text(shape)}, but "
                               f"{json_name} says {want} (input_size {contract.input_size}, "
                               f"channels {contract.channels})")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    out = outputs[0]
    oshape = list(out.shape)
    if out.type not in _FLOAT_TYPES:
        raise ModelError(path, f"output {out.name!r} is {out.type}, expected a float tensor")
    if len(oshape) != 2:
        raise ModelError(path, f"output {out.name!r} has shape {_dim_text(oshape)}, expected "
                               "2-D [N, D]")
    if isinstance(oshape[1], int) and oshape[1] != contract.dim:
        raise ModelError(path, f"output {out.name!r} has shape {_dim_text(oshape)}, but "
                               f"{json_name} says dim {contract.dim}")
    return OnnxModel(path, session, contract, onnx_model_id(data, contract, shape),
                     inp.name, out.name, batch)


class OnnxEmbedder:
    """Embedder running an ONNX model (:func:`load_onnx`) with onnxruntime on the CPU.

    Parameters
    ----------
    model
        The checked model.
    batch_size
        Most slices per run (a graph with a fixed batch axis runs in chunks of
        that size, the last one padded with zeros).

    Raises
    ------
    ModelError
        The dry run on a ``(2, C, S, S)`` batch fails, gives an output that is
        not ``(2, dim)`` or holds NaN, infinite or all-zero vectors.
    """

    def __init__(self, model: OnnxModel, *, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._model = model
        c = model.contract
        self._chunk = model.fixed_batch or batch_size
        self._source = str(model.path)
        self._mean = self._std = None
        if c.mean is not None and c.std is not None:
            self._mean = np.asarray(c.mean, dtype=np.float32).reshape(1, -1, 1, 1)
            self._std = np.asarray(c.std, dtype=np.float32).reshape(1, -1, 1, 1)
        probe = np.linspace(0.0, 1.0, 2 * c.channels * c.input_size ** 2, dtype=np.float32)
        probe = probe.reshape(2, c.channels, c.input_size, c.input_size)
        if c.channels == 1:
            probe = probe[:, 0]
        try:
            self.embed(probe)
        except ModelError as exc:
            raise ModelError(exc.path, f"dry run on a 2 x {c.channels} x {c.input_size} x "
                                       f"{c.input_size} input: {exc.problem}") from exc

    @classmethod
    def from_config(cls, cfg: EmbeddingConfig) -> OnnxEmbedder:
        """The ONNX model ``cfg.model_path`` with ``cfg.threads`` intra-op threads.

        ``cfg.input_size`` is not used: the contract fixes the input size
        (a WARNING says so when they differ).

        Raises
        ------
        ModelError
            The model or its contract is missing, invalid or does not fit.
        """
        if cfg.model_path is None:
            raise ValueError("embedding.model_path is empty")
        model = load_onnx(cfg.model_path, cfg.threads)
        c = model.contract
        if cfg.input_size != c.input_size:
            logger.warning(
                "embedding.input_size %d is not used: %s fixes the model's input at %d x %d "
                "(slices are prepared at that size)",
                cfg.input_size, contract_path(cfg.model_path).name, c.input_size, c.input_size,
            )
        embedder = cls(model, batch_size=cfg.batch_size)
        logger.info(
            "embedding model %s from %s (ONNX%s%s, onnxruntime %s): input %d x %d x %d, dim %d, "
            "batch %d, %d threads",
            model.model_id, model.path, f" {c.name!r}" if c.name else "",
            f", licence {c.licence}" if c.licence else "", ort.__version__, c.channels,
            c.input_size, c.input_size, c.dim, embedder._chunk, cfg.threads,
        )
        return embedder

    @property
    def model_id(self) -> str:
        """Identifies the vector space (:func:`onnx_model_id`)."""
        return self._model.model_id

    @property
    def dim(self) -> int:
        """Length of each vector (the contract's ``dim``, checked by the dry run)."""
        return self._model.contract.dim

    @property
    def input_size(self) -> int:
        """Side of the square input slices (the contract's ``input_size``)."""
        return self._model.contract.input_size

    @property
    def channels(self) -> int:
        """1 (grey) or 3 (RGB), from the contract."""
        return self._model.contract.channels

    @property
    def contract(self) -> OnnxContract:
        """What the model's JSON says."""
        return self._model.contract

    def embed(self, batch: FloatBatch) -> Vectors:
        """Embed ``(N, S, S)`` (or, for a 3-channel model, ``(N, 3, S, S)``) slices in [0, 1].

        See :class:`~sidecar.embeddings.model.Embedder`. onnxruntime sessions
        are safe to run from several threads.
        """
        c = self._model.contract
        arr = check_batch(batch, c.input_size, c.channels)
        if arr.ndim == 3:
            arr = arr[:, None]
        if self._mean is not None and self._std is not None:
            arr = (arr - self._mean) / self._std
        n = arr.shape[0]
        result = np.empty((n, c.dim), dtype=np.float32)
        for start in range(0, n, self._chunk):
            stop = min(start + self._chunk, n)
            x = np.ascontiguousarray(arr[start:stop], dtype=np.float32)
            if self._model.fixed_batch and stop - start < self._chunk:
                x = np.concatenate([x, np.zeros((self._chunk - (stop - start), *x.shape[1:]),
                                                dtype=np.float32)])
            try:
                out = self._model.session.run([self._model.output_name],
                                              {self._model.input_name: x})[0]
            except Exception as exc:  # onnxruntime's RuntimeException and others
                raise ModelError(self._source, f"onnxruntime fails: {first_line(exc)}") from exc
            if self._model.fixed_batch and isinstance(out, np.ndarray) and out.ndim >= 1:
                out = out[: stop - start]
            result[start:stop] = unit_rows(out, stop - start, c.dim, self._source)
        return result
