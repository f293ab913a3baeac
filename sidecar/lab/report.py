"""The results of ``sidecar evaluate``: one path's metrics, the whole report, its table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sidecar.lab.metrics import METRIC_LABELS, METRICS, bootstrap_cis
from sidecar.lab.neardup import NEAR_DUP_TWIN_RMSE, NearDuplicates, NearHits

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]
IntP = NDArray[np.intp]


@dataclass
class PathResult:
    """The metrics of one path (or baseline) on a set of queries.

    Attributes
    ----------
    name
        ``a`` (model alone), ``b`` (pipeline) or ``raw_pixel``.
    query_indices
        Indices of the queries used in the query split.
    metrics
        Metric → mean in percent (``near_dup@1`` included when measured).
    ci95
        Metric → bootstrap 95 % interval in percent.
    near_dup
        Near-duplicate kind → rate in percent, and ``n`` copies.
    ranking
        ``(Q, K)`` gallery indices best first (not serialised).
    scores
        ``(Q, K)`` scores of ``ranking`` (not serialised).
    per_query
        Metric → per-query values (fractions; not serialised).
    seconds
        Stage → seconds.
    extra
        Anything else worth reporting (serialised as is).
    """

    name: str
    query_indices: IntP
    metrics: dict[str, float] = field(default_factory=dict)
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    near_dup: dict[str, float] = field(default_factory=dict)
    ranking: IntP = field(default_factory=lambda: np.zeros((0, 0), dtype=np.intp), repr=False)
    scores: F64 = field(default_factory=lambda: np.zeros((0, 0)), repr=False)
    per_query: dict[str, F64] = field(default_factory=dict, repr=False)
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        out: dict[str, Any] = {"queries": int(self.query_indices.shape[0])}
        out.update(self.metrics)
        out["ci95"] = {k: list(v) for k, v in self.ci95.items()}
        if self.near_dup:
            out["near_dup"] = {k: int(v) if k == "n" else v for k, v in self.near_dup.items()}
        out["seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
        out.update(self.extra)
        return out


def summarise(
    result: PathResult,
    per_query: dict[str, F64],
    near_hits: NearHits | None,
    near: NearDuplicates | None,
    n_boot: int,
    seed: int,
    labels: NDArray[Any] | None = None,
) -> None:
    """Fill ``result`` in: means and intervals, P@1 per query label, near-duplicate rates."""
    result.per_query = per_query
    result.metrics = {m: round(float(v.mean()) * 100.0, 2) for m, v in per_query.items()}
    result.ci95 = bootstrap_cis(per_query, n_boot, seed)
    if labels is not None and "p@1" in per_query and labels.shape[0]:
        result.extra["p@1_by_label"] = {
            str(label): round(float(per_query["p@1"][labels == label].mean()) * 100.0, 2)
            for label in np.unique(labels).tolist()
        }
    if near_hits is not None and near is not None and near_hits.strict.size:
        hits = near_hits.strict
        kinds = near.kinds[: hits.shape[0]]
        result.metrics["near_dup@1"] = round(float(hits.mean()) * 100.0, 2)
        result.ci95.update(bootstrap_cis({"near_dup@1": hits}, n_boot, seed))
        result.near_dup = {"n": float(hits.shape[0])}
        for kind in dict.fromkeys(kinds.tolist()):
            result.near_dup[kind] = round(float(hits[kinds == kind].mean()) * 100.0, 2)
        result.extra["near_dup_twins@1"] = round(float(near_hits.twins.mean()) * 100.0, 2)
        result.extra["near_dup_twins_by_kind"] = {
            kind: round(float(near_hits.twins[kinds == kind].mean()) * 100.0, 2)
            for kind in dict.fromkeys(kinds.tolist())
        }
        result.extra["near_dup_twin_originals"] = near_hits.twin_originals


@dataclass
class ModelVectors:
    """Path (a) vectors, kept to compare path (b) with."""

    gallery: F32
    queries: F32
    near: F32


@dataclass
class Report:
    """Everything ``sidecar evaluate`` prints."""

    dataset: str
    split: str
    gallery: int
    queries: int
    model_id: str
    seed: int
    bootstrap: int
    majority: float
    raw_pixel: PathResult
    path_a: PathResult | None = None
    path_b: PathResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def primary(self) -> PathResult:
        """Path (a) when run, else path (b)."""
        result = self.path_a or self.path_b
        assert result is not None
        return result

    def to_dict(self) -> dict[str, Any]:
        """One JSON-able object: the primary path's metrics at the top level (percent)."""
        primary = self.primary
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "split": self.split,
            "gallery": self.gallery,
            "queries": self.queries,
            "model_id": self.model_id,
            "path": primary.name,
        }
        for m in (*METRICS, "near_dup@1"):
            if m in primary.metrics:
                out[m] = primary.metrics[m]
        for key in ("near_dup_twins@1", "p@1_by_label"):
            if key in primary.extra:
                out[key] = primary.extra[key]
        out["majority"] = round(self.majority * 100.0, 2)
        out["raw_pixel_p@1"] = self.raw_pixel.metrics["p@1"]
        out["ci95"] = {k: list(v) for k, v in primary.ci95.items()}
        out["raw_pixel"] = self.raw_pixel.to_dict()
        if self.path_a is not None:
            out["path_a"] = self.path_a.to_dict()
        if self.path_b is not None:
            out["path_b"] = self.path_b.to_dict()
        out["seed"] = self.seed
        out["bootstrap"] = self.bootstrap
        out["seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
        return out


def _cell(result: PathResult | None, metric: str) -> str:
    if result is None:
        return ""
    if metric not in result.metrics:
        return "n/a"
    value = f"{result.metrics[metric]:5.1f}"
    ci = result.ci95.get(metric)
    return f"{value} [{ci[0]:5.1f}, {ci[1]:5.1f}]" if ci else value


def format_table(report: Report) -> str:
    """The report as a plain-text table (percentages, bootstrap 95 % intervals)."""
    a, b, raw = report.path_a, report.path_b, report.raw_pixel
    lines = [
        f"{report.dataset}: gallery = train ({report.gallery}), queries = {report.split} "
        f"({report.queries}); model {report.model_id}; seed {report.seed}, "
        f"{report.bootstrap} bootstrap resamples",
        "",
    ]
    cols = [("metric (%)", 20)]
    if a is not None:
        cols.append(("path (a) model alone", 24))
    if b is not None:
        cols.append((f"path (b) pipeline, N={b.query_indices.shape[0]}", 28))
    cols.append(("raw pixels", 24))
    lines.append("  ".join(f"{name:<{w}}" for name, w in cols).rstrip())
    lines.append("  ".join("-" * w for _, w in cols))
    for metric in (*METRICS, "near_dup@1"):
        row = [f"{METRIC_LABELS[metric]:<20}"]
        if a is not None:
            row.append(f"{_cell(a, metric):<24}")
        if b is not None:
            row.append(f"{_cell(b, metric):<28}")
        row.append(f"{_cell(raw, metric):<24}")
        lines.append("  ".join(row).rstrip())
    lines.append("")
    lines.append(f"majority-class rate: {report.majority * 100:.1f} %   "
                 f"raw-pixel P@1: {raw.metrics['p@1']:.1f} % (flattened pixels, not centred)")
    for result in (a, b, raw):
        if result is not None and "p@1_by_label" in result.extra:
            by = ", ".join(f"label {k} {v:.1f}" for k, v in result.extra["p@1_by_label"].items())
            lines.append(f"P@1 by query label, {result.name}: {by}")
    for result in (a, b, raw):
        if result is not None and result.near_dup:
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in result.near_dup.items() if k != "n")
            lines.append(f"near duplicates @1, {result.name} (n={int(result.near_dup['n'])}): "
                         f"{kinds}; counting gallery twins "
                         f"{result.extra['near_dup_twins@1']:.1f} "
                         f"({result.extra['near_dup_twin_originals']} originals have a twin "
                         f"within {NEAR_DUP_TWIN_RMSE:g} grey levels RMSE)")
    if b is not None:
        lines.append(f"path (b): top-K {b.extra['top_k']}, {b.extra['short_answers']} short "
                     f"answers; {b.extra.get('note', 'mAP over the full ranking')}")
        cmp = b.extra.get("vs_path_a")
        if cmp:
            order_key = next(k for k in cmp if k.endswith("_order_same_percent"))
            lines.append(
                f"path (b) vs (a) on the same {cmp['queries']} queries: max |b - a| "
                f"{cmp['max_abs_difference_points']:.2f} points (goal <= 1), top-1 same "
                f"{cmp['top1_same_percent']:.1f} %, {order_key.split('_')[0]} order same "
                f"{cmp[order_key]:.1f} %, max |score b - a| {cmp['max_abs_score_difference']:.2g}"
            )
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    lines.append(f"timings: {secs}")
    if a is not None:
        lines.append(f"  path (a): {a.extra['ms_per_image']:.2f} ms per image "
                     "(DICOM round trip, pre-processing, CNN)")
    if b is not None:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in b.seconds.items())
        lines.append(f"  path (b): {parts} (s; ms_per_query in ms)")
    return "\n".join(lines)
