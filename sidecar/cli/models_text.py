"""``sidecar model list`` as text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry loads torch; the CLI imports it only when a command needs it
    from sidecar.embeddings.registry import ModelInfo


def describe(rows: Sequence[ModelInfo]) -> list[str]:
    """``sidecar model list`` as text lines."""
    lines = [f"{'':2}{'model':<22} {'source':<10} {'vectors':>8}  {'parent':<18} "
             f"{'held-out score':<17} created"]
    for r in rows:
        mark = ("*" if r.active else " ") + (">" if r.selected else " ")
        score = ""
        if "candidate" in r.scores and "parent" in r.scores:
            score = f"{r.scores['candidate']:.4f} ({r.scores['parent']:.4f})"
        source = r.source if r.available or r.source != "adapted" else "adapted!"
        lines.append(f"{mark}{r.model_id:<22} {source:<10} {r.vectors:>8}  "
                     f"{r.parent or '-':<18} {score or '-':<17} {r.created_at or '-'}")
    lines.append("* active (its index serves queries)   > loaded by the next start   "
                 "adapted!: weights file missing")
    return lines
