"""What every embedder shares: :class:`ModelError`, model file bytes, input batches, output rows.

The batch contract (grey ``(N, S, S)``, colour ``(N, 3, S, S)`` in RGB order,
values in [0, 1]) is in docs/design/embeddings.md. :mod:`sidecar.embeddings.model`
(torch) and :mod:`sidecar.embeddings.onnx_model` (onnxruntime) build on these
helpers; neither imports the other's runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sidecar.errors import SidecarError

FloatBatch = npt.NDArray[np.floating[Any]]
Vectors = npt.NDArray[np.float32]


class ModelError(SidecarError):
    """A model file is missing, unreadable or does not fit, or a model misbehaves.

    Parameters
    ----------
    path
        The weights, JSON, TorchScript or ONNX file concerned.
    problem
        What is wrong with it.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"model file {self.path}: {problem}")


def read_model_bytes(path: Path) -> bytes:
    """The bytes of a model file; :class:`ModelError` when it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelError(path, "file not found") from exc
    except OSError as exc:
        raise ModelError(path, f"cannot read: {exc.strerror or exc}") from exc


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for error messages naming a library's failure."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_batch(batch: FloatBatch, size: int, channels: int = 1) -> npt.NDArray[np.float32]:
    """A batch as contiguous, writeable float32, checked.

    Parameters
    ----------
    batch
        ``(N, S, S)`` grey slices, or for ``channels == 3`` also ``(N, 3, S, S)``
        RGB slices; values in [0, 1].
    size
        ``S``.
    channels
        1 (grey) or 3 (RGB): what the model takes.

    Returns
    -------
    numpy.ndarray
        ``(N, S, S)`` for ``channels == 1``; ``(N, 3, S, S)`` for ``channels == 3``
        (grey slices replicated into the three channels).

    Raises
    ------
    ValueError
        Wrong shape or dtype, or NaN or infinite values.
    """
    arr = np.asarray(batch)
    grey = arr.ndim == 3 and arr.shape[1:] == (size, size)
    colour = channels == 3 and arr.ndim == 4 and arr.shape[1:] == (3, size, size)
    if not (grey or colour):
        wanted = f"(N, {size}, {size})" + (f" or (N, 3, {size}, {size})" if channels == 3 else "")
        raise ValueError(f"expected a batch of shape {wanted}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected floating point pixels in [0, 1], got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not out.flags.writeable:  # torch.from_numpy warns on read-only arrays
        out = out.copy()
    if not np.isfinite(out).all():
        raise ValueError("batch holds NaN or infinite values")
    if channels == 3 and grey:
        out = np.ascontiguousarray(np.repeat(out[:, None], 3, axis=1))
    return out


def unit_rows(out: Any, n: int, dim: int, source: str) -> Vectors:
    """A model's ``(n, dim)`` output as float32 rows of unit L2 norm.

    Raises
    ------
    ModelError
        The output is not an ``(n, dim)`` array, or holds NaN, infinite or
        all-zero rows.
    """
    if not isinstance(out, np.ndarray) or out.shape != (n, dim):
        shape = out.shape if isinstance(out, np.ndarray) else type(out).__name__
        raise ModelError(source, f"output is {shape}, expected ({n}, {dim})")
    vec = out.astype(np.float32, copy=False)
    norms = np.linalg.norm(vec, axis=1, keepdims=True)
    if not np.isfinite(norms).all() or bool((norms == 0).any()):
        raise ModelError(source, "output holds NaN, infinite or all-zero vectors")
    result: Vectors = (vec / norms).astype(np.float32, copy=False)
    return result
