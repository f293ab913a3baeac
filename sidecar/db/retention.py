"""Released files (``storage.keep_files``): which to release, which wait for their pixels.

An instance's file may be released when its study is stable, the instance is
embedded (or skipped: not an image), no instance of its series still waits for
the slice worker, its series' volume row is written when volumes are on, and it
was received before the cutoff. The row keeps ``file_path`` (where a fetched-back
copy goes), its vectors and its thumbnails; ``released_at`` says the file is gone.

A series *waits for its pixels* when work needs them and some of its files are
released: instances pending or due for a retry (``reindex --reembed``), or a
model change that re-embeds it. The embedding worker leaves such series alone
(:func:`without_released`) until the fetch-back restores them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Engine, and_, exists, func, or_, select, update

from sidecar.db.engine import write_transaction
from sidecar.db.models import INSTANCE as _INSTANCE
from sidecar.db.models import PATIENT as _PATIENT
from sidecar.db.models import SERIES as _SERIES
from sidecar.db.models import SERIES_VECTOR as _SERIES_VEC
from sidecar.db.models import SLICE_VECTOR as _SLICE
from sidecar.db.models import STUDY as _STUDY
from sidecar.db.models import VOLUME_VECTOR as _VOL
from sidecar.db.models import InstanceState
from sidecar.db.repository import utcnow

_CHUNK = 500


@dataclass(frozen=True)
class Releasable:
    """An instance whose file may go, with the frames the page may show (their vectors)."""

    pk: int
    sop_instance_uid: str
    file_path: str
    frames: tuple[int, ...]
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""


@dataclass
class SeriesToFetch:
    """A series whose released files are needed again."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str] = field(default_factory=list)
    sop_class_uids: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class RetentionCounts:
    """Released files, and the series and instances waiting for their pixels."""

    released: int = 0
    released_bytes: int = 0
    waiting_series: int = 0
    waiting_instances: int = 0


def without_released(series_pk: ColumnElement[int]) -> ColumnElement[bool]:
    """A condition for work queries: the series has no released file (see the module)."""
    gone = _INSTANCE.alias("released")
    return ~exists().where(gone.c.series_pk == series_pk, gone.c.released_at.is_not(None))


def _series_has_vectors(model_id: str) -> ColumnElement[bool]:
    """The instance's series has its mean vector under ``model_id`` (it was embedded)."""
    return exists().where(_SERIES_VEC.c.series_pk == _INSTANCE.c.series_pk,
                          _SERIES_VEC.c.model_id == model_id)


def _needs_pixels(model_id: str, max_attempts: int) -> ColumnElement[bool]:
    """A released instance whose pixels some work needs (pending, retry, re-embedding)."""
    has_model = _series_has_vectors(model_id)
    return and_(
        _INSTANCE.c.released_at.is_not(None),
        or_(
            _INSTANCE.c.state == InstanceState.PENDING,
            and_(_INSTANCE.c.state == InstanceState.FAILED,
                 _INSTANCE.c.attempts < max_attempts),
            and_(_INSTANCE.c.state == InstanceState.EMBEDDED, ~has_model),
        ),
    )


class RetentionRepository:
    """Catalogue reads and writes of the release and fetch-back jobs."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def due(self, model_id: str, *, received_before: dt.datetime, volumes: bool,
            limit: int) -> list[Releasable]:
        """Instances whose files may be released now, oldest first (see the module).

        ``model_id`` is the model the worker writes: an embedded series without
        its vectors (a model change re-embedding) keeps its files until it has them.
        """
        inst = _INSTANCE.alias("sibling")
        pending_sibling = exists().where(inst.c.series_pk == _INSTANCE.c.series_pk,
                                         inst.c.state == InstanceState.PENDING)
        has_model = _series_has_vectors(model_id)
        conds: list[ColumnElement[bool]] = [
            _INSTANCE.c.released_at.is_(None),
            or_(_INSTANCE.c.state == InstanceState.SKIPPED,
                and_(_INSTANCE.c.state == InstanceState.EMBEDDED, has_model)),
            _INSTANCE.c.received_at <= received_before,
            _STUDY.c.stable.is_(True),
            ~pending_sibling,
        ]
        if volumes:
            newest = (select(func.max(inst.c.received_at))
                      .where(inst.c.series_pk == _INSTANCE.c.series_pk).scalar_subquery())
            conds.append(or_(
                _INSTANCE.c.state == InstanceState.SKIPPED,
                exists().where(_VOL.c.series_pk == _INSTANCE.c.series_pk,
                               _VOL.c.model_id == model_id, _VOL.c.created_at >= newest),
            ))
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_INSTANCE.c.id, _INSTANCE.c.sop_instance_uid, _INSTANCE.c.file_path,
                       _INSTANCE.c.sop_class_uid, _STUDY.c.study_instance_uid,
                       _PATIENT.c.patient_id, _PATIENT.c.issuer_of_patient_id)
                .join(_SERIES, _SERIES.c.id == _INSTANCE.c.series_pk)
                .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
                .join(_PATIENT, _PATIENT.c.id == _STUDY.c.patient_pk)
                .where(*conds).order_by(_INSTANCE.c.received_at, _INSTANCE.c.id).limit(limit)
            ).all()
            frames: dict[int, set[int]] = {int(r[0]): set() for r in rows}
            pks = sorted(frames)
            for i in range(0, len(pks), _CHUNK):
                for pk, frame in conn.execute(
                    select(_SLICE.c.instance_pk, _SLICE.c.frame)
                    .where(_SLICE.c.instance_pk.in_(pks[i:i + _CHUNK])).distinct()
                ):
                    frames[int(pk)].add(int(frame))
        return [Releasable(int(r[0]), str(r[1]), str(r[2]), tuple(sorted(frames[int(r[0])])),
                           str(r[3]), str(r[4]), str(r[5] or ""), str(r[6] or ""))
                for r in rows]

    def mark_released(self, items: Sequence[Releasable], now: dt.datetime | None = None
                      ) -> list[Releasable]:
        """Record that these files are (about to be) gone; returns the items marked.

        An item whose row changed since :meth:`due` (another file now, or pending
        again) is left alone.
        """
        now = now or utcnow()
        marked: list[Releasable] = []
        with write_transaction(self._engine) as conn:
            for item in items:
                changed = conn.execute(
                    update(_INSTANCE).where(
                        _INSTANCE.c.id == item.pk, _INSTANCE.c.file_path == item.file_path,
                        _INSTANCE.c.released_at.is_(None),
                        _INSTANCE.c.state.in_([InstanceState.EMBEDDED, InstanceState.SKIPPED]))
                    .values(released_at=now)).rowcount
                if changed:
                    marked.append(item)
        return marked

    def released_files(self, batch: int = 2000) -> Iterator[tuple[str, dt.datetime]]:
        """``(catalogue path, released at)`` of every released instance (streamed)."""
        with self._engine.connect() as conn:
            rows = conn.execution_options(yield_per=batch).execute(
                select(_INSTANCE.c.file_path, _INSTANCE.c.released_at)
                .where(_INSTANCE.c.released_at.is_not(None)).order_by(_INSTANCE.c.id))
            for path, when in rows:
                yield str(path), when

    def to_fetch(self, model_id: str, *, max_attempts: int, max_series: int
                 ) -> list[SeriesToFetch]:
        """Series waiting for their pixels, oldest first, with their released instances."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_STUDY.c.study_instance_uid, _SERIES.c.series_instance_uid,
                       _INSTANCE.c.sop_instance_uid, _SERIES.c.id, _INSTANCE.c.sop_class_uid)
                .join(_SERIES, _SERIES.c.id == _INSTANCE.c.series_pk)
                .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
                .where(_INSTANCE.c.series_pk.in_(
                    select(_INSTANCE.c.series_pk).where(_needs_pixels(model_id, max_attempts))
                    .group_by(_INSTANCE.c.series_pk)
                    .order_by(func.min(_INSTANCE.c.received_at)).limit(max_series)),
                    _INSTANCE.c.released_at.is_not(None))
                .order_by(_SERIES.c.id, _INSTANCE.c.id)
            ).all()
        out: dict[int, SeriesToFetch] = {}
        for study, series, sop, series_pk, sop_class in rows:
            item = out.setdefault(int(series_pk), SeriesToFetch(str(study), str(series)))
            item.sop_instance_uids.append(str(sop))
            item.sop_class_uids.add(str(sop_class))
        return list(out.values())

    def restored_count(self, sops: Sequence[str]) -> int:
        """How many of these instances have their file again (not released)."""
        n = 0
        with self._engine.connect() as conn:
            for i in range(0, len(sops), _CHUNK):
                n += int(conn.execute(
                    select(func.count()).where(
                        _INSTANCE.c.sop_instance_uid.in_(list(sops[i:i + _CHUNK])),
                        _INSTANCE.c.released_at.is_(None))).scalar() or 0)
        return n

    def counts(self, model_id: str, *, max_attempts: int) -> RetentionCounts:
        """What ``sidecar status`` shows of released files."""
        with self._engine.connect() as conn:
            released, size = conn.execute(
                select(func.count(), func.coalesce(func.sum(_INSTANCE.c.file_size), 0))
                .where(_INSTANCE.c.released_at.is_not(None))).one()
            series, instances = conn.execute(
                select(func.count(func.distinct(_INSTANCE.c.series_pk)), func.count())
                .where(_needs_pixels(model_id, max_attempts))).one()
        return RetentionCounts(int(released), int(size), int(series), int(instances))


__all__ = ["Releasable", "RetentionCounts", "RetentionRepository", "SeriesToFetch",
           "without_released"]
