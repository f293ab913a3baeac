"""Writing torch models as ONNX site models (``sidecar model export-onnx``).

:func:`export_onnx` exports a torch module with torch's ``torch.export``-based
exporter (packages ``onnx`` and ``onnxscript``: the ``onnx-export`` extra), writes
the ``.onnx`` file and its contract JSON and checks that the pair, loaded as the
service would load it, gives the module's vectors. :func:`export_model_file`
picks the module: SliceNetV1 weights (shipped or adapted) or a TorchScript file.
See docs/design/embeddings.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from sidecar.embeddings.model import load_torchscript, load_weights
from sidecar.embeddings.modelbase import ModelError, first_line
from sidecar.embeddings.onnx_model import (
    OnnxContract,
    OnnxEmbedder,
    contract_path,
    load_onnx,
    read_contract,
)
from sidecar.files import write_durably

EXPORT_TOLERANCE: Final = 1e-4
"""Largest difference :func:`export_onnx` accepts between the file's and the module's vectors."""


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    # the exporter logs its optimiser passes at INFO and torch's registry at WARNING
    # (torchvision ops it skips); its own FutureWarnings are torch's business
    names = ("onnxscript", "onnx_ir", "torch.onnx")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _exported_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    if isinstance(model, torch.jit.ScriptModule):
        # torch.export cannot trace a TorchScript module: the older TorchScript-based
        # exporter can (deprecated by torch, but this is the way off TorchScript)
        buffer = io.BytesIO()
        torch.onnx.export(
            model, (example,), buffer,  # type: ignore[arg-type]  # a file object works
            dynamo=False, input_names=["pixels"], output_names=["embedding"], verbose=False,
            dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
        )
        return buffer.getvalue()
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=["pixels"], output_names=["embedding"],
        verbose=False, external_data=False, dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    data: bytes = program.model_proto.SerializeToString()
    return data


def export_onnx(
    model: nn.Module,
    path: Path,
    contract: OnnxContract,
) -> str:
    """Write ``model`` as an ONNX file with its contract JSON, usable as ``embedding.model_path``.

    Exports with torch's ``torch.onnx.export`` (the ``torch.export``-based
    exporter; needs the packages ``onnx`` and ``onnxscript``, the
    ``onnx-export`` extra) with a dynamic batch axis, writes ``path`` and
    :func:`contract_path` (with the file's SHA-256), loads the pair back and
    checks that it gives the module's unit vectors (within
    :data:`EXPORT_TOLERANCE`) on a seeded random batch.

    Parameters
    ----------
    model
        Maps ``(N, C, S, S)`` float32 (``C``, ``S`` and the normalisation as
        ``contract`` says) to ``(N, D)``; put in eval mode.
    path
        Destination ``.onnx`` file; both files are written durably.
    contract
        Its ``input_size``, ``channels``, ``dim``, mean/std, name, licence,
        description and provenance are written; ``sha256`` is filled in.

    Returns
    -------
    str
        The new file's model id.

    Raises
    ------
    ModelError
        The exporter is not installed or fails, or the written file does not
        give the module's vectors.
    """
    model.eval()
    c = contract
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, c.channels, c.input_size, c.input_size, generator=gen)
    try:
        import onnxscript  # noqa: F401, PLC0415 - only the exporter needs it (an extra)
    except ImportError as exc:
        raise ModelError(path, "exporting to ONNX needs the packages onnx and onnxscript: "
                               "pip install 'pacs-sidecar[onnx-export]'") from exc
    try:
        with _quiet_exporter():
            data = _exported_bytes(model, example)
        with torch.inference_mode():
            dim = int(model(example).shape[1])
    except Exception as exc:
        raise ModelError(path, f"cannot export the model to ONNX: {first_line(exc)}") from exc
    if dim != c.dim:
        raise ModelError(path, f"the model's output has dim {dim}, the contract says {c.dim}")
    written = OnnxContract(c.input_size, c.channels, c.dim, c.mean, c.std, c.name, c.licence,
                           c.description, hashlib.sha256(data).hexdigest(), c.provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, data, mode=0o644, exact_mode=True)
    text = json.dumps(written.to_json(), indent=2, sort_keys=True) + "\n"
    write_durably(contract_path(path), text.encode("utf-8"), mode=0o644, exact_mode=True)
    embedder = OnnxEmbedder(load_onnx(path), batch_size=8)
    check = torch.rand(8, c.channels, c.input_size, c.input_size, generator=gen)
    pixels = check.numpy() if c.channels == 3 else check.numpy()[:, 0]
    if c.mean is not None and c.std is not None:  # the module takes what the runtime feeds it
        check = (check - torch.tensor(c.mean).reshape(1, -1, 1, 1)) / torch.tensor(
            c.std).reshape(1, -1, 1, 1)
    with torch.inference_mode():
        expected = model(check).to(torch.float32).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    diff = float(np.abs(embedder.embed(pixels) - expected).max())
    if not diff <= EXPORT_TOLERANCE:
        raise ModelError(path, f"the exported graph's vectors differ from the module's by "
                               f"{diff:.2g} (more than {EXPORT_TOLERANCE})")
    return embedder.model_id


@dataclass(frozen=True)
class Exported:
    """What :func:`export_model_file` wrote.

    Attributes
    ----------
    path
        The ``.onnx`` file (its contract is beside it).
    model_id
        Its model id.
    source
        The weights or TorchScript file exported.
    source_model_id
        The model id the service gives that file at the same input size.
    contract
        The contract written.
    """

    path: Path
    model_id: str
    source: Path
    source_model_id: str
    contract: OnnxContract


def export_model_file(source: Path | None, out: Path, input_size: int) -> Exported:
    """Export a model file as the service runs it to an ONNX site model.

    Parameters
    ----------
    source
        SliceNetV1 weights (a ``.pt`` with its ``.json`` beside it; ``None``:
        the shipped weights), or any other file: TorchScript.
    out
        The ``.onnx`` file to write.
    input_size
        ``embedding.input_size``: the size the service runs the model at (a
        TorchScript file that records its own size is exported at that size).

    Raises
    ------
    ModelError
        The source cannot be loaded, or the export fails or does not give the
        source's vectors.
    """
    provenance: dict[str, object] = {
        "exported_by": f"{__name__}.export_model_file",
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
    }
    name = licence = description = ""
    if source is None or source.with_suffix(".json").is_file():
        weights, info = load_weights(source)
        module: nn.Module = weights
        source = info.path
        channels, dim, size = info.hparams.in_channels, info.hparams.dim, input_size
        source_id = info.model_id if size == info.input_size else f"{info.model_id}-s{size}"
        desc = info.description
        name = str(desc.get("name", ""))
        licence = str(desc.get("licence") or desc.get("license") or "")
        description = str(desc.get("status", ""))
        provenance["source_sha256"] = info.sha256
    else:
        module, file_id, meta = load_torchscript(source)
        native = meta.get("input_size")
        size = native if isinstance(native, int) else input_size
        channels = 3 if meta.get("channels") == 3 else 1
        source_id = file_id if isinstance(native, int) else f"{file_id}-s{size}"
        try:
            with torch.inference_mode():
                dim = int(module(torch.zeros(2, channels, size, size)).shape[1])
        except Exception as exc:
            raise ModelError(source, f"fails on a 2 x {channels} x {size} x {size} input: "
                                     f"{first_line(exc)}") from exc
    provenance.update({"source_file": source.name, "source_model_id": source_id})
    contract = OnnxContract(size, channels, dim, name=name, licence=licence,
                            description=description, provenance=provenance)
    model_id = export_onnx(module, out, contract)
    return Exported(out, model_id, source, source_id, read_contract(out))
