"""IOCM rejections in the catalogue: the rejected UIDs, and removing what they name.

One transaction per rejection note: the referenced SOP Instance UIDs are
recorded (received or not), and, unless the action is ``ignore``, the rows of
the received ones (their instance, slice vectors, emptied series and studies,
orphaned patient) are deleted. The caller removes or moves the files after the
commit (sidecar.archive.iocm).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, delete, func, insert, select
from sqlalchemy.exc import SQLAlchemyError

from sidecar.db.engine import write_transaction
from sidecar.db.models import INSTANCE as _INSTANCE
from sidecar.db.models import PATIENT as _PATIENT
from sidecar.db.models import REJECTED_INSTANCE as _REJECTED
from sidecar.db.models import SERIES as _SERIES
from sidecar.db.models import SERIES_VECTOR, SLICE_VECTOR, STUDY_VECTOR
from sidecar.db.models import STUDY as _STUDY
from sidecar.db.repository import CatalogueError, CatalogueUnavailable, utcnow


@dataclass(frozen=True)
class RejectedRef:
    """One reference of a rejection note (Study > Series > SOP Instance)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class RemovedInstance:
    """An instance whose rows a rejection deleted (its file is the caller's to handle)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    file_path: str


@dataclass(frozen=True)
class RejectionRecord:
    """What one rejection did in the catalogue."""

    recorded: int  # UIDs newly recorded as rejected
    removed: tuple[RemovedInstance, ...]
    not_received: int  # references to instances the catalogue does not hold
    other_patient: int  # references to instances of another patient: left alone


class Rejections:
    """The ``rejected_instance`` table and the removal of rejected instances."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def is_rejected(self, sop_instance_uid: str) -> bool:
        """Whether a rejection note named this SOP Instance UID (hide or delete)."""
        try:
            with self._engine.connect() as conn:
                return conn.execute(select(_REJECTED.c.id).where(
                    _REJECTED.c.sop_instance_uid == sop_instance_uid)).first() is not None
        except SQLAlchemyError as exc:
            name = exc.__class__.__name__
            raise CatalogueUnavailable(f"catalogue unavailable: {name}", name) from exc

    def reject(
        self,
        refs: Sequence[RejectedRef],
        *,
        reason: str,
        action: str,
        note_sop_instance_uid: str,
        patient: tuple[str, str],
        now: dt.datetime | None = None,
    ) -> RejectionRecord:
        """Record ``refs`` as rejected and delete the rows of those received.

        Only instances of the note's ``patient`` (Patient ID, issuer) are
        removed: a note cannot remove another patient's images.
        """
        try:
            return self._reject(refs, reason, action, note_sop_instance_uid, patient,
                                now or utcnow())
        except SQLAlchemyError as exc:
            name = exc.__class__.__name__
            raise CatalogueError(f"rejection not recorded: {name}", name) from exc

    def _reject(self, refs: Sequence[RejectedRef], reason: str, action: str,
                note_sop_instance_uid: str, patient: tuple[str, str], now: dt.datetime,
                ) -> RejectionRecord:
        recorded = not_received = other_patient = 0
        removed: list[RemovedInstance] = []
        with write_transaction(self._engine) as conn:
            for ref in refs:
                known = conn.execute(select(_REJECTED.c.id).where(
                    _REJECTED.c.sop_instance_uid == ref.sop_instance_uid)).first()
                if known is None:
                    conn.execute(insert(_REJECTED).values(
                        sop_instance_uid=ref.sop_instance_uid,
                        series_instance_uid=ref.series_instance_uid,
                        study_instance_uid=ref.study_instance_uid,
                        reason=reason[:16], action=action,
                        note_sop_instance_uid=note_sop_instance_uid, rejected_at=now,
                    ))
                    recorded += 1
                row = conn.execute(
                    select(_INSTANCE.c.id, _INSTANCE.c.sop_class_uid, _INSTANCE.c.file_path,
                           _INSTANCE.c.series_pk, _SERIES.c.study_pk,
                           _SERIES.c.series_instance_uid, _STUDY.c.study_instance_uid,
                           _PATIENT.c.patient_id, _PATIENT.c.issuer_of_patient_id)
                    .join(_SERIES, _SERIES.c.id == _INSTANCE.c.series_pk)
                    .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
                    .join(_PATIENT, _PATIENT.c.id == _STUDY.c.patient_pk)
                    .where(_INSTANCE.c.sop_instance_uid == ref.sop_instance_uid)
                ).first()
                if row is None:
                    not_received += 1
                    continue
                pk, sop_class, path, series_pk, study_pk, _, study_uid, pid, issuer = row
                if (str(pid), str(issuer)) != patient:
                    other_patient += 1
                    continue
                removed.append(RemovedInstance(ref.sop_instance_uid, str(sop_class),
                                               str(study_uid), str(path)))
                conn.execute(delete(SLICE_VECTOR).where(SLICE_VECTOR.c.instance_pk == pk))
                conn.execute(delete(_INSTANCE).where(_INSTANCE.c.id == pk))
                _prune(conn, int(series_pk), int(study_pk))
        return RejectionRecord(recorded, tuple(removed), not_received, other_patient)


def _prune(conn: Connection, series_pk: int, study_pk: int) -> None:
    """Drop the series, study and patient rows the removal emptied, and their mean vectors.

    A series or study that keeps instances keeps its mean vector until its next
    embedding (docs/conformance.md, IOCM).
    """
    left = conn.execute(select(func.count()).select_from(_INSTANCE)
                        .where(_INSTANCE.c.series_pk == series_pk)).scalar()
    if not left:
        conn.execute(delete(SERIES_VECTOR).where(SERIES_VECTOR.c.series_pk == series_pk))
        conn.execute(delete(_SERIES).where(_SERIES.c.id == series_pk))
    slices = conn.execute(select(func.count()).select_from(SLICE_VECTOR)
                          .where(SLICE_VECTOR.c.study_pk == study_pk)).scalar()
    if not slices:
        conn.execute(delete(STUDY_VECTOR).where(STUDY_VECTOR.c.study_pk == study_pk))
    series_left = conn.execute(select(func.count()).select_from(_SERIES)
                               .where(_SERIES.c.study_pk == study_pk)).scalar()
    if series_left:
        return
    patient_pk = conn.execute(select(_STUDY.c.patient_pk)
                              .where(_STUDY.c.id == study_pk)).scalar()
    conn.execute(delete(_STUDY).where(_STUDY.c.id == study_pk))
    others = conn.execute(select(func.count()).select_from(_STUDY)
                          .where(_STUDY.c.patient_pk == patient_pk)).scalar()
    if not others:
        conn.execute(delete(_PATIENT).where(_PATIENT.c.id == patient_pk))
