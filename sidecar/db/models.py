"""SQLAlchemy 2.0 typed models: patient → study → series → instance.

The columns are the attributes a radiologist filters on, plus what storage
and the embedding worker need. Schema changes go through Alembic migrations
in ``sidecar/db/migrations`` (``SCHEMA_VERSION`` names the head revision).
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class InstanceState(enum.StrEnum):
    """Life cycle of one stored instance, as ``sidecar status`` reports it."""

    PENDING = "pending"  # stored, image, waiting for embedding
    EMBEDDED = "embedded"  # vectors in the index
    FAILED = "failed"  # embedding failed (see error, attempts)
    SKIPPED = "skipped"  # stored but not for embedding (SR, KOS, PR, SEG, RT, ...)


class Base(DeclarativeBase):
    """Declarative base of every table."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Patient(Base):
    """A patient as identified by PatientID (and issuer)."""

    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """One study (StudyInstanceUID)."""

    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    # Backslash-separated, sorted, maintained on every insert.
    modalities_in_study: Mapped[str] = mapped_column(String(64), default="")
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow, index=True)
    stable: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    stable_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """One series (SeriesInstanceUID)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="", index=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance and its file."""

    __tablename__ = "instance"
    __table_args__ = (Index("ix_instance_state_series", "state", "series_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, index=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Relative to the storage directory; never built from unchecked UIDs.
    file_path: Mapped[str] = mapped_column(String(512))
    file_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    calling_host: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[InstanceState] = mapped_column(
        Enum(InstanceState, native_enum=False, length=16,
             values_callable=lambda e: [m.value for m in e]),
        default=InstanceState.PENDING,
    )
    skip_reason: Mapped[str] = mapped_column(String(128), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Earliest time of the next embedding attempt after a failure (None: no retry).
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    embedded_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # The file was released (storage.keep_files): the row, its vectors and thumbnails stay;
    # file_path is where a fetched-back copy goes.
    released_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, index=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class SliceVector(Base):
    """One embedded slice (an instance's frame) under one model.

    The primary key is the label of the vector in the hnswlib index, so a hit
    maps back to instance, series and study without any remapping. The vector
    itself is kept (float16) so the index can be rebuilt without the CNN.
    """

    __tablename__ = "slice_vector"
    __table_args__ = (
        UniqueConstraint("instance_pk", "frame", "model_id"),
        Index("ix_slice_vector_model_study", "model_id", "study_pk"),
        # Keys are index labels: never hand a deleted row's key to a new row.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(
        ForeignKey("instance.id", ondelete="CASCADE"), index=True
    )
    frame: Mapped[int] = mapped_column(Integer, default=0)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(String(64))
    position_mm: Mapped[float | None] = mapped_column(Float, nullable=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)


class SeriesVector(Base):
    """Normalised mean of a series' slice vectors under one model."""

    __tablename__ = "series_vector"
    __table_args__ = (UniqueConstraint("series_pk", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    slices: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class StudyVector(Base):
    """Normalised mean of a study's slice vectors under one model (candidate search)."""

    __tablename__ = "study_vector"
    __table_args__ = (UniqueConstraint("study_pk", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    slices: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Setting(Base):
    """Small key/value facts the service keeps (e.g. the active model id)."""

    __tablename__ = "setting"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)


class ApiToken(Base):
    """A bearer token of the HTTP API: its SHA-256 digest, never the token itself.

    Revoked tokens keep their row (``revoked_at`` set) so that a client still
    presenting one is told so; names are unique among tokens not revoked.
    """

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(200))  # space-separated, as OAuth writes them
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class RejectedInstance(Base):
    """An instance rejected by an IOCM rejection note (a KOS; sidecar.archive.iocm).

    Kept whether or not the instance was ever received, so that it is not
    stored again when the PACS (or anyone) sends it later.
    """

    __tablename__ = "rejected_instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, default="")
    study_instance_uid: Mapped[str] = mapped_column(UID, default="", index=True)
    reason: Mapped[str] = mapped_column(String(16))  # the document title's code value
    action: Mapped[str] = mapped_column(String(16))  # hide or delete
    note_sop_instance_uid: Mapped[str] = mapped_column(UID)
    rejected_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)


class VolumeVector(Base):
    """A series embedded as one volume under one model (sidecar.embeddings.volume).

    ``vector`` is ``None`` when the series cannot be built as a volume; ``reason``
    then says why (it is embedded slice-wise only). The primary key is the label
    of the vector in the volume index; like slice vector keys, never reused.
    """

    __tablename__ = "volume_vector"
    __table_args__ = (
        UniqueConstraint("series_pk", "model_id"),
        Index("ix_volume_vector_model_study", "model_id", "study_pk"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(64))
    slices: Mapped[int] = mapped_column(Integer, default=0)
    spacing_mm: Mapped[float | None] = mapped_column(Float, nullable=True)
    vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)


# Core tables of the models, for the modules whose hot paths use SQLAlchemy Core
# statements (no ORM unit of work): one typed name per table, defined once.
PATIENT: Table = Patient.__table__  # type: ignore[assignment]
STUDY: Table = Study.__table__  # type: ignore[assignment]
SERIES: Table = Series.__table__  # type: ignore[assignment]
INSTANCE: Table = Instance.__table__  # type: ignore[assignment]
SLICE_VECTOR: Table = SliceVector.__table__  # type: ignore[assignment]
SERIES_VECTOR: Table = SeriesVector.__table__  # type: ignore[assignment]
STUDY_VECTOR: Table = StudyVector.__table__  # type: ignore[assignment]
SETTING: Table = Setting.__table__  # type: ignore[assignment]
API_TOKEN: Table = ApiToken.__table__  # type: ignore[assignment]
REJECTED_INSTANCE: Table = RejectedInstance.__table__  # type: ignore[assignment]
VOLUME_VECTOR: Table = VolumeVector.__table__  # type: ignore[assignment]
