"""Volume vectors: one per series and model (sidecar.embeddings.volume), with refusals.

A series is due for its volume when its study is stable, none of its image
instances still waits for the slice worker, it holds at least ``min_slices``
frames, and it has no volume row under the model newer than its newest
instance. A row holds either a vector or the reason the series is not a volume;
the row's key is the label in the volume index (never reused).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import Engine, and_, case, delete, func, insert, or_, select

from sidecar.db.engine import write_transaction
from sidecar.db.models import INSTANCE as _INSTANCE
from sidecar.db.models import SERIES as _SERIES
from sidecar.db.models import STUDY as _STUDY
from sidecar.db.models import VOLUME_VECTOR as _VOL
from sidecar.db.models import InstanceState
from sidecar.db.repository import utcnow
from sidecar.db.retention import without_released


@dataclass(frozen=True)
class VolumeSource:
    """An instance of a series to build as a volume."""

    instance_pk: int
    file_path: str
    number_of_frames: int


@dataclass
class VolumeWork:
    """A series due for its volume vector."""

    series_pk: int
    study_pk: int
    instances: list[VolumeSource] = field(default_factory=list)


@dataclass(frozen=True)
class VolumeRow:
    """A stored volume vector (``blob`` is ``None`` for a refused series)."""

    label: int
    series_pk: int
    study_pk: int
    blob: bytes | None


@dataclass(frozen=True)
class VolumeSummary:
    """Volume rows of one model: built, refused, and the commonest reasons."""

    built: int
    refused: int
    reasons: list[tuple[str, int]]


class VolumeRepository:
    """Catalogue access for volume vectors."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def due(self, model_id: str, *, min_slices: int, limit: int) -> list[VolumeWork]:
        """Up to ``limit`` series due for a volume vector under ``model_id``, oldest first."""
        image = _INSTANCE.c.state != InstanceState.SKIPPED
        newest = func.max(_INSTANCE.c.received_at)
        built = (
            select(_VOL.c.series_pk, _VOL.c.created_at)
            .where(_VOL.c.model_id == model_id)
            .subquery()
        )
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_SERIES.c.id, _SERIES.c.study_pk)
                .join(_INSTANCE, _INSTANCE.c.series_pk == _SERIES.c.id)
                .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
                .outerjoin(built, built.c.series_pk == _SERIES.c.id)
                .where(_STUDY.c.stable.is_(True), image, without_released(_SERIES.c.id))
                .group_by(_SERIES.c.id, _SERIES.c.study_pk, built.c.created_at)
                .having(
                    and_(
                        func.sum(_INSTANCE.c.number_of_frames) >= min_slices,
                        func.sum(case((_INSTANCE.c.state == InstanceState.PENDING, 1),
                                      else_=0)) == 0,
                        or_(built.c.created_at.is_(None), built.c.created_at < newest),
                    )
                )
                .order_by(newest)
                .limit(limit)
            ).all()
            work: list[VolumeWork] = []
            for series_pk, study_pk in rows:
                item = VolumeWork(series_pk=int(series_pk), study_pk=int(study_pk))
                for pk, path, frames in conn.execute(
                    select(_INSTANCE.c.id, _INSTANCE.c.file_path, _INSTANCE.c.number_of_frames)
                    .where(_INSTANCE.c.series_pk == series_pk, image)
                    .order_by(_INSTANCE.c.id)
                ):
                    item.instances.append(VolumeSource(int(pk), str(path), int(frames or 1)))
                work.append(item)
        return work

    def commit(self, work: VolumeWork, model_id: str, *, method: str, blob: bytes | None,
               reason: str, slices: int, spacing_mm: float | None) -> int | None:
        """Store the series' volume vector (or its refusal), replacing an older row.

        Returns the new row's key, or ``None`` when the series was deleted meanwhile.
        The replaced row's key is gone from the database; the volume index drops it
        when it next compares its keys with the database.
        """
        with write_transaction(self._engine) as conn:
            alive = conn.execute(
                select(_SERIES.c.id).where(_SERIES.c.id == work.series_pk)
            ).scalar()
            if alive is None:
                return None
            conn.execute(delete(_VOL).where(_VOL.c.series_pk == work.series_pk,
                                            _VOL.c.model_id == model_id))
            result = conn.execute(
                insert(_VOL).values(
                    series_pk=work.series_pk, study_pk=work.study_pk, model_id=model_id,
                    method=method, slices=slices, spacing_mm=spacing_mm, vector=blob,
                    reason=reason[:500], created_at=utcnow(),
                )
            )
            key = result.inserted_primary_key
            return None if key is None else int(key[0])

    def signature(self, model_id: str) -> tuple[int, int]:
        """(rows with a vector, largest key) under ``model_id``: changes with every write."""
        with self._engine.connect() as conn:
            n, top = conn.execute(
                select(func.count(_VOL.c.id), func.max(_VOL.c.id))
                .where(_VOL.c.model_id == model_id, _VOL.c.vector.is_not(None))
            ).one()
        return int(n or 0), int(top or 0)

    def vectors(self, model_id: str, *, after: int = 0) -> list[VolumeRow]:
        """Stored volume vectors of ``model_id`` with a key above ``after``, by key."""
        with self._engine.connect() as conn:
            return [
                VolumeRow(int(r[0]), int(r[1]), int(r[2]), r[3])
                for r in conn.execute(
                    select(_VOL.c.id, _VOL.c.series_pk, _VOL.c.study_pk, _VOL.c.vector)
                    .where(_VOL.c.model_id == model_id, _VOL.c.vector.is_not(None),
                           _VOL.c.id > after)
                    .order_by(_VOL.c.id)
                )
            ]

    def labels(self, model_id: str) -> set[int]:
        """Keys of the stored volume vectors of ``model_id``."""
        with self._engine.connect() as conn:
            return {int(x) for x in conn.execute(
                select(_VOL.c.id).where(_VOL.c.model_id == model_id, _VOL.c.vector.is_not(None))
            ).scalars()}

    def summary(self, model_id: str, top: int = 5) -> VolumeSummary:
        """How many series of ``model_id`` were built as volumes, refused, and why."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_VOL.c.vector.is_(None), _VOL.c.reason).where(_VOL.c.model_id == model_id)
            ).all()
        refused = Counter(_reason_kind(str(reason)) for is_null, reason in rows if is_null)
        built = sum(1 for is_null, _ in rows if not is_null)
        return VolumeSummary(built, sum(refused.values()), refused.most_common(top))


def _reason_kind(reason: str) -> str:
    """A reason without its numbers, so that alike refusals count together."""
    return re.sub(r"\d+(\.\d+)?", "#", reason)
