"""Shared fixtures and helpers: configurations in tmp dirs, a live node on a free
port, DICOM built in code and its Part-10 bytes (``part10``), one C-FIND client
(``c_find``), one ``wait_for``, the locations of optional real-world resources, and
the catalogue engine under test (``catalogue``: SQLite, and PostgreSQL in a throwaway
cluster for modules or tests marked ``catalogue``)."""

from __future__ import annotations

import glob
import io
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import Engine, text

from sidecar.config import Config, load_config
from sidecar.db.engine import make_engine
from sidecar.db.migrate import upgrade
from sidecar.dicom.statuses import Status
from sidecar.service.app import Sidecar

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SIDECAR_SHARED_DATA", REPO.parent / "shared" / "data"))
DCMTK_BIN = Path("/usr/bin")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


_NAMED_LOGGERS = ("sidecar", "pynetdicom", "pydicom", "apscheduler", "alembic")


@pytest.fixture
def cli_isolation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """For CLI tests: no SIDECAR_* from the outside, no ./config/sidecar.yaml (cwd is
    tmp_path), and logging put back afterwards (the CLI configures logging with the
    runner's soon closed stderr)."""
    import logging

    from pynetdicom import _config as pnd_config

    for name in list(os.environ):
        if name.startswith("SIDECAR"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in _NAMED_LOGGERS}
    flags = (pnd_config.LOG_REQUEST_IDENTIFIERS, pnd_config.LOG_RESPONSE_IDENTIFIERS)
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)
    pnd_config.LOG_REQUEST_IDENTIFIERS, pnd_config.LOG_RESPONSE_IDENTIFIERS = flags


def storage_files(root: Path) -> list[Path]:
    """Every file below a storage directory but live stores' locks (``.tmp/<owner>.lock``)."""
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not (p.parent.name == ".tmp" and p.suffix == ".lock"))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


# ------------------------------------------------------------ catalogue engines
#: The catalogue engines a test marked ``catalogue`` runs on (the ``catalogue`` fixture).
CATALOGUES = ("sqlite", "postgresql")
INITDB = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--catalogue", choices=CATALOGUES, default=None,
        help="run every test's catalogue on this engine only, marked ``catalogue`` or not "
             "(default: marked tests on both engines, the others on SQLite)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``catalogue`` (or in a module so marked) that use the catalogue
    fixture, directly or through ``config_factory``, run once per engine; the
    PostgreSQL runs are also marked ``postgresql`` (``-m "not postgresql"`` leaves them out).
    ``@pytest.mark.catalogue("sqlite")`` on a test of such a module: that engine only."""
    marker = metafunc.definition.get_closest_marker("catalogue")
    if metafunc.config.getoption("catalogue") or marker is None \
            or "catalogue" not in metafunc.fixturenames:
        return
    engines = marker.args or CATALOGUES
    assert set(engines) <= set(CATALOGUES), engines
    if tuple(engines) == ("sqlite",):
        return  # the default
    metafunc.parametrize(
        "catalogue",
        [pytest.param(c, marks=[pytest.mark.postgresql] if c == "postgresql" else [])
         for c in engines],
        indirect=True, scope="module")


@pytest.fixture(scope="module")
def catalogue(request: pytest.FixtureRequest) -> str:
    """The catalogue engine under test: ``sqlite`` unless the test is marked ``catalogue``,
    then each of :data:`CATALOGUES` in turn; ``pytest --catalogue ENGINE``: that one."""
    return str(getattr(request, "param", None) or request.config.getoption("catalogue")
               or "sqlite")


@dataclass
class PgServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (superuser ``postgres``, trust auth)
    with a template database already at the catalogue's head revision."""

    port: int
    template: str = "sidecar_head"
    created: int = 0

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            for sql in statements:
                conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, hint: str, *, migrated: bool = True) -> str:
        """A new empty database (``migrated``: a copy of the template at head, so the
        catalogue's upgrade finds nothing to do); its name."""
        self.created += 1
        name = f"t{self.created}_" + "".join(c if c.isalnum() else "_" for c in hint).lower()[:40]
        template = self.template if migrated else "template0"
        # FILE_COPY: the quicker way for a small template (fsync is off)
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                    f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing what still holds a connection to it."""
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A throwaway PostgreSQL cluster for the session, started on first use and
    stopped at the end; run as user ``postgres`` when the tests run as root (the
    server refuses root), else as the current user. Skips, with the reason, where it
    cannot run."""
    if not INITDB:
        pytest.skip("PostgreSQL server binaries not installed (/usr/lib/postgresql/*/bin; "
                    "scripts/setup.sh --test installs them as root)")
    pytest.importorskip("psycopg")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no postgres system user to run PostgreSQL as")
        uid, gid = owner.pw_uid, owner.pw_gid
    else:
        uid, gid = os.geteuid(), os.getegid()
    bindir = Path(INITDB[-1]).parent
    # Not tmp_path: pytest's base directory is private to root.
    base = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
    os.chown(base, uid, gid)
    datadir = base / "data"
    port = free_port()

    def pg(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        as_user: dict[str, Any] = (
            {"user": uid, "group": gid, "extra_groups": []} if uid != os.geteuid() else {})
        return subprocess.run(
            [str(a) for a in args], **as_user, cwd=base, check=check, capture_output=True,
            text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        )

    initialised = False
    try:
        try:
            pg(bindir / "initdb", "-D", datadir, "-A", "trust", "-U", "postgres",
               "--no-sync", "-E", "UTF8", "--locale=C")
            initialised = True
            pg(bindir / "pg_ctl", "-D", datadir, "-w", "-t", "30", "-l", base / "log",
               "-o", f"-k {base} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
               "start")
        except subprocess.CalledProcessError as exc:
            log = (base / "log").read_text() if (base / "log").exists() else ""
            pytest.skip(f"throwaway PostgreSQL did not start: {exc.stderr or exc}{log[-500:]}")
        server = PgServer(port)
        server._admin(f'CREATE DATABASE "{server.template}"')
        engine = make_engine(server.url(server.template))
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        yield server
    finally:
        if initialised:  # always stop, even when start timed out half-way
            pg(bindir / "pg_ctl", "-D", datadir, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(base, ignore_errors=True)


def _database_url(catalogue: str, request: pytest.FixtureRequest) -> Iterator[str]:
    if catalogue == "sqlite":
        yield ""
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = server.create_database(request.node.name)
    yield server.url(name)
    server.drop_database(name)


@pytest.fixture
def database_url(catalogue: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """``database.url`` for this test's catalogue: "" (the default SQLite file in the
    data directory) or a fresh PostgreSQL database at head, dropped afterwards."""
    yield from _database_url(catalogue, request)


@pytest.fixture(scope="module")
def module_database_url(catalogue: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """:func:`database_url` for a module-scoped catalogue (one database per module and engine)."""
    yield from _database_url(catalogue, request)


def fail_writes(engine: Engine, when: str) -> Callable[[], None]:
    """A trigger that refuses every ``when`` (``INSERT``, ``UPDATE``) on ``instance`` as a
    constraint would (message ``injected``), in the engine's own dialect; returns what
    drops it again."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text(f"CREATE TRIGGER fail BEFORE {when} ON instance "
                              "BEGIN SELECT RAISE(ABORT, 'injected'); END;"))
        else:
            conn.execute(text("CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS $$ "
                              "BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = 'check_violation';"
                              " END $$"))
            conn.execute(text(f"CREATE TRIGGER fail BEFORE {when} ON instance "
                              "FOR EACH ROW EXECUTE FUNCTION fail()"))

    def drop() -> None:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER fail" + (
                "" if engine.dialect.name == "sqlite" else " ON instance")))

    return drop


@pytest.fixture
def config_factory(tmp_path: Path, database_url: str) -> Callable[..., Config]:
    """Build a validated Config with data in tmp_path; pass nested overrides. The
    catalogue is the test's ``catalogue`` engine (SQLite in the data directory unless
    the test is marked ``catalogue``)."""

    def make(overrides: dict[str, Any] | None = None) -> Config:
        import yaml

        data: dict[str, Any] = {
            "dicom": {"port": free_port()},
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
            "stability": {"stable_age": 60.0, "check_interval": 1.0},
            # DICOM tests do not need the CNN; embedding tests turn it on.
            "worker": {"enabled": False},
        }
        if database_url:
            data["database"] = {"url": database_url}
        _deep_update(data, overrides or {})
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, environ={})

    return make


@pytest.fixture
def config(config_factory: Callable[..., Config]) -> Config:
    """A default test configuration."""
    return config_factory()


@pytest.fixture
def running(config: Config) -> Iterator[Sidecar]:
    """A started sidecar (DICOM node + scheduler) on a free port."""
    app = Sidecar(config)
    app.start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture
def sidecar_factory() -> Iterator[Callable[[Config], Sidecar]]:
    """Start sidecars with custom configurations; all are stopped afterwards."""
    apps: list[Sidecar] = []

    def start(cfg: Config) -> Sidecar:
        app = Sidecar(cfg)
        app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


def file_meta(
    sop_class: str, sop_uid: str, transfer_syntax: str = ExplicitVRLittleEndian
) -> FileMetaDataset:
    """The File Meta of a Part-10 file naming ``sop_class``/``sop_uid``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def make_ct(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    rows: int = 64,
    cols: int = 64,
    seed: int = 0,
    patient_id: str = "PID-SECRET-123",
    patient_name: str = "Doe^Secret",
) -> Dataset:
    """A small valid CT Image Storage dataset with file meta (Explicit VR LE)."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240131"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC001"
    ds.StudyID = "1"
    ds.StudyDescription = "CT HEAD"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "AXIAL"
    ds.BodyPartExamined = "HEAD"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    return ds


BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def part10(ds: Dataset) -> bytes:
    """``ds`` as a Part-10 file image (preamble, File Meta, dataset)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_sr(
    study: str | None = None, series: str | None = None, patient_id: str = "PID-SR"
) -> Dataset:
    """A minimal Basic Text SR (a non-image object: stored, never embedded) with file meta."""
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    return ds


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip when this machine does not have it."""
    if not (SHARED_DATA / "dicom").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


def dcmtk_tool(name: str) -> str:
    """Full path of a DCMTK tool (never the pynetdicom console script of the same name)."""
    path = DCMTK_BIN / name
    if not path.exists():
        pytest.skip(f"DCMTK {name} not installed at {path} (apt-get install dcmtk)")
    return str(path)


#: storescu option that proposes one transfer syntax, so a file is sent as it is
#: (``-R`` alone proposes only uncompressed syntaxes and would make storescu try
#: to decompress the file).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK clients: TCP_NODELAY=1 (DCMTK keeps Nagle on otherwise, and
    each small PDU then waits for the peer's delayed ACK)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


# ------------------------------------------------------------------ C-FIND client
#: Message ID of every C-FIND that ``c_find`` sends (a C-CANCEL names it).
FIND_MSG_ID = 7
SIMILARITY_CREATOR = "PACS SIDECAR SIMILARITY"


@dataclass
class FindResult:
    """What a C-FIND returned: pending statuses and identifiers, then the final status."""

    pending: list[int]
    identifiers: list[Dataset]
    final: Dataset

    @property
    def status(self) -> int:
        return int(self.final.Status)

    @property
    def comment(self) -> str:
        return str(self.final.get("ErrorComment", ""))

    def values(self, keyword: str) -> list[Any]:
        return [ds.get(keyword) for ds in self.identifiers]

    def private(self, offset: int, creator: str = SIMILARITY_CREATOR) -> list[Any]:
        """Element ``offset`` of the (0099,xx) private block of ``creator`` in each match."""
        return [ds.private_block(0x0099, creator)[offset].value for ds in self.identifiers]


def c_find(
    address: tuple[str, int] | None,
    identifier: Dataset,
    model: str = StudyRootQueryRetrieveInformationModelFind,
    *,
    calling: str = "FINDSCU",
    called: str = "SIDECAR",
    ts: str | None = None,
    on_pending: Callable[[Any, int], None] | None = None,
) -> FindResult:
    """Send one C-FIND on a new association; ``on_pending(assoc, n)`` after each match.

    ``ts``: the one transfer syntax proposed (default: Explicit, then Implicit VR LE).
    """
    assert address is not None
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model, [ts] if ts else [ExplicitVRLittleEndian,
                                                     ImplicitVRLittleEndian])
    assoc = ae.associate(*address, ae_title=called)
    assert assoc.is_established
    pending: list[int] = []
    identifiers: list[Dataset] = []
    final: Dataset | None = None
    try:
        for status, ident in assoc.send_c_find(identifier, model, msg_id=FIND_MSG_ID):
            assert "Status" in status, "association aborted"
            if status.Status in (Status.PENDING, Status.PENDING_WARNING):
                pending.append(int(status.Status))
                identifiers.append(ident)
                if on_pending is not None:
                    on_pending(assoc, len(identifiers))
            else:
                final = status
    finally:
        assoc.release()
    assert final is not None
    return FindResult(pending, identifiers, final)
