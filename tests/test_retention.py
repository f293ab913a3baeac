"""Retention (``storage.keep_files``): released files, what keeps working, and fetch-back.

A real ``Sidecar`` (HTTP API and page on, the tiny deterministic embedder) receives
studies by C-STORE; the test runs the embedding and release jobs itself. Fetch-back
is tested against a real Orthanc (C-GET and C-MOVE), the sidecar's files having
been released after Orthanc forwarded the studies.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from lxml import etree
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import update

from scripts.orthanc_pacs import Modality, OrthancPacs, orthanc_available
from sidecar.archive.retention import Releaser
from sidecar.archive.store import Origin, Outcome
from sidecar.archive.verify import verify_storage
from sidecar.cli.main import main as cli
from sidecar.config import Config
from sidecar.db.models import INSTANCE
from sidecar.db.retention import RetentionRepository
from sidecar.embeddings.model import TinyEmbedder
from sidecar.service.app import Sidecar
from tests.conftest import free_port, part10, wait_for
from tests.test_audit import audit_file, event_id
from tests.test_search import ct_slice
from tests.test_ui import Site, c_store_all

#: Every test that reaches the catalogue runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.catalogue

BASES = {"R": [0, 1, 2, 3], "A": [0, 1, 2, 3], "B": [4, 5, 6, 7]}


def retention_config(config_factory: Callable[..., Config], **storage: object) -> Config:
    return config_factory({
        "storage": {"min_free_mb": 1, **storage},
        "stability": {"stable_age": 3600.0, "check_interval": 3600.0},
        "worker": {"enabled": True, "interval": 3600.0},  # the test runs the jobs
        "http": {"enabled": True, "port": free_port()},
        "query": {"default_k": 10},
        "logging": {"level": "WARNING"},
    })


def send_studies(app: Sidecar, address: tuple[str, int]) -> tuple[dict[str, str], dict[str, bytes]]:
    """Store the studies of ``BASES``; returns name -> Study UID, SOP UID -> part-10 bytes."""
    studies: dict[str, str] = {}
    files: dict[str, bytes] = {}
    datasets = []
    for name, bases in BASES.items():
        study, series = generate_uid(), generate_uid()
        studies[name] = study
        for i, b in enumerate(bases):
            ds = ct_slice(study, series, i + 1, i * 10.0, b, patient=f"P{name}",
                          date="20240110", description=f"study {name}")
            files[str(ds.SOPInstanceUID)] = part10(ds)
            datasets.append(ds)
    c_store_all(address, datasets)
    return studies, files


def embed_all(app: Sidecar) -> None:
    app.repository.mark_stable_studies(0.0)
    assert app.embedding is not None
    while not app.embedding.run_job().idle:
        pass


def dcm_files(app: Sidecar) -> list[Path]:
    return sorted(app.config.storage_dir.rglob("*.dcm"))


@pytest.fixture
def released(config_factory: Callable[..., Config]) -> Iterator[tuple[Site, dict[str, bytes]]]:
    """A sidecar with ``keep_files: until_embedded`` whose three studies were released."""
    cfg = retention_config(config_factory, keep_files="until_embedded")
    app = Sidecar(cfg, embedder=TinyEmbedder())
    address = app.start()
    try:
        studies, files = send_studies(app, address)
        assert app.http is not None and app.http.address is not None
        host, port = app.http.address
        site = Site(app, f"http://{host}:{port}", studies)
        # not stable yet: nothing is released
        app.release()
        assert len(dcm_files(app)) == 12
        embed_all(app)
        sop = next(iter(files))
        before = site.get(f"/ui/thumbnails/{sop}/0.png")
        assert before.status == 200
        site.files["bytes"] = str(sum(p.stat().st_size for p in dcm_files(app))).encode()
        app.release()
        site.files["thumbnail"] = before.body
        yield site, files
    finally:
        app.stop()


def test_files_go_once_embedded_and_search_page_verify_and_reindex_keep_working(
    released: tuple[Site, dict[str, bytes]],
) -> None:
    site, files = released
    app = site.app
    assert dcm_files(app) == []  # no second copy left
    counts = RetentionRepository(app.engine).counts(
        app.embedding.model.model_id if app.embedding else "", max_attempts=3)
    assert counts.released == 12 and counts.waiting_instances == 0
    assert counts.released_bytes == int(site.files["bytes"])  # as stored before the release
    # the catalogue and the vectors stay: similarity search still ranks A first for R
    answer = site.get("/v1/similar", study=site.studies["R"], k=5)
    assert answer.status == 200, answer.text
    hits = json.loads(answer.body)["hits"]
    assert [h["study_instance_uid"] for h in hits][:1] == [site.studies["A"]]
    # the page's thumbnails are the previews kept before the release, same pixels
    sop = next(iter(files))
    after = site.get(f"/ui/thumbnails/{sop}/0.png")
    assert after.status == 200 and after.headers["content-type"] == "image/png"
    old = np.asarray(Image.open(BytesIO(site.files["thumbnail"])))
    new = np.asarray(Image.open(BytesIO(after.body)))
    assert old.shape == new.shape and np.array_equal(old, new)
    assert Image.open(BytesIO(after.body)).text["window"]
    page = site.get(f"/ui/studies/{site.studies['R']}")
    assert page.status == 200 and "/ui/thumbnails/" in page.text
    # verify: released files are counted, not missing
    report = verify_storage(app.config, app.engine, min_age=0.0)
    assert report.released == 12 and report.damaged == 0 and report.clean, report.to_dict()
    # reindex from stored vectors needs no pixels
    assert app.embedding is not None
    assert app.embedding.index.rebuild() == 12
    # deleting a study removes its kept previews too
    previews = app.config.previews_dir / site.studies["B"]
    assert previews.is_dir() and len(list(previews.rglob("*.png"))) == 4
    conf = app.config.data_dir.parent / "sidecar.yaml"
    deleted = CliRunner().invoke(cli, ["delete-study", site.studies["B"], "--yes",
                                       "--config", str(conf)])
    assert deleted.exit_code == 0, deleted.output
    assert not previews.exists()
    assert site.get(f"/ui/thumbnails/{next(iter(files))}/0.png").status == 200  # others stay


def test_reembedding_waits_for_the_pixels_and_a_resend_restores_them(
    released: tuple[Site, dict[str, bytes]],
) -> None:
    site, files = released
    app = site.app
    emb = app.embedding
    assert emb is not None
    model = emb.model.model_id
    assert emb.vectors.requeue(model) == 12  # what `reindex --reembed` does
    repo = RetentionRepository(app.engine)
    waiting = repo.counts(model, max_attempts=3)
    assert (waiting.waiting_series, waiting.waiting_instances) == (3, 12)
    # the worker leaves series without pixels alone: nothing fails, nothing is embedded
    stats = emb.run_job()
    assert stats.slices_embedded == 0 and stats.instances_failed == 0
    # the PACS sends study R again: its files are restored, then embedded, then released
    r_sops = [s for s, data in files.items()
              if str(dcmread(BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
              == site.studies["R"]]
    for sop in r_sops:
        result = app.store.store(files[sop], None, Origin("PACS", "127.0.0.1"))
        assert result.outcome is Outcome.RESTORED and result.path.read_bytes() == files[sop]
    assert repo.counts(model, max_attempts=3).waiting_instances == 8
    stats = emb.run_job()
    assert stats.slices_embedded == 4 and stats.instances_failed == 0
    app.release()
    assert dcm_files(app) == []
    # so does /metrics
    metrics = site.get("/metrics").text
    assert "sidecar_released_files 12.0" in metrics
    assert "sidecar_instances_waiting_for_pixels 8.0" in metrics
    # `sidecar status` says what waits and why
    conf = app.config.data_dir.parent / "sidecar.yaml"
    result = CliRunner().invoke(cli, ["status", "--config", str(conf)])
    assert result.exit_code == 0, result.output
    assert "released files (storage.keep_files: until_embedded): 12" in result.output
    assert "waiting for their pixels: 8 instance(s) in 2 series" in result.output
    assert "NO storage.fetch" in result.output


def test_keep_days_releases_only_after_that_many_days(
    config_factory: Callable[..., Config],
) -> None:
    cfg = retention_config(config_factory, keep_files=7)
    app = Sidecar(cfg, embedder=TinyEmbedder())
    address = app.start()
    try:
        send_studies(app, address)
        embed_all(app)
        assert app.embedding is not None
        releaser = Releaser(cfg, app.engine, lambda: app.embedding.model.model_id  # type: ignore[union-attr]
                            , keep=app.embedding.keep_previews)
        assert releaser.run_once().released == 0 and len(dcm_files(app)) == 12
        with app.engine.begin() as conn:  # four of them arrived eight days ago
            first = sorted(conn.execute(INSTANCE.select()).all(), key=lambda r: r.id)[:4]
            conn.execute(update(INSTANCE).where(INSTANCE.c.id.in_([r.id for r in first]))
                         .values(received_at=dt.datetime.now() - dt.timedelta(days=8)))
        stats = releaser.run_once()
        assert stats.released == 4 and stats.previews == 4 and len(dcm_files(app)) == 8
    finally:
        app.stop()


def test_an_interrupted_release_is_finished_at_the_next_start(
    config_factory: Callable[..., Config],
) -> None:
    cfg = retention_config(config_factory, keep_files="until_embedded")
    app = Sidecar(cfg, embedder=TinyEmbedder())
    address = app.start()
    try:
        send_studies(app, address)
        embed_all(app)
        repo = RetentionRepository(app.engine)
        assert app.embedding is not None
        due = repo.due(app.embedding.model.model_id, received_before=dt.datetime.now(),
                       volumes=False, limit=100)
        assert len(due) == 12
        # the commit happened, the unlink did not (a crash between them)
        repo.mark_released(due, now=dt.datetime.now(dt.UTC).replace(tzinfo=None)
                           + dt.timedelta(seconds=5))
        report = verify_storage(cfg, app.engine, min_age=0.0)
        assert len(report.released_leftovers) == 12 and not report.clean
        assert report.damaged == 0
        stats = Releaser(cfg, app.engine, lambda: "unused").run_once()
        assert stats.leftovers_removed == 12 and dcm_files(app) == []
        assert verify_storage(cfg, app.engine, min_age=0.0).clean
    finally:
        app.stop()


def test_keep_files_is_checked() -> None:
    with pytest.raises(Exception, match="keep_files"):
        Config.model_validate({"storage": {"keep_files": "never"}})
    with pytest.raises(Exception, match="keep_files"):
        Config.model_validate({"storage": {"keep_files": -1}})
    assert Config.model_validate({"storage": {"keep_files": "30"}}).storage.keep_days == 30.0
    assert Config().storage.keep_files == "forever" and not Config().storage.releases


# ------------------------------------------------------------------ fetch-back
@pytest.mark.orthanc
@pytest.mark.catalogue("sqlite")  # the catalogue side of a return is the re-send's, run on both
@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_released_files_come_back_from_orthanc_for_reembedding(
    method: str, config_factory: Callable[..., Config], tmp_path: Path,
) -> None:
    if not orthanc_available():
        pytest.skip("Orthanc not installed at /usr/sbin/Orthanc (apt-get install orthanc)")
    port = free_port()
    with OrthancPacs(tmp_path / "orthanc", sidecar=Modality("SIDECAR", "127.0.0.1", port),
                     stable_age=1) as pacs:
        cfg = config_factory({
            "dicom": {"port": port},
            "storage": {"min_free_mb": 1, "keep_files": "until_embedded",
                        "fetch": {"ae_title": pacs.ae_title, "host": "127.0.0.1",
                                  "port": pacs.dicom_port, "method": method, "timeout": 30}},
            "stability": {"stable_age": 3600.0, "check_interval": 3600.0},
            "worker": {"enabled": True, "interval": 3600.0},
            "logging": {"level": "WARNING"},
        })
        app = Sidecar(cfg, embedder=TinyEmbedder())
        app.start()
        try:
            originals: dict[str, bytes] = {}
            study, series = generate_uid(), generate_uid()
            for i, b in enumerate([0, 1, 2, 3]):
                ds = ct_slice(study, series, i + 1, i * 10.0, b, patient="PF",
                              date="20240110", description="fetch-back")
                originals[str(ds.SOPInstanceUID)] = part10(ds)
                pacs.upload(originals[str(ds.SOPInstanceUID)])
            # Orthanc forwards the stable study to the sidecar (its Lua callback)
            wait_for(lambda: app.repository.status().instances_by_state.get("pending", 0) == 4,
                     60, "Orthanc to forward the study")
            embed_all(app)
            app.release()
            assert dcm_files(app) == []
            assert app.embedding is not None and app.fetch_back is not None
            model = app.embedding.model.model_id
            assert app.embedding.vectors.requeue(model) == 4
            app.fetch()  # the scheduled job's body
            repo = RetentionRepository(app.engine)
            wait_for(lambda: repo.counts(model, max_attempts=3).released == 0, 30,
                     "the released files to come back")
            restored = dcm_files(app)
            assert len(restored) == 4
            for path in restored:
                back = dcmread(path)
                sop = str(back.SOPInstanceUID)
                first = dcmread(BytesIO(originals[sop]))
                assert back.PixelData == first.PixelData and back.StudyInstanceUID == study
            stats = app.embedding.run_job()
            assert stats.slices_embedded == 4 and stats.instances_failed == 0
            app.release()
            assert dcm_files(app) == []
        finally:
            app.stop()
    # audited: both releases (Instances Accessed, Delete, the local copies), and for C-GET
    # the instances the sidecar's own association brought back (Instances Transferred)
    xml = [etree.fromstring(m) for m in audit_file(cfg)]
    released = [m for m in xml if event_id(m)[0] == "110103"
                and "keep_files" in (m.findtext("EventIdentification/EventOutcomeDescription")
                                     or "")]
    assert len(released) == 2
    study_obj = released[0].find("ParticipantObjectIdentification[@ParticipantObjectID="
                                 f"'{study}']")
    assert study_obj is not None and study_obj.get("ParticipantObjectDataLifeCycle") == "15"
    fetched = [m for m in xml if event_id(m)[0] == "110104"
               and m.find(f"ActiveParticipant[@UserID='{pacs.ae_title}']") is not None]
    # C-MOVE: Orthanc's associations to the receiver (its forward and the move);
    # C-GET: its forward and the sidecar's own fetch
    assert len(fetched) == 2
