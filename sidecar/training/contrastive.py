"""The contrastive objective: NT-Xent, the projection head, positive partners, negatives.

:func:`pick_partners` chooses the image of each second view (itself, a
neighbouring slice of its series, a slice of another series of its study);
:func:`negative_exclusions` masks the pairs of a batch that are no negatives;
:func:`nt_xent` is the loss (Chen et al. 2020) over the projected views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn


class PartnerSettings(Protocol):
    """The positive-pair fields of a recipe (see :class:`~sidecar.training.selfsup.TrainRecipe`)."""

    neighbour_prob: float
    neighbour_span: int
    study_prob: float


class Projector(nn.Sequential):
    """Linear, BatchNorm, ReLU, Linear: the projection MLP used only for the loss."""

    def __init__(self, cin: int, hidden: int, out: int) -> None:
        super().__init__(
            nn.Linear(cin, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )


def nt_xent(
    z: torch.Tensor, temperature: float, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """NT-Xent loss over ``z`` ``(2B, D)``, rows ``2i`` and ``2i + 1`` being positives.

    ``exclude``: ``(2B, 2B)`` True where a pair is neither positive nor
    negative (e.g. two slices of one series); the diagonal is always left out.
    """
    n = z.shape[0]
    z = F.normalize(z, dim=1)
    sim = z @ z.T / temperature
    mask = torch.eye(n, dtype=torch.bool)
    if exclude is not None:
        mask = mask | exclude
    pos = torch.arange(n) ^ 1
    mask[torch.arange(n), pos] = False
    sim = sim.masked_fill(mask, float("-inf"))
    return F.cross_entropy(sim, pos)


def series_neighbours(groups: npt.NDArray[np.int64]) -> list[npt.NDArray[np.intp]]:
    """Per image, the indices of the images of its group (slice order), or an empty array."""
    out: list[npt.NDArray[np.intp]] = [np.zeros(0, dtype=np.intp)] * groups.shape[0]
    for g in np.unique(groups[groups >= 0]):
        members = np.flatnonzero(groups == g)
        for i in members:
            out[int(i)] = members
    return out


def study_others(
    groups: npt.NDArray[np.int64], studies: npt.NDArray[np.int64]
) -> list[npt.NDArray[np.intp]]:
    """Per image, the images of the other series of its study (empty when there are none).

    An image without a series (group ``-1``) counts as a series of its own.
    """
    out: list[npt.NDArray[np.intp]] = [np.zeros(0, dtype=np.intp)] * studies.shape[0]
    for st in np.unique(studies[studies >= 0]):
        members = np.flatnonzero(studies == st)
        if members.size < 2:
            continue
        for i in members.tolist():
            g = groups[i]
            same = members == i if g < 0 else groups[members] == g
            out[i] = members[~same]
    return out


def pick_partners(
    idx: npt.NDArray[np.intp],
    series: Sequence[npt.NDArray[np.intp]],
    study_others: Sequence[npt.NDArray[np.intp]],
    recipe: PartnerSettings,
    rng: np.random.Generator,
) -> npt.NDArray[np.intp]:
    """The image of each second view: itself, a slice of another series of its
    study (probability ``recipe.study_prob``) or a neighbouring slice of its
    series (probability ``recipe.neighbour_prob``).

    ``rng`` is drawn from only for images that have such a partner, so data
    without studies trains exactly as before studies existed.
    """
    other = idx.copy()
    for j, i in enumerate(idx.tolist()):
        others = study_others[i]
        if recipe.study_prob > 0 and others.size and rng.random() < recipe.study_prob:
            other[j] = others[int(rng.integers(others.size))]
            continue
        group = series[i]
        if group.size > 1 and rng.random() < recipe.neighbour_prob:
            pos = int(np.searchsorted(group, i))
            lo = max(0, pos - recipe.neighbour_span)
            hi = min(group.size - 1, pos + recipe.neighbour_span)
            other[j] = group[int(rng.integers(lo, hi + 1))]
    return other


def negative_exclusions(
    idx: npt.NDArray[np.intp],
    groups: npt.NDArray[np.int64],
    studies: npt.NDArray[np.int64] | None,
    *,
    repeated: bool,
) -> torch.Tensor | None:
    """``(2B, 2B)`` mask of the pairs of a batch of view pairs that are no negatives.

    Views of one series; with ``studies`` (``study_prob > 0``), views of one
    study; with ``repeated`` (images drawn with replacement), views of the same
    image. ``None`` when nothing is excluded.
    """
    exclude: torch.Tensor | None = None
    for labels in (groups, studies):
        if labels is None:
            continue
        lab = np.repeat(labels[idx], 2)
        if (lab >= 0).any():
            t = torch.from_numpy(lab)
            mask = (t[:, None] == t[None, :]) & (t[:, None] >= 0)
            exclude = mask if exclude is None else exclude | mask
    if repeated:
        it = torch.from_numpy(np.repeat(idx, 2))
        same = it[:, None] == it[None, :]
        exclude = same if exclude is None else exclude | same
    return exclude
