"""Catalogue: engine settings, Alembic migrations, repository behaviour; on SQLite and
PostgreSQL (the module is marked ``catalogue``; ``engine`` is a new empty database)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydicom.uid import generate_uid
from sqlalchemy import Engine, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

import sidecar.db.migrate as migrate
from sidecar.config import Config
from sidecar.db.engine import make_engine, make_session_factory
from sidecar.db.migrate import current_revision, head_revision, upgrade
from sidecar.db.models import Base, Instance, InstanceState, Patient, Series, Study
from sidecar.db.repository import InstanceMeta, Repository, StoredFile, utcnow
from sidecar.errors import InvalidDataset
from tests.conftest import CT_IMAGE_STORAGE, PgServer, wait_for

TABLES = {"patient", "study", "series", "instance"}

pytestmark = pytest.mark.catalogue


def make_meta(**kw: Any) -> InstanceMeta:
    values: dict[str, Any] = {
        "sop_instance_uid": generate_uid(),
        "sop_class_uid": CT_IMAGE_STORAGE,
        "study_instance_uid": generate_uid(),
        "series_instance_uid": generate_uid(),
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "patient_id": "PID-1",
        "modality": "CT",
        "embeddable": True,
    }
    values.update(kw)
    return InstanceMeta(**values)


def make_stored(meta: InstanceMeta, size: int = 100, **kw: Any) -> StoredFile:
    values: dict[str, Any] = {
        "file_path": f"{meta.study_instance_uid}/{meta.series_instance_uid}/"
        f"{meta.sop_instance_uid}.dcm",
        "file_size": size,
        "sha256": "ab" * 32,
    }
    values.update(kw)
    return StoredFile(**values)


def add(repo: Repository, **kw: Any) -> InstanceMeta:
    meta = make_meta(**kw)
    repo.add_instance(meta, make_stored(meta))
    return meta


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'sidecar.db'}",
                      busy_timeout_ms=1234)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def engine(catalogue: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An empty catalogue database (no schema) on the test's engine."""
    if catalogue == "sqlite":
        yield request.getfixturevalue("sqlite_engine")
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = server.create_database(request.node.name, migrated=False)
    eng = make_engine(server.url(name))
    try:
        yield eng
    finally:
        eng.dispose()
        server.drop_database(name)


@pytest.fixture
def repo(engine: Engine) -> Repository:
    upgrade(engine)
    return Repository(make_session_factory(engine))


def one(engine: Engine, model: Any, **where: Any) -> Any:
    with make_session_factory(engine)() as s:
        stmt = select(model).filter_by(**where)
        return s.scalars(stmt).one()


def count(engine: Engine, model: Any) -> int:
    with make_session_factory(engine)() as s:
        return len(s.scalars(select(model)).all())


# ---------------------------------------------------------------- engine
def test_sqlite_engine_creates_parent_dir_and_sets_pragmas(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
    assert (tmp_path / "nested" / "dir" / "sidecar.db").is_file()


def test_pragmas_apply_to_every_pooled_connection(sqlite_engine: Engine) -> None:
    conns = [sqlite_engine.connect() for _ in range(3)]
    try:
        for conn in conns:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        for conn in conns:
            conn.close()


# ------------------------------------------------------------- migrations
def test_upgrade_creates_schema_at_head(engine: Engine) -> None:
    assert current_revision(engine) is None
    assert not TABLES & set(inspect(engine).get_table_names())
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert TABLES | {"alembic_version"} <= set(inspect(engine).get_table_names())


def test_upgrade_twice_is_a_noop(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    upgrade(engine)
    repo = Repository(make_session_factory(engine))
    meta = add(repo)

    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("alembic upgrade ran on a database already at head")

    monkeypatch.setattr(migrate.command, "upgrade", boom)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert repo.find_instance(meta.sop_instance_uid) is not None


def test_upgrade_twice_for_real_keeps_data(engine: Engine) -> None:
    upgrade(engine)
    meta = add(Repository(make_session_factory(engine)))
    upgrade(engine)
    assert Repository(make_session_factory(engine)).find_instance(meta.sop_instance_uid)


def test_migrations_match_the_models(engine: Engine) -> None:
    upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "target_metadata": Base.metadata}
        )
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_compare_metadata_would_see_a_drift(engine: Engine) -> None:
    # Guard for the test above: a schema that differs must produce a diff.
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_series_modality")
        conn.exec_driver_sql("ALTER TABLE patient ADD COLUMN extra INTEGER")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert {d[0] for d in diff} >= {"add_index", "remove_column"}


# ------------------------------------------------------------- repository
def test_add_instance_records_the_hierarchy(engine: Engine, repo: Repository) -> None:
    meta = make_meta(
        patient_id="PID-42",
        issuer_of_patient_id="HOSP",
        patient_name="Doe^Jane",
        patient_birth_date="19800202",
        patient_sex="F",
        study_date="20240131",
        study_time="101010",
        accession_number="ACC777",
        study_id="S1",
        study_description="CT CHEST",
        referring_physician_name="Ref^Doc",
        modality="CT",
        series_number=3,
        series_description="AXIAL 1mm",
        body_part_examined="CHEST",
        instance_number=12,
        number_of_frames=1,
        rows=512,
        columns=512,
    )
    stored = make_stored(meta, size=4242, sha256="cd" * 32, calling_ae_title="PACS",
                         calling_host="10.0.0.5")
    before = utcnow()
    pk = repo.add_instance(meta, stored)
    after = utcnow()

    inst = one(engine, Instance, sop_instance_uid=meta.sop_instance_uid)
    assert inst.id == pk
    assert inst.sop_class_uid == CT_IMAGE_STORAGE
    assert inst.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert inst.instance_number == 12
    assert (inst.rows, inst.columns, inst.number_of_frames) == (512, 512, 1)
    assert inst.file_path == stored.file_path
    assert inst.file_size == 4242
    assert inst.sha256 == "cd" * 32
    assert inst.calling_ae_title == "PACS"
    assert inst.calling_host == "10.0.0.5"
    assert inst.state is InstanceState.PENDING
    assert inst.skip_reason == ""
    assert before <= inst.received_at <= after

    series = one(engine, Series, id=inst.series_pk)
    assert series.series_instance_uid == meta.series_instance_uid
    assert series.modality == "CT"
    assert series.series_number == 3
    assert series.series_description == "AXIAL 1mm"
    assert series.body_part_examined == "CHEST"

    study = one(engine, Study, id=series.study_pk)
    assert study.study_instance_uid == meta.study_instance_uid
    assert study.study_date == "20240131"
    assert study.study_time == "101010"
    assert study.accession_number == "ACC777"
    assert study.study_id == "S1"
    assert study.study_description == "CT CHEST"
    assert study.referring_physician_name == "Ref^Doc"
    assert study.modalities_in_study == "CT"
    assert study.stable is False
    assert study.stable_at is None
    assert before <= study.first_received_at == study.last_received_at <= after

    patient = one(engine, Patient, id=study.patient_pk)
    assert patient.patient_id == "PID-42"
    assert patient.issuer_of_patient_id == "HOSP"
    assert patient.patient_name == "Doe^Jane"
    assert patient.patient_birth_date == "19800202"
    assert patient.patient_sex == "F"


def test_non_embeddable_instance_is_skipped(engine: Engine, repo: Repository) -> None:
    meta = add(repo, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11", modality="SR",
               embeddable=False, skip_reason="non-image SOP class")
    inst = one(engine, Instance, sop_instance_uid=meta.sop_instance_uid)
    assert inst.state is InstanceState.SKIPPED
    assert inst.skip_reason == "non-image SOP class"


def test_instances_share_series_study_and_patient(engine: Engine, repo: Repository) -> None:
    study, series = generate_uid(), generate_uid()
    for _ in range(3):
        add(repo, study_instance_uid=study, series_instance_uid=series)
    add(repo, study_instance_uid=study)  # second series
    add(repo)  # same patient, another study
    add(repo, patient_id="PID-2")
    add(repo, patient_id="PID-2", issuer_of_patient_id="OTHER")  # issuer separates patients
    assert count(engine, Instance) == 7
    assert count(engine, Series) == 5
    assert count(engine, Study) == 4
    assert count(engine, Patient) == 3


@pytest.mark.parametrize(
    ("modalities", "expected"),
    [
        (["CT", "MR"], "CT\\MR"),
        (["MR", "CT"], "CT\\MR"),
        (["CT", "CT", "MR", "CT"], "CT\\MR"),
        (["PT", "", "CT", "SR"], "CT\\PT\\SR"),
    ],
)
def test_modalities_in_study_accumulate(
    engine: Engine, repo: Repository, modalities: list[str], expected: str
) -> None:
    study = generate_uid()
    for modality in modalities:
        add(repo, study_instance_uid=study, modality=modality)
    assert one(engine, Study, study_instance_uid=study).modalities_in_study == expected


def test_concurrent_stores_to_one_study_keep_every_modality(
    engine: Engine, repo: Repository
) -> None:
    """Two writers add an MR and a PT instance to a CT study at the same moment: neither
    modality is lost (on PostgreSQL, under READ COMMITTED, the study row is read for
    update; SQLite's writers are serialised by BEGIN IMMEDIATE)."""
    study = add(repo, modality="CT").study_instance_uid
    errors: list[BaseException] = []

    def store(modality: str) -> None:
        try:
            add(repo, study_instance_uid=study, modality=modality)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def waiting_writers() -> int:
        if engine.dialect.name == "sqlite":
            time.sleep(0.3)  # both wait for the write lock (BEGIN IMMEDIATE)
            return 2
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()")).scalar() or 0)

    with engine.connect().execution_options(sidecar_write=True) as blocker, blocker.begin():
        # holds the write lock (SQLite) or the study row's lock (PostgreSQL)
        blocker.execute(update(Study).where(Study.study_instance_uid == study)
                        .values(stable=False))
        threads = [threading.Thread(target=store, args=(m,)) for m in ("MR", "PT")]
        for t in threads:
            t.start()
        wait_for(lambda: waiting_writers() >= 2, 10, what="both writers to wait for the study")
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert one(engine, Study, study_instance_uid=study).modalities_in_study == "CT\\MR\\PT"


def test_mark_stable_studies_uses_stable_age(engine: Engine, repo: Repository) -> None:
    meta = add(repo)
    last = one(engine, Study, study_instance_uid=meta.study_instance_uid).last_received_at
    assert repo.mark_stable_studies(60.0, now=last + dt.timedelta(seconds=59.9)) == 0
    assert one(engine, Study, study_instance_uid=meta.study_instance_uid).stable is False
    now = last + dt.timedelta(seconds=60)
    assert repo.mark_stable_studies(60.0, now=now) == 1
    study = one(engine, Study, study_instance_uid=meta.study_instance_uid)
    assert study.stable is True
    assert study.stable_at == now
    # Already stable studies are not counted again.
    assert repo.mark_stable_studies(60.0, now=now + dt.timedelta(hours=1)) == 0


def test_mark_stable_studies_only_marks_old_studies(engine: Engine, repo: Repository) -> None:
    old, fresh = add(repo), add(repo)
    with engine.begin() as conn:
        conn.execute(
            update(Study)
            .where(Study.study_instance_uid == old.study_instance_uid)
            .values(last_received_at=utcnow() - dt.timedelta(hours=2))
        )
    assert repo.mark_stable_studies(3600.0, now=utcnow()) == 1
    assert one(engine, Study, study_instance_uid=old.study_instance_uid).stable is True
    assert one(engine, Study, study_instance_uid=fresh.study_instance_uid).stable is False
    assert repo.status().studies_stable == 1


def test_late_instance_reopens_a_stable_study(engine: Engine, repo: Repository) -> None:
    first = add(repo)
    last = one(engine, Study, study_instance_uid=first.study_instance_uid).last_received_at
    assert repo.mark_stable_studies(1.0, now=last + dt.timedelta(seconds=5)) == 1
    add(repo, study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid)
    study = one(engine, Study, study_instance_uid=first.study_instance_uid)
    assert study.stable is False
    assert study.stable_at is None
    assert study.last_received_at >= last
    assert study.first_received_at <= last


def test_series_reused_under_another_study_is_refused(engine: Engine, repo: Repository) -> None:
    first = add(repo)
    other_study = generate_uid()
    with pytest.raises(InvalidDataset) as info:
        add(repo, study_instance_uid=other_study, series_instance_uid=first.series_instance_uid)
    assert info.value.kind in ("inconsistent", "mismatch")
    # The whole transaction is rolled back: no study, patient or instance remains.
    assert count(engine, Instance) == 1
    assert count(engine, Study) == 1
    assert count(engine, Patient) == 1


def test_same_sop_instance_twice_is_an_integrity_error(repo: Repository) -> None:
    meta = add(repo)
    with pytest.raises(IntegrityError):
        repo.add_instance(meta, make_stored(meta))


def test_find_instance(repo: Repository) -> None:
    meta = make_meta()
    stored = make_stored(meta, sha256="ef" * 32)
    pk = repo.add_instance(meta, stored)
    found = repo.find_instance(meta.sop_instance_uid)
    assert found is not None
    assert (found.pk, found.sha256, found.file_path) == (pk, "ef" * 32, stored.file_path)
    assert repo.find_instance(generate_uid()) is None


def test_lookup_finds_the_instance_and_a_rejection_in_one_query(
    engine: Engine, repo: Repository,
) -> None:
    from sidecar.db.rejections import RejectedRef, Rejections  # noqa: PLC0415

    meta = make_meta()
    stored = make_stored(meta, sha256="ab" * 32)
    pk = repo.add_instance(meta, stored)
    found = repo.lookup(meta.sop_instance_uid)
    assert found.existing is not None and not found.rejected
    assert (found.existing.pk, found.existing.sha256, found.existing.released) == (
        pk, "ab" * 32, False)
    unknown = generate_uid()
    assert repo.lookup(unknown).existing is None and not repo.lookup(unknown).rejected
    # a rejection note names a UID not received yet: it is rejected, not existing
    Rejections(engine).reject([RejectedRef(meta.study_instance_uid, meta.series_instance_uid,
                                           unknown)], reason="113001", action="hide",
                              note_sop_instance_uid=generate_uid(),
                              patient=(meta.patient_id, meta.issuer_of_patient_id))
    later = repo.lookup(unknown)
    assert later.existing is None and later.rejected


def test_replace_instance_points_at_the_new_file(engine: Engine, repo: Repository) -> None:
    meta = add(repo, instance_number=1)
    found = repo.find_instance(meta.sop_instance_uid)
    assert found is not None
    with engine.begin() as conn:
        conn.execute(update(Instance).values(state=InstanceState.FAILED, error="x", attempts=3))
    new_meta = make_meta(
        sop_instance_uid=meta.sop_instance_uid,
        study_instance_uid=meta.study_instance_uid,
        series_instance_uid=meta.series_instance_uid,
        instance_number=2,
    )
    repo.replace_instance(found.pk, new_meta, make_stored(new_meta, size=7, sha256="12" * 32,
                                                          file_path="a/b/c.dcm"))
    inst = one(engine, Instance, sop_instance_uid=meta.sop_instance_uid)
    assert (inst.file_path, inst.file_size, inst.sha256) == ("a/b/c.dcm", 7, "12" * 32)
    assert inst.instance_number == 2
    assert inst.state is InstanceState.PENDING
    assert (inst.error, inst.attempts) == ("", 0)
    assert count(engine, Instance) == 1


def test_status_counts_per_state(engine: Engine, repo: Repository) -> None:
    empty = repo.status()
    assert empty.instances_by_state == {"pending": 0, "embedded": 0, "failed": 0, "skipped": 0}
    assert (empty.studies, empty.series, empty.patients, empty.stored_bytes) == (0, 0, 0, 0)

    study = generate_uid()
    metas = [add(repo, study_instance_uid=study) for _ in range(5)]
    add(repo, embeddable=False, skip_reason="non-image SOP class", patient_id="P2")
    with engine.begin() as conn:
        conn.execute(update(Instance)
                     .where(Instance.sop_instance_uid.in_([m.sop_instance_uid for m in metas[:2]]))
                     .values(state=InstanceState.EMBEDDED))
        conn.execute(update(Instance)
                     .where(Instance.sop_instance_uid == metas[2].sop_instance_uid)
                     .values(state=InstanceState.FAILED))
    rep = repo.status()
    assert rep.instances_by_state == {"pending": 2, "embedded": 2, "failed": 1, "skipped": 1}
    assert rep.studies == 2
    assert rep.studies_stable == 0
    assert rep.series == 6
    assert rep.patients == 2
    assert rep.stored_bytes == 600 and type(rep.stored_bytes) is int  # not a Decimal


def test_page_lists_series_and_instances_without_a_number_first(repo: Repository,
                                                                 engine: Engine) -> None:
    """The page's order (series number, then instance number) puts a missing number first
    on both engines (PostgreSQL sorts NULL last by default, SQLite first)."""
    from sidecar.db.ui_queries import UiQueries

    study, numbered, unnumbered = generate_uid(), generate_uid(), generate_uid()
    sops = {}
    for series, series_number in ((numbered, 1), (unnumbered, None)):
        for instance_number in (2, None):
            meta = add(repo, study_instance_uid=study, series_instance_uid=series,
                       series_number=series_number, instance_number=instance_number, rows=8)
            sops[series_number, instance_number] = meta.sop_instance_uid
    pages = UiQueries(engine)
    detail = pages.study(study)
    assert detail is not None
    assert [s.series_number for s in detail.series] == [None, 1]
    assert [r.sop_instance_uid for r in pages.study_slices(study, None)] == [
        sops[None, None], sops[None, 2], sops[1, None], sops[1, 2]]


def test_state_is_stored_as_its_value(engine: Engine, repo: Repository) -> None:
    add(repo, embeddable=False)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM instance")).scalar() == "skipped"


# ------------------------------------------------------------- PostgreSQL
def test_postgresql_url_with_percent_encoded_password(pg_server: PgServer) -> None:
    # trust authentication ignores the password; the URL still carries "p@ss;w%rd".
    name = pg_server.create_database("password", migrated=False)
    engine = make_engine(pg_server.url(name).replace("postgres@", "postgres:p%40ss%3Bw%25rd@"))
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
        pg_server.drop_database(name)


def test_catalogue_verify_and_newest_instance(config_factory: Callable[..., Config]) -> None:
    from sidecar.archive.store import InstanceStore, Origin
    from sidecar.archive.verify import verify_storage
    from sidecar.db.connect import open_catalogue
    from sidecar.db.vectors import VectorRepository
    from tests.conftest import make_ct, part10

    cfg = config_factory()
    engine, repo = open_catalogue(cfg)
    try:
        assert VectorRepository(engine).latest_instance_pk() is None
        store = InstanceStore(cfg, repo)
        paths = []
        for i in range(3):
            paths.append(store.store(part10(make_ct(seed=i)), None, Origin("T", "h")).path)
        newest = VectorRepository(engine).latest_instance_pk()
        assert newest is not None and newest >= 3
        paths[1].unlink()
        report = verify_storage(cfg, engine, checksums=True, min_age=0.0)
        assert report.rows == 3 and report.files == 2
        assert report.missing == [paths[1].relative_to(cfg.storage_dir).as_posix()]
        assert report.wrong_checksum == [] and report.orphans == []
    finally:
        engine.dispose()


def test_sqlite_path_with_percent_sign(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / '100%data' / 'sidecar.db'}")
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
