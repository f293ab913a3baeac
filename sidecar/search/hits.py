"""Ranked candidates as hits: catalogue rows, rank order with ties, the best slice pair."""

from __future__ import annotations

from dataclasses import replace

from sidecar.db.search_queries import CatalogueRow, SearchQueries
from sidecar.search.caches import Ranked
from sidecar.search.types import Hit, SliceMatch


def describe(
    queries: SearchQueries, ranked: list[Ranked], level: str, k: int
) -> list[tuple[Hit, Ranked]]:
    """The first ``k`` candidates as hits, ties with the k-th ordered by UID."""
    everything = sorted(ranked, key=lambda item: -item.score)
    ranked = everything
    if len(ranked) > k:  # keep ties with the k-th: they are ordered by UID below
        last = round(ranked[k - 1].score, 6)
        ranked = [item for i, item in enumerate(ranked)
                  if i < k or round(item.score, 6) == last]
    rows = queries.describe([item.keys for item in ranked])
    if len(ranked) < len(everything) and any(item.keys not in rows for item in ranked):
        # a hit deleted meanwhile (the slice view lags the database by up to
        # refresh_interval): describe the others too, so that k hits remain
        rows.update(queries.describe([item.keys for item in everything[len(ranked):]]))
        ranked = everything
    described: list[tuple[Ranked, CatalogueRow]] = [
        (item, rows[item.keys]) for item in ranked if item.keys in rows
    ]

    def uid(row: CatalogueRow) -> str:
        if level == "study":
            return row.study_instance_uid
        if level == "series":
            return row.series_instance_uid
        return row.sop_instance_uid

    described.sort(key=lambda item: (-round(item[0].score, 6), uid(item[1])))
    return [(Hit.of(rank, round(float(item.score), 6), row, calibrated_score=item.calibrated,
                    ranked_by=item.ranked_by), item)
            for rank, (item, row) in enumerate(described[:k], start=1)]

def with_matches(
    queries: SearchQueries, described: list[tuple[Hit, Ranked]], query_labels: list[int]
) -> list[Hit]:
    """The hits with their best (query slice, hit slice) pair (:class:`SliceMatch`)."""
    labels = {item.label for _, item in described if item.label}
    labels.update(query_labels[item.query_slice] for _, item in described
                  if 0 <= item.query_slice < len(query_labels))
    places = queries.slice_places(labels) if labels else {}
    hits: list[Hit] = []
    for hit, item in described:
        place = places.get(item.label)
        if place is None or item.query_slice < 0:
            hits.append(hit)
            continue
        asked = (places.get(query_labels[item.query_slice])
                 if item.query_slice < len(query_labels) else None)
        hits.append(replace(hit, match=SliceMatch(
            cosine=round(float(item.cosine), 6), query_slice=item.query_slice,
            hit_sop_instance_uid=place[0], hit_frame=place[1],
            query_sop_instance_uid=asked[0] if asked else "",
            query_frame=asked[1] if asked else None,
        )))
    return hits
