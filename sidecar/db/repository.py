"""Repository functions: every read and write of the catalogue goes through here.

Transactions are short; callers pass plain data (``InstanceMeta``) and get
plain data back, so the DICOM layer never touches ORM objects.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sidecar.db.engine import SINGLE_READ_OPTION, write_transaction
from sidecar.db.models import INSTANCE as _INSTANCE
from sidecar.db.models import PATIENT as _PATIENT
from sidecar.db.models import REJECTED_INSTANCE as _REJECTED
from sidecar.db.models import SERIES as _SERIES
from sidecar.db.models import (
    SERIES_VECTOR,
    SLICE_VECTOR,
    STUDY_VECTOR,
    Instance,
    InstanceState,
    Patient,
    Series,
    Study,
)
from sidecar.db.models import STUDY as _STUDY
from sidecar.errors import InvalidDataset, SidecarError

# The hot write path uses Core statements on these tables (no ORM unit of work).
_RACE_RETRIES = 3


class CatalogueError(SidecarError):
    """A catalogue statement failed; ``cause`` names the database driver's error class."""

    def __init__(self, message: str, cause: str) -> None:
        self.cause = cause
        super().__init__(message)


class CatalogueUnavailable(CatalogueError):
    """The catalogue cannot be read or written now (connection, lock, missing table)."""


class CatalogueFull(CatalogueError):
    """The database is out of space (SQLite SQLITE_FULL, PostgreSQL class 53)."""


def _is_full(exc: SQLAlchemyError) -> bool:
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
        return True
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return isinstance(state, str) and state.startswith("53")  # insufficient resources


class RowRefused(CatalogueError):
    """The database refused a row (a constraint: usually the same UID recorded concurrently).

    ``detail`` is the database's own message.
    """

    def __init__(self, detail: str, cause: str) -> None:
        self.detail = detail
        super().__init__(f"database refused the row: {detail}", cause)


def utcnow() -> dt.datetime:
    """Naive UTC now, as stored in the database."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class InstanceMeta:
    """What the catalogue records of one instance (parsed from its header)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    instance_number: int | None = None
    number_of_frames: int = 1
    rows: int | None = None
    columns: int | None = None
    embeddable: bool = False
    skip_reason: str = ""


@dataclass(frozen=True)
class StoredFile:
    """Where and what was written for an instance."""

    file_path: str  # relative to the storage directory
    file_size: int
    sha256: str
    calling_ae_title: str = ""
    calling_host: str = ""


@dataclass(frozen=True)
class ExistingInstance:
    """The catalogue's record of an already stored SOP Instance UID."""

    pk: int
    sha256: str
    file_path: str
    released: bool = False  # the file was released (storage.keep_files); a copy restores it


@dataclass(frozen=True)
class Lookup:
    """What the catalogue holds of an arriving SOP Instance UID (one query)."""

    existing: ExistingInstance | None
    rejected: bool  # an IOCM rejection note named it


@dataclass(frozen=True)
class StudySummary:
    """Who a study belongs to and what it holds (for its audit message)."""

    patient_id: str
    issuer_of_patient_id: str
    sop_classes: dict[str, int]


@dataclass
class StatusReport:
    """Counts shown by ``sidecar status``."""

    instances_by_state: dict[str, int] = field(default_factory=dict)
    studies: int = 0
    studies_stable: int = 0
    series: int = 0
    patients: int = 0
    stored_bytes: int = 0


class Repository:
    """Catalogue access over one session factory."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sf = session_factory
        bind = session_factory.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("the session factory must be bound to an Engine")
        self._engine: Engine = bind

    @property
    def engine(self) -> Engine:
        """The engine behind this repository."""
        return self._engine

    # ----------------------------------------------------------------- reads
    def find_instance(self, sop_instance_uid: str) -> ExistingInstance | None:
        """The stored record of ``sop_instance_uid``, if any.

        Raises
        ------
        CatalogueUnavailable
            The catalogue cannot be read.
        """
        try:
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(_INSTANCE.c.id, _INSTANCE.c.sha256, _INSTANCE.c.file_path,
                           _INSTANCE.c.released_at).where(
                        _INSTANCE.c.sop_instance_uid == sop_instance_uid
                    )
                ).first()
        except SQLAlchemyError as exc:
            name = exc.__class__.__name__
            raise CatalogueUnavailable(f"database unavailable: {name}", name) from exc
        if row is None:
            return None
        return ExistingInstance(pk=row[0], sha256=row[1], file_path=row[2],
                                released=row[3] is not None)

    def lookup(self, sop_instance_uid: str) -> Lookup:
        """:meth:`find_instance` and whether a rejection note named the UID, in one query.

        Raises
        ------
        CatalogueUnavailable
            The catalogue cannot be read.
        """
        rejected = (select(_REJECTED.c.id)
                    .where(_REJECTED.c.sop_instance_uid == sop_instance_uid).exists())
        try:
            with self._engine.connect().execution_options(**{SINGLE_READ_OPTION: True}) as conn:
                row = conn.execute(
                    select(rejected.label("rejected"), _INSTANCE.c.id, _INSTANCE.c.sha256,
                           _INSTANCE.c.file_path, _INSTANCE.c.released_at)
                    .select_from(select(literal(1).label("one")).subquery())
                    .outerjoin(_INSTANCE, _INSTANCE.c.sop_instance_uid == sop_instance_uid)
                ).first()
        except SQLAlchemyError as exc:
            name = exc.__class__.__name__
            raise CatalogueUnavailable(f"database unavailable: {name}", name) from exc
        assert row is not None
        existing = (None if row[1] is None else
                    ExistingInstance(pk=row[1], sha256=row[2], file_path=row[3],
                                     released=row[4] is not None))
        return Lookup(existing, bool(row[0]))

    def study_summary(self, study_instance_uid: str) -> StudySummary | None:
        """The study's Patient ID and instances per SOP Class; ``None`` when unknown."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(_PATIENT.c.patient_id, _PATIENT.c.issuer_of_patient_id, _STUDY.c.id)
                .join(_STUDY, _STUDY.c.patient_pk == _PATIENT.c.id)
                .where(_STUDY.c.study_instance_uid == study_instance_uid)
            ).first()
            if row is None:
                return None
            counts = conn.execute(
                select(_INSTANCE.c.sop_class_uid, func.count())
                .join(_SERIES, _INSTANCE.c.series_pk == _SERIES.c.id)
                .where(_SERIES.c.study_pk == row[2])
                .group_by(_INSTANCE.c.sop_class_uid)
            ).all()
        return StudySummary(str(row[0] or ""), str(row[1] or ""),
                            {str(uid): int(n) for uid, n in counts})

    def status(self) -> StatusReport:
        """Counts per instance state, studies, series and stored bytes."""
        rep = StatusReport()
        with self._sf() as s:
            for state, count in s.execute(
                select(Instance.state, func.count()).group_by(Instance.state)
            ):
                rep.instances_by_state[InstanceState(state).value] = count
            rep.studies = s.scalar(select(func.count()).select_from(Study)) or 0
            rep.studies_stable = (
                s.scalar(select(func.count()).select_from(Study).where(Study.stable)) or 0
            )
            rep.series = s.scalar(select(func.count()).select_from(Series)) or 0
            rep.patients = s.scalar(select(func.count()).select_from(Patient)) or 0
            # int(): PostgreSQL's SUM of a BIGINT is a NUMERIC (a Decimal from psycopg)
            rep.stored_bytes = int(s.scalar(select(func.coalesce(func.sum(Instance.file_size), 0))
                                            .where(Instance.released_at.is_(None))) or 0)
        for st in InstanceState:
            rep.instances_by_state.setdefault(st.value, 0)
        return rep

    # ---------------------------------------------------------------- writes
    def add_instance(self, meta: InstanceMeta, stored: StoredFile) -> int:
        """Record a new instance (and its patient, study, series) in one transaction.

        The study is re-opened (``stable`` cleared) and its last-received time
        moved forward. A race with another writer creating the same study or
        series is retried.

        Raises
        ------
        sqlalchemy.exc.IntegrityError
            The SOP Instance UID was recorded concurrently.
        InvalidDataset
            The series already belongs to another study.

        Returns
        -------
        int
            Primary key of the new instance row.
        """
        for attempt in range(_RACE_RETRIES):
            now = utcnow()
            try:
                with write_transaction(self._engine) as conn:
                    series_pk = self._touch_hierarchy(conn, meta, now)
                    values = _instance_values(meta, stored, now)
                    values["sop_instance_uid"] = meta.sop_instance_uid
                    values["series_pk"] = series_pk
                    result = conn.execute(insert(_INSTANCE).values(**values))
                    pk = result.inserted_primary_key
                    assert pk is not None
                    return int(pk[0])
            except IntegrityError:
                if attempt == _RACE_RETRIES - 1 or self.find_instance(meta.sop_instance_uid):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def record_instance(
        self, meta: InstanceMeta, stored: StoredFile, *, replace_pk: int | None = None
    ) -> None:
        """:meth:`add_instance`, or :meth:`replace_instance` of row ``replace_pk``.

        Raises
        ------
        InvalidDataset
            The series already belongs to another study.
        RowRefused
            A constraint refused the row (the same SOP Instance UID, concurrently).
        CatalogueError
            Any other database failure; nothing was committed.
        """
        try:
            if replace_pk is None:
                self.add_instance(meta, stored)
            else:
                self.replace_instance(replace_pk, meta, stored)
        except IntegrityError as exc:
            raise RowRefused(str(exc.orig), exc.__class__.__name__) from exc
        except SQLAlchemyError as exc:
            name = exc.__class__.__name__
            if _is_full(exc):
                raise CatalogueFull(f"database full: {getattr(exc, 'orig', exc)}", name) from exc
            raise CatalogueError(f"database commit failed: {name}", name) from exc

    def restore_instance(self, pk: int, meta: InstanceMeta, stored: StoredFile) -> None:
        """Point a released instance's row at a fetched-back copy of its file.

        Only the file's facts change (path, size, digest, transfer syntax): the
        state, vectors and study stay as they are. Raises as :meth:`record_instance`.
        """
        try:
            with write_transaction(self._engine) as conn:
                conn.execute(update(_INSTANCE).where(_INSTANCE.c.id == pk).values(
                    file_path=stored.file_path, file_size=stored.file_size,
                    sha256=stored.sha256, transfer_syntax_uid=meta.transfer_syntax_uid,
                    released_at=None))
        except SQLAlchemyError as exc:
            name = exc.__class__.__name__
            if _is_full(exc):
                raise CatalogueFull(f"database full: {getattr(exc, 'orig', exc)}", name) from exc
            raise CatalogueError(f"database commit failed: {name}", name) from exc

    def replace_instance(self, pk: int, meta: InstanceMeta, stored: StoredFile) -> None:
        """Point an existing instance row at a new file (policy ``replace``).

        The instance goes back to pending (or skipped) and its study re-opens.
        """
        now = utcnow()
        with write_transaction(self._engine) as conn:
            series_pk = self._touch_hierarchy(conn, meta, now)
            values = _instance_values(meta, stored, now)
            values.update(series_pk=series_pk, error="", attempts=0)
            conn.execute(update(_INSTANCE).where(_INSTANCE.c.id == pk).values(**values))

    def delete_study(self, study_instance_uid: str) -> list[str] | None:
        """Delete a study's rows (instances, series, vectors; its patient if orphaned).

        Returns the stored files' paths (relative to the storage directory) for
        the caller to remove after the commit, or ``None`` for an unknown study.
        The index drops the study's vectors when it is next reconciled.
        """
        with write_transaction(self._engine) as conn:
            row = conn.execute(
                select(_STUDY.c.id, _STUDY.c.patient_pk).where(
                    _STUDY.c.study_instance_uid == study_instance_uid
                )
            ).first()
            if row is None:
                return None
            study_pk, patient_pk = row
            series_pks = select(_SERIES.c.id).where(_SERIES.c.study_pk == study_pk)
            paths = [
                str(p) for p in conn.execute(
                    select(_INSTANCE.c.file_path).where(_INSTANCE.c.series_pk.in_(series_pks))
                ).scalars()
            ]
            for table in (SLICE_VECTOR, SERIES_VECTOR, STUDY_VECTOR):
                conn.execute(delete(table).where(table.c.study_pk == study_pk))
            conn.execute(delete(_INSTANCE).where(_INSTANCE.c.series_pk.in_(series_pks)))
            conn.execute(delete(_SERIES).where(_SERIES.c.study_pk == study_pk))
            conn.execute(delete(_STUDY).where(_STUDY.c.id == study_pk))
            others = conn.execute(
                select(func.count()).select_from(_STUDY).where(_STUDY.c.patient_pk == patient_pk)
            ).scalar()
            if not others:
                conn.execute(delete(_PATIENT).where(_PATIENT.c.id == patient_pk))
        return paths

    def mark_stable_studies(self, stable_age: float, now: dt.datetime | None = None) -> int:
        """Mark studies with no new instance for ``stable_age`` seconds as stable.

        Returns
        -------
        int
            Number of studies that became stable.
        """
        now = now or utcnow()
        cutoff = now - dt.timedelta(seconds=stable_age)
        with write_transaction(self._engine) as conn:
            result = conn.execute(
                update(_STUDY)
                .where(_STUDY.c.stable.is_(False), _STUDY.c.last_received_at <= cutoff)
                .values(stable=True, stable_at=now)
            )
            return int(result.rowcount or 0)

    # --------------------------------------------------------------- helpers
    @staticmethod
    def _touch_hierarchy(conn: Connection, meta: InstanceMeta, now: dt.datetime) -> int:
        """Create or update patient, study and series rows; return the series key."""
        # The usual case, a study already known, is one statement: re-open it and read it.
        # The UPDATE also locks the row until the commit (PostgreSQL's writers run side by
        # side under READ COMMITTED), so the modality merged below cannot be lost to a
        # concurrent store; SQLite's BEGIN IMMEDIATE serialises writers anyway.
        row = conn.execute(
            update(_STUDY).where(_STUDY.c.study_instance_uid == meta.study_instance_uid)
            .values(last_received_at=now, stable=False, stable_at=None)
            .returning(_STUDY.c.id, _STUDY.c.modalities_in_study)
        ).first()
        if row is None:
            patient_pk = conn.execute(
                select(_PATIENT.c.id).where(
                    _PATIENT.c.patient_id == meta.patient_id,
                    _PATIENT.c.issuer_of_patient_id == meta.issuer_of_patient_id,
                )
            ).scalar()
            if patient_pk is None:
                patient_pk = conn.execute(
                    insert(_PATIENT).values(
                        patient_id=meta.patient_id,
                        issuer_of_patient_id=meta.issuer_of_patient_id,
                        patient_name=meta.patient_name,
                        patient_birth_date=meta.patient_birth_date,
                        patient_sex=meta.patient_sex,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            study_pk = conn.execute(
                insert(_STUDY).values(
                    study_instance_uid=meta.study_instance_uid,
                    patient_pk=patient_pk,
                    study_date=meta.study_date,
                    study_time=meta.study_time,
                    accession_number=meta.accession_number,
                    study_id=meta.study_id,
                    study_description=meta.study_description,
                    referring_physician_name=meta.referring_physician_name,
                    modalities_in_study=meta.modality,
                    first_received_at=now,
                    last_received_at=now,
                    stable=False,
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        else:
            study_pk, modalities = row
            mods = set(filter(None, modalities.split("\\")))
            if meta.modality and meta.modality not in mods:
                conn.execute(update(_STUDY).where(_STUDY.c.id == study_pk).values(
                    modalities_in_study="\\".join(sorted(mods | {meta.modality}))))
        series = conn.execute(
            select(_SERIES.c.id, _SERIES.c.study_pk).where(
                _SERIES.c.series_instance_uid == meta.series_instance_uid
            )
        ).first()
        if series is None:
            return int(
                conn.execute(
                    insert(_SERIES).values(
                        series_instance_uid=meta.series_instance_uid,
                        study_pk=study_pk,
                        modality=meta.modality,
                        series_number=meta.series_number,
                        series_description=meta.series_description,
                        body_part_examined=meta.body_part_examined,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            )
        if series[1] != study_pk:
            raise InvalidDataset(
                "inconsistent", "SeriesInstanceUID already belongs to another study"
            )
        return int(series[0])


def _instance_values(meta: InstanceMeta, stored: StoredFile, now: dt.datetime) -> dict[str, Any]:
    return {
        "sop_class_uid": meta.sop_class_uid,
        "instance_number": meta.instance_number,
        "transfer_syntax_uid": meta.transfer_syntax_uid,
        "number_of_frames": meta.number_of_frames,
        "rows": meta.rows,
        "columns": meta.columns,
        "file_path": stored.file_path,
        "file_size": stored.file_size,
        "sha256": stored.sha256,
        "received_at": now,
        "calling_ae_title": stored.calling_ae_title,
        "calling_host": stored.calling_host,
        "state": InstanceState.PENDING if meta.embeddable else InstanceState.SKIPPED,
        "skip_reason": "" if meta.embeddable else meta.skip_reason,
        "released_at": None,
    }


def stored_files(engine: Engine, batch: int = 2000) -> Iterator[tuple[str, int, str, bool]]:
    """``(file_path, file_size, sha256, released)`` of every instance row, in storage order
    (streamed); ``released``: the file was released on purpose (``storage.keep_files``)."""
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=batch).execute(
            select(_INSTANCE.c.file_path, _INSTANCE.c.file_size, _INSTANCE.c.sha256,
                   _INSTANCE.c.released_at)
            .order_by(_INSTANCE.c.id)
        )
        for file_path, size, digest, released in rows:
            yield str(file_path), int(size), str(digest), released is not None
