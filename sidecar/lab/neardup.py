"""Near-duplicate copies of gallery images (noise, shift, JPEG-LS, JPEG q75) and their hits.

Why these four kinds, and why gallery twins are counted apart: docs/design/lab.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSNearLossless

from sidecar.training.npz import image_dataset, round_trip

U8 = NDArray[np.uint8]
F64 = NDArray[np.float64]
IntP = NDArray[np.intp]

NEAR_DUP_KINDS: Final = ("noise", "shift", "jpeg_ls", "jpeg_q75")
NEAR_DUP_SAMPLE: Final = 200
"""Gallery images perturbed per kind (seeded sample; all when the gallery is smaller)."""
NOISE_SIGMA: Final = 3.0
JPEG_QUALITY: Final = 75


_IJG_LUMA: Final = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=np.float64)


def _dct_matrix(n: int = 8) -> F64:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    out: F64 = m
    return out


def jpeg_quantise(image: U8, quality: int = JPEG_QUALITY) -> U8:
    """Baseline JPEG's loss simulated: 8x8 DCT, IJG luminance quantisation at ``quality``.

    The image is padded to whole blocks by edge replication, level-shifted
    by 128, transformed, quantised and restored, rounded and clipped; the
    padding is cut off again. Colour images are quantised per channel with the
    luminance table (no chroma subsampling).
    """
    if image.ndim == 3:
        return np.stack([jpeg_quantise(image[..., c], quality) for c in range(image.shape[2])],
                        axis=-1)
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    table = np.clip(np.floor((_IJG_LUMA * scale + 50.0) / 100.0), 1, 255)
    h, w = image.shape
    ph, pw = -h % 8, -w % 8
    arr = np.pad(image.astype(np.float64), ((0, ph), (0, pw)), mode="edge") - 128.0
    d = _dct_matrix()
    blocks = arr.reshape(arr.shape[0] // 8, 8, arr.shape[1] // 8, 8).transpose(0, 2, 1, 3)
    coef = d @ blocks @ d.T
    coef = np.round(coef / table) * table
    back = (d.T @ coef @ d).transpose(0, 2, 1, 3).reshape(arr.shape) + 128.0
    out: U8 = np.clip(np.round(back[:h, :w]), 0, 255).astype(np.uint8)
    return out


def perturb(image: U8, kind: str, rng: np.random.Generator) -> U8:
    """A near-duplicate of ``image`` (pixels; ``jpeg_ls`` is lossy only once encoded).

    ``noise``: Gaussian noise of sigma :data:`NOISE_SIGMA` grey levels,
    rounded and clipped. ``shift``: moved by ``(dy, dx)`` in ``{-2..2}``,
    not both 0, edges replicated. ``jpeg_q75``: :func:`jpeg_quantise`.
    ``jpeg_ls``: the pixels unchanged (:func:`image_dataset` encodes them
    lossily with JPEG-LS near-lossless).
    """
    if kind == "noise":
        noisy = image.astype(np.float64) + rng.normal(0.0, NOISE_SIGMA, size=image.shape)
        out: U8 = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
        return out
    if kind == "shift":
        while True:
            dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
            if dy or dx:
                break
        pad = [(2, 2), (2, 2)] + [(0, 0)] * (image.ndim - 2)
        big = np.pad(image, pad, mode="edge")
        h, w = image.shape[:2]
        shifted: U8 = big[2 - dy:2 - dy + h, 2 - dx:2 - dx + w].copy()
        return shifted
    if kind == "jpeg_q75":
        return jpeg_quantise(image, JPEG_QUALITY)
    if kind == "jpeg_ls":
        return image.copy()
    raise ValueError(f"unknown near-duplicate kind {kind!r} (known: {', '.join(NEAR_DUP_KINDS)})")


NEAR_DUP_TWIN_RMSE: Final = 4.0
"""Largest pixel RMSE (grey levels) between two gallery images that are counted as
the same picture by ``near_dup_twins@1``: the noise copies' own sigma."""


@dataclass(frozen=True)
class NearDuplicates:
    """Perturbed copies of gallery images.

    Attributes
    ----------
    originals
        ``(M,)`` gallery index of each copy's original.
    kinds
        ``(M,)`` perturbation kind of each copy.
    datasets
        The copies as DICOM (``jpeg_ls`` ones JPEG-LS near-lossless encoded).
    pixels
        ``(M, H, W[, 3])`` the copies' pixels as a viewer decodes them.
    has_twin
        ``(M,)`` whether the copy's original has a twin in the gallery
        (:func:`gallery_twins`).
    """

    originals: IntP
    kinds: NDArray[np.str_]
    datasets: list[Dataset]
    pixels: U8
    has_twin: NDArray[np.bool_]

    def subset(self, idx: IntP, datasets: list[Dataset]) -> NearDuplicates:
        """The copies ``idx`` (``datasets``: theirs, as they were sent)."""
        return NearDuplicates(self.originals[idx], self.kinds[idx], datasets, self.pixels[idx],
                              self.has_twin[idx])


def gallery_twins(gallery: U8, originals: NDArray[Any]) -> NDArray[np.bool_]:
    """Per original: another gallery image lies within :data:`NEAR_DUP_TWIN_RMSE` of it."""
    flat = gallery.reshape(gallery.shape[0], -1).astype(np.float64)
    found: dict[int, bool] = {}
    for i in np.unique(originals).tolist():
        d = np.sqrt(np.mean((flat - flat[i]) ** 2, axis=1))
        d[i] = np.inf
        found[i] = bool(d.min(initial=np.inf) <= NEAR_DUP_TWIN_RMSE)
    return np.array([found[i] for i in np.asarray(originals).tolist()], dtype=bool)


def make_near_duplicates(
    gallery: U8, *, n: int = NEAR_DUP_SAMPLE, seed: int = 0,
    kinds: Sequence[str] = NEAR_DUP_KINDS, key: str = "",
) -> NearDuplicates:
    """Perturb a seeded sample of ``min(n, G)`` gallery images in every way of ``kinds``."""
    rng = np.random.default_rng([seed, 0x4E44])
    sample = np.sort(rng.choice(gallery.shape[0], size=min(n, gallery.shape[0]), replace=False))
    originals: list[int] = []
    kind_list: list[str] = []
    datasets: list[Dataset] = []
    pixels: list[U8] = []
    for kind in kinds:
        for i in sample.tolist():
            img = perturb(gallery[i], kind, rng)
            ts = JPEGLSNearLossless if kind == "jpeg_ls" else ExplicitVRLittleEndian
            ds = image_dataset(img, key=f"{key}/near/{kind}/{i}",
                               patient_id=f"EVAL-N{len(datasets):06d}", transfer_syntax=ts)
            if kind == "jpeg_ls":
                img = np.asarray(round_trip(ds).pixel_array, dtype=np.uint8)
            originals.append(i)
            kind_list.append(kind)
            datasets.append(ds)
            pixels.append(img)
    shape = (0, *gallery.shape[1:])
    return NearDuplicates(
        has_twin=gallery_twins(gallery, np.asarray(originals, dtype=np.intp)),
        originals=np.asarray(originals, dtype=np.intp),
        kinds=np.asarray(kind_list, dtype=np.str_),
        datasets=datasets,
        pixels=np.stack(pixels) if pixels else np.zeros(shape, dtype=np.uint8),
    )


def pixel_rmse(a: NDArray[Any], b: NDArray[Any]) -> float:
    """Root mean square difference of two images' pixels, in grey levels."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt(np.mean(diff * diff)))


@dataclass(frozen=True)
class NearHits:
    """Per copy (fractions 0/1): found at rank 1, strictly and counting gallery twins."""

    strict: F64
    """Rank 1 is the original or pixel-identical to it."""
    twins: F64
    """Rank 1 is within :data:`NEAR_DUP_TWIN_RMSE` grey levels RMSE of the original."""
    twin_originals: int
    """Distinct originals with another gallery image within that distance
    (:attr:`NearDuplicates.has_twin`)."""


def near_duplicate_hits(top1: NDArray[Any], near: NearDuplicates, gallery: U8) -> NearHits:
    """Per copy: whether the rank-1 gallery image is its original (see :class:`NearHits`)."""
    top = np.asarray(top1)
    originals = near.originals[: top.shape[0]]
    strict = top == originals
    twins = strict.copy()
    for j in np.flatnonzero(~strict & (top >= 0)):
        rmse = pixel_rmse(gallery[top[j]], gallery[originals[j]])
        strict[j] = rmse == 0.0
        twins[j] = rmse <= NEAR_DUP_TWIN_RMSE
    with_twin = len(np.unique(originals[near.has_twin[: top.shape[0]]]))
    return NearHits(strict.astype(np.float64), twins.astype(np.float64), with_twin)
