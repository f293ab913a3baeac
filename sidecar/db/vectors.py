"""Repository functions of the embedding worker and the index.

The database is the source of truth: a vector row's primary key is its label
in the hnswlib index; rows are committed before the index is touched, so a
crash can leave the index behind the database (repaired at start-up from the
stored vectors) but never ahead of it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from sidecar.db.engine import write_transaction
from sidecar.db.models import INSTANCE as _INSTANCE
from sidecar.db.models import SERIES as _SERIES
from sidecar.db.models import SERIES_VECTOR as _SERIES_VEC
from sidecar.db.models import SETTING as _SETTING
from sidecar.db.models import SLICE_VECTOR as _SLICE
from sidecar.db.models import STUDY as _STUDY
from sidecar.db.models import STUDY_VECTOR as _STUDY_VEC
from sidecar.db.models import VOLUME_VECTOR as _VOLUME_VEC
from sidecar.db.models import (
    InstanceState,
)
from sidecar.db.repository import utcnow
from sidecar.db.retention import without_released

ACTIVE_MODEL_KEY = "active_model_id"


@dataclass(frozen=True)
class InstanceRef:
    """An instance of a series to (re)consider for embedding."""

    pk: int
    sop_instance_uid: str
    file_path: str
    state: InstanceState
    attempts: int
    number_of_frames: int


@dataclass
class SeriesWork:
    """One series with work to do: its instances, the due ones marked."""

    series_pk: int
    study_pk: int
    instances: list[InstanceRef] = field(default_factory=list)
    due: set[int] = field(default_factory=set)  # instance pks pending or due for retry


@dataclass(frozen=True)
class NewVector:
    """A slice vector to insert."""

    instance_pk: int
    frame: int
    position_mm: float | None
    blob: bytes


class VectorRepository:
    """Catalogue access for embedding, on the process's engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -------------------------------------------------------------- settings
    def get_setting(self, key: str) -> str | None:
        """A stored setting, or None."""
        with self._engine.connect() as conn:
            value = conn.execute(select(_SETTING.c.value).where(_SETTING.c.key == key)).scalar()
        return None if value is None else str(value)

    def set_setting(self, key: str, value: str) -> None:
        """Store a setting (insert or update)."""
        with write_transaction(self._engine) as conn:
            done = conn.execute(
                update(_SETTING)
                .where(_SETTING.c.key == key)
                .values(value=value, updated_at=utcnow())
            ).rowcount
            if not done:
                conn.execute(insert(_SETTING).values(key=key, value=value, updated_at=utcnow()))

    # ------------------------------------------------------------------ work
    def latest_instance_pk(self) -> int | None:
        """The newest instance row's primary key (``None``: no instance yet).

        It grows with every stored instance, so a change tells that instances are
        arriving (:class:`sidecar.embeddings.worker.IngestWatch`).
        """
        with self._engine.connect() as conn:
            value = conn.execute(select(func.max(_INSTANCE.c.id))).scalar()
        return None if value is None else int(value)

    def due_series(
        self, *, max_instances: int, max_attempts: int, now: dt.datetime | None = None
    ) -> list[SeriesWork]:
        """Series of stable studies with instances to embed, oldest first.

        An instance is due when it is pending, or failed with attempts left and
        its retry time reached. Whole series are returned (sampling needs every
        slice's position) until about ``max_instances`` due instances are covered.
        """
        now = now or utcnow()
        due_cond = or_(
            _INSTANCE.c.state == InstanceState.PENDING,
            and_(
                _INSTANCE.c.state == InstanceState.FAILED,
                _INSTANCE.c.attempts < max_attempts,
                _INSTANCE.c.next_attempt_at.is_not(None),
                _INSTANCE.c.next_attempt_at <= now,
            ),
        )
        with self._engine.connect() as conn:
            series_rows = conn.execute(
                select(_SERIES.c.id, _SERIES.c.study_pk, func.count(_INSTANCE.c.id))
                .join(_INSTANCE, _INSTANCE.c.series_pk == _SERIES.c.id)
                .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
                .where(_STUDY.c.stable.is_(True), due_cond, without_released(_SERIES.c.id))
                .group_by(_SERIES.c.id, _SERIES.c.study_pk)
                .order_by(func.min(_INSTANCE.c.received_at))
            ).all()
            return _collect_work(
                conn,
                series_rows,
                max_instances,
                _INSTANCE.c.state != InstanceState.SKIPPED,
                due_cond,
            )

    def vector_keys(self, series_pk: int, model_id: str) -> set[tuple[int, int]]:
        """(instance pk, frame) pairs of a series that already have a vector."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_SLICE.c.instance_pk, _SLICE.c.frame).where(
                    _SLICE.c.series_pk == series_pk, _SLICE.c.model_id == model_id
                )
            ).all()
        return {(int(a), int(b)) for a, b in rows}

    def vector_labels(self, series_pk: int, model_id: str) -> dict[tuple[int, int], int]:
        """(instance pk, frame) -> key (label) of a series' existing vectors."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_SLICE.c.instance_pk, _SLICE.c.frame, _SLICE.c.id).where(
                    _SLICE.c.series_pk == series_pk, _SLICE.c.model_id == model_id
                )
            ).all()
        return {(int(a), int(b)): int(c) for a, b, c in rows}

    def commit_series(
        self,
        work: SeriesWork,
        model_id: str,
        vectors: Sequence[NewVector],
        done: Sequence[int],
        failures: dict[int, str],
        *,
        retry_backoff: float,
        max_attempts: int,
        series_vector: tuple[bytes, int] | None,
        study_vector: tuple[bytes, int] | None,
        replaced: Sequence[int] = (),
        now: dt.datetime | None = None,
    ) -> list[int]:
        """Record one series' results in one transaction.

        Inserts the slice vectors, marks ``done`` instances embedded and the
        ``failures`` failed (attempt count, error, next retry time with
        exponential backoff, none after ``max_attempts``), and stores the
        series and study vectors given as ``(blob, number of slices)``.
        Returns the new vector rows' keys (= index labels), in the order of
        ``vectors``. The rows ``replaced`` (keys of stale vectors) are deleted;
        the new rows are inserted while they still exist, so no new row gets
        the key (label) of a stale one.
        """
        now = now or utcnow()
        labels: list[int] = []
        with write_transaction(self._engine) as conn:
            if replaced:
                # Move the stale rows aside ((instance, frame, model) stays unique).
                conn.execute(
                    update(_SLICE)
                    .where(_SLICE.c.id.in_(list(replaced)))
                    .values(frame=-1 - _SLICE.c.frame)
                )
            if vectors:
                # One multi-row INSERT ... RETURNING, keys in the order of ``vectors``:
                # the write lock is held for a few ms, not one round trip per row.
                result = conn.execute(
                    insert(_SLICE).returning(_SLICE.c.id, sort_by_parameter_order=True),
                    [
                        {
                            "instance_pk": v.instance_pk,
                            "frame": v.frame,
                            "series_pk": work.series_pk,
                            "study_pk": work.study_pk,
                            "model_id": model_id,
                            "position_mm": v.position_mm,
                            "vector": v.blob,
                            "created_at": now,
                        }
                        for v in vectors
                    ],
                )
                labels = [int(pk) for pk in result.scalars()]
            if replaced:
                conn.execute(delete(_SLICE).where(_SLICE.c.id.in_(list(replaced))))
            if done:
                conn.execute(
                    update(_INSTANCE)
                    .where(_INSTANCE.c.id.in_(list(done)))
                    .values(
                        state=InstanceState.EMBEDDED,
                        embedded_at=now,
                        error="",
                        next_attempt_at=None,
                    )
                )
            attempts = {i.pk: i.attempts for i in work.instances}
            for pk, error in failures.items():
                n = attempts.get(pk, 0) + 1
                retry = (
                    now + dt.timedelta(seconds=retry_backoff * 2 ** (n - 1))
                    if n < max_attempts
                    else None
                )
                conn.execute(
                    update(_INSTANCE)
                    .where(_INSTANCE.c.id == pk)
                    .values(
                        state=InstanceState.FAILED,
                        attempts=n,
                        error=error[:2000],
                        next_attempt_at=retry,
                    )
                )
            if series_vector is not None:
                _upsert_mean(
                    conn, _SERIES_VEC, {"series_pk": work.series_pk}, model_id,
                    series_vector, extra={"study_pk": work.study_pk},
                )
            if study_vector is not None:
                _upsert_mean(conn, _STUDY_VEC, {"study_pk": work.study_pk}, model_id, study_vector)
        return labels

    # ------------------------------------------------------- index rebuilding
    def slice_vectors(
        self, model_id: str, *, batch: int = 10000, study_pk: int | None = None,
        series_pk: int | None = None,
    ) -> Iterator[list[tuple[int, bytes]]]:
        """Stored (label, blob) pairs of a model, in batches, by label."""
        last = 0
        while True:
            q = select(_SLICE.c.id, _SLICE.c.vector).where(
                _SLICE.c.model_id == model_id, _SLICE.c.id > last
            )
            if study_pk is not None:
                q = q.where(_SLICE.c.study_pk == study_pk)
            if series_pk is not None:
                q = q.where(_SLICE.c.series_pk == series_pk)
            with self._engine.connect() as conn:
                rows = [(int(a), bytes(b)) for a, b in conn.execute(
                    q.order_by(_SLICE.c.id).limit(batch)
                )]
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def labels(self, model_id: str) -> set[int]:
        """Keys of every stored slice vector of a model."""
        with self._engine.connect() as conn:
            return {
                int(r) for r in conn.execute(
                    select(_SLICE.c.id).where(_SLICE.c.model_id == model_id)
                ).scalars()
            }

    def count_vectors(self) -> dict[str, int]:
        """Stored slice vectors per model id."""
        with self._engine.connect() as conn:
            return {
                str(m): int(n)
                for m, n in conn.execute(
                    select(_SLICE.c.model_id, func.count()).group_by(_SLICE.c.model_id)
                )
            }

    def series_missing_model(
        self, model_id: str, *, max_instances: int, exclude: set[int] | None = None
    ) -> list[SeriesWork]:
        """Embedded series of stable studies that have no vector yet under ``model_id``.

        This is the re-embedding work after a model change; the instances'
        states are not touched (``due`` is empty).
        """
        have = select(_SERIES_VEC.c.series_pk).where(_SERIES_VEC.c.model_id == model_id)
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_SERIES.c.id, _SERIES.c.study_pk, func.count(_INSTANCE.c.id))
                .join(_INSTANCE, _INSTANCE.c.series_pk == _SERIES.c.id)
                .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
                .where(
                    _STUDY.c.stable.is_(True),
                    _INSTANCE.c.state == InstanceState.EMBEDDED,
                    _SERIES.c.id.not_in(have),
                    _SERIES.c.id.not_in(sorted(exclude or ())),
                    without_released(_SERIES.c.id),
                )
                .group_by(_SERIES.c.id, _SERIES.c.study_pk)
                .order_by(_SERIES.c.id)
            ).all()
            return _collect_work(
                conn, rows, max_instances, _INSTANCE.c.state == InstanceState.EMBEDDED, None
            )

    def failed_breakdown(self, max_attempts: int) -> tuple[int, int]:
        """Failed instances: (will be retried, given up)."""
        return _failed_counts(self._engine, max_attempts)

    def requeue(self, model_id: str) -> int:
        """Forget a model's vectors and make every embedded instance pending again.

        Used by ``sidecar reindex --reembed``. Returns the number of instances requeued.
        """
        with write_transaction(self._engine) as conn:
            conn.execute(delete(_SLICE).where(_SLICE.c.model_id == model_id))
            conn.execute(delete(_SERIES_VEC).where(_SERIES_VEC.c.model_id == model_id))
            conn.execute(delete(_STUDY_VEC).where(_STUDY_VEC.c.model_id == model_id))
            conn.execute(delete(_VOLUME_VEC).where(_VOLUME_VEC.c.model_id == model_id))
            return int(
                conn.execute(
                    update(_INSTANCE)
                    .where(_INSTANCE.c.state.in_([InstanceState.EMBEDDED, InstanceState.FAILED]))
                    .values(state=InstanceState.PENDING, attempts=0, error="",
                            next_attempt_at=None, embedded_at=None)
                ).rowcount
            )


def _collect_work(
    conn: Connection,
    series_rows: Sequence[Any],
    max_instances: int,
    instance_filter: ColumnElement[bool],
    due_cond: ColumnElement[bool] | None,
) -> list[SeriesWork]:
    """Whole series, in the given order, until about ``max_instances`` are covered.

    ``series_rows`` are (series pk, study pk, instances counted); the series'
    instances matching ``instance_filter`` are loaded, those matching
    ``due_cond`` (if any) marked due.
    """
    due_col = (due_cond if due_cond is not None else literal(False)).label("due")
    work: list[SeriesWork] = []
    covered = 0
    for series_pk, study_pk, n in series_rows:
        if work and covered + n > max_instances:
            break
        item = SeriesWork(series_pk=series_pk, study_pk=study_pk)
        for row in conn.execute(
            select(
                _INSTANCE.c.id, _INSTANCE.c.sop_instance_uid, _INSTANCE.c.file_path,
                _INSTANCE.c.state, _INSTANCE.c.attempts, _INSTANCE.c.number_of_frames, due_col,
            )
            .where(_INSTANCE.c.series_pk == series_pk, instance_filter)
            .order_by(_INSTANCE.c.id)
        ):
            ref = InstanceRef(
                pk=row[0], sop_instance_uid=row[1], file_path=row[2],
                state=InstanceState(row[3]), attempts=row[4], number_of_frames=row[5],
            )
            item.instances.append(ref)
            if row[6]:
                item.due.add(ref.pk)
        work.append(item)
        covered += n
    return work


def _upsert_mean(
    conn: Connection,
    table: Table,
    key: dict[str, int],
    model_id: str,
    value: tuple[bytes, int],
    extra: dict[str, int] | None = None,
) -> None:
    blob, slices = value
    cond = [table.c[k] == v for k, v in key.items()] + [table.c.model_id == model_id]
    done = conn.execute(update(table).where(*cond).values(vector=blob, slices=slices)).rowcount
    if not done:
        conn.execute(
            insert(table).values(
                **key, **(extra or {}), model_id=model_id, vector=blob, slices=slices
            )
        )


def _failed_counts(engine: Engine, max_attempts: int) -> tuple[int, int]:
    # The same rule as ``due_series``: a retry time and attempts left (max_attempts
    # may have been lowered since the retry time was set).
    retrying = and_(
        _INSTANCE.c.next_attempt_at.is_not(None), _INSTANCE.c.attempts < max_attempts
    )
    with engine.connect() as conn:
        rows = conn.execute(
            select(retrying, func.count())
            .where(_INSTANCE.c.state == InstanceState.FAILED)
            .group_by(retrying)
        ).all()
    counts = {bool(k): int(n) for k, n in rows}
    return counts.get(True, 0), counts.get(False, 0)
