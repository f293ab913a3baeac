"""Random views of grey-level slices for contrastive training (:func:`augment`).

One bilinear resample (crop, rotation, shift, flip) and intensity changes
(gamma, contrast, brightness, Gaussian blur, Gaussian noise), all drawn from a
seeded generator. The settings are a :class:`~sidecar.training.selfsup.TrainRecipe`'s
(any object with the fields of :class:`AugmentSettings`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F


class AugmentSettings(Protocol):
    """The augmentation fields of a recipe (see :class:`~sidecar.training.selfsup.TrainRecipe`)."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    rotation_deg: float
    shift: float
    hflip: float
    padding: str
    gamma: float
    contrast: float
    brightness: float
    blur_prob: float
    blur_sigma: tuple[float, float]
    noise_std: float


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


def augment(x: torch.Tensor, recipe: AugmentSettings, gen: torch.Generator) -> torch.Tensor:
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
