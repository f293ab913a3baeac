"""The float16 vector codec: how the database stores every vector (little-endian ``<f2``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import numpy as np
import numpy.typing as npt

from sidecar.errors import SidecarError

_BLOB_DTYPE: Final = np.dtype("<f2")

FloatArray = npt.NDArray[np.float32]


class VectorIndexError(SidecarError):
    """Base of the errors raised by the vector index (and its codec)."""


class IndexInputError(VectorIndexError, ValueError):
    """Labels, vectors or a parameter given to the index are invalid."""


def to_blob(vec: npt.ArrayLike) -> bytes:
    """Pack one vector as little-endian float16 bytes for the database.

    Parameters
    ----------
    vec
        One vector, shape ``(dim,)``, finite; L2-normalised vectors fit float16
        comfortably (relative error about 5e-4).

    Raises
    ------
    IndexInputError
        Not one-dimensional, or not finite in float16.
    """
    arr = np.asarray(vec)
    if arr.ndim != 1 or arr.size == 0:
        raise IndexInputError(f"to_blob expects one non-empty vector, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise IndexInputError(f"to_blob expects floating-point values, got {arr.dtype}")
    with np.errstate(over="ignore"):
        packed = arr.astype(_BLOB_DTYPE)
    if not np.isfinite(packed).all():
        raise IndexInputError("to_blob: vector has values that are not finite in float16")
    return packed.tobytes()


def from_blob(blob: bytes, dim: int) -> FloatArray:
    """Unpack :func:`to_blob` bytes into a float32 vector of shape ``(dim,)``.

    Raises
    ------
    IndexInputError
        The byte count is not ``2 * dim``.
    """
    if len(blob) != 2 * dim:
        raise IndexInputError(f"vector blob has {len(blob)} bytes, expected {2 * dim}")
    return np.frombuffer(blob, dtype=_BLOB_DTYPE).astype(np.float32)


def from_blobs(blobs: Iterable[bytes], dim: int) -> FloatArray:
    """Unpack many blobs into a float32 array of shape ``(n, dim)`` (for rebuilds).

    Raises
    ------
    IndexInputError
        A blob does not hold ``dim`` float16 values.
    """
    parts = list(blobs)
    for blob in parts:
        if len(blob) != 2 * dim:
            raise IndexInputError(f"vector blob has {len(blob)} bytes, expected {2 * dim}")
    flat = np.frombuffer(b"".join(parts), dtype=_BLOB_DTYPE)
    return flat.reshape(len(parts), dim).astype(np.float32)
