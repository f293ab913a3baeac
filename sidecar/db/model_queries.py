"""Catalogue queries of on-site adaptation and ``sidecar model restore``.

Read-only: every function opens a connection, reads and closes it.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import Engine, func, select

from sidecar.db.models import INSTANCE, SERIES, SERIES_VECTOR, SLICE_VECTOR, STUDY, InstanceState


class SeriesSlices(NamedTuple):
    """How many slices of one series a model embedded, and the series' study."""

    series_pk: int
    slices: int
    study_pk: int


class EmbeddedSlice(NamedTuple):
    """One slice a model embedded: its instance, frame and file (relative to storage)."""

    instance_pk: int
    frame: int
    file_path: str


def embedded_series(engine: Engine, model_id: str) -> list[SeriesSlices]:
    """Series of stable studies with slice vectors of ``model_id``, by series key."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(SLICE_VECTOR.c.series_pk, func.count(), func.min(SLICE_VECTOR.c.study_pk))
            .join(STUDY, STUDY.c.id == SLICE_VECTOR.c.study_pk)
            .where(SLICE_VECTOR.c.model_id == model_id, STUDY.c.stable.is_(True),
                   SLICE_VECTOR.c.frame >= 0)
            .group_by(SLICE_VECTOR.c.series_pk)
            .order_by(SLICE_VECTOR.c.series_pk)
        ).all()
    return [SeriesSlices(int(pk), int(n), int(study)) for pk, n, study in rows]


def embedded_slices(engine: Engine, series_pk: int, model_id: str) -> list[EmbeddedSlice]:
    """The slices of one series that ``model_id`` embedded, by instance and frame."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(SLICE_VECTOR.c.instance_pk, SLICE_VECTOR.c.frame, INSTANCE.c.file_path)
            .join(INSTANCE, INSTANCE.c.id == SLICE_VECTOR.c.instance_pk)
            .where(SLICE_VECTOR.c.series_pk == series_pk,
                   SLICE_VECTOR.c.model_id == model_id,
                   SLICE_VECTOR.c.frame >= 0,
                   INSTANCE.c.state == InstanceState.EMBEDDED,
                   INSTANCE.c.released_at.is_(None))  # storage.keep_files: no pixels left
            .order_by(SLICE_VECTOR.c.instance_pk, SLICE_VECTOR.c.frame)
        ).all()
    return [EmbeddedSlice(int(pk), int(frame), str(path)) for pk, frame, path in rows]


def missing_series(engine: Engine, model_id: str) -> int:
    """Series with embedded instances in stable studies that have no vectors of ``model_id``."""
    have = select(SERIES_VECTOR.c.series_pk).where(SERIES_VECTOR.c.model_id == model_id)
    with engine.connect() as conn:
        n = conn.execute(
            select(func.count(func.distinct(INSTANCE.c.series_pk)))
            .join(SERIES, SERIES.c.id == INSTANCE.c.series_pk)
            .join(STUDY, STUDY.c.id == SERIES.c.study_pk)
            .where(STUDY.c.stable.is_(True), INSTANCE.c.state == InstanceState.EMBEDDED,
                   INSTANCE.c.series_pk.not_in(have))
        ).scalar()
    return int(n or 0)
