"""End to end with the real built-in model: C-STORE in, the scheduled worker embeds,
the vectors are in the index and map back to their studies.

A running node (``Sidecar`` in-process, worker on, studies stable after 0.2 s)
receives series from pynetdicom or DCMTK ``storescu``. The built-in weights are
an untrained random initialisation, so the tests assert only what such a model
delivers: a stored slice vector finds its own label first, and a slice's nearest
other slice is one of its own series when the series are visibly different
(discs against noise; a CT head against one MR image in nine transfer syntaxes).
No test sleeps to synchronise: waiting is polling a condition with a deadline.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sidecar.config import Config
from sidecar.db.models import Instance, InstanceState, Series, SliceVector, Study
from sidecar.dicom.statuses import Status
from sidecar.embeddings.codec import from_blob
from sidecar.embeddings.index_files import read_saved_facts
from sidecar.service.app import Sidecar
from tests.conftest import (
    CT_IMAGE_STORAGE,
    STORESCU_PROPOSE,
    dcmtk_env,
    dcmtk_tool,
    make_ct,
    wait_for,
)

LIVE = {
    "worker": {"enabled": True, "interval": 0.2},
    "stability": {"stable_age": 0.2, "check_interval": 0.1},
    "index": {"save_interval": 0.5},
    # every slice: the tests below count and compare slices one by one
    "preprocess": {"slice_spacing_mm": 0, "max_slices_per_series": 64},
}


# --------------------------------------------------------------------- helpers
@pytest.fixture
def live(config_factory: Callable[..., Config]) -> Iterator[Callable[[], Sidecar]]:
    """Start sidecars (real model, worker on) on the test's data directory."""
    apps: list[Sidecar] = []

    def start() -> Sidecar:
        app = Sidecar(config_factory(LIVE))
        app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        stop(app)


def stop(app: Sidecar) -> None:
    if app.scheduler.running:
        app.stop()


def send(app: Sidecar, datasets: list[Dataset]) -> None:
    """C-STORE ``datasets`` with pynetdicom; every store must succeed."""
    assert app.address is not None
    ae = AE(ae_title="E2ESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate(*app.address, ae_title=app.config.dicom.ae_title)
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == Status.SUCCESS
    finally:
        assoc.release()


def storescu(app: Sidecar, files: list[Path], *options: str) -> None:
    """Send ``files`` with DCMTK storescu (full path, Nagle off); it must succeed."""
    assert app.address is not None
    host, port = app.address
    res = subprocess.run(
        [dcmtk_tool("storescu"), *options, "-aet", "DCMTKSCU", "-aec",
         app.config.dicom.ae_title, host, str(port), *map(str, files)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stderr


@dataclass(frozen=True)
class Row:
    sop: str
    series_uid: str
    study_uid: str
    vector: np.ndarray


def vector_rows(app: Sidecar) -> dict[int, Row]:
    """Slice vectors of the running model, mapped back: label -> instance/series/study."""
    assert app.embedding is not None
    dim = app.embedding.embedder.dim
    q = (
        select(SliceVector.id, Instance.sop_instance_uid, Series.series_instance_uid,
               Study.study_instance_uid, SliceVector.vector)
        .join(Instance, Instance.id == SliceVector.instance_pk)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(SliceVector.model_id == app.embedding.embedder.model_id)
    )
    with Session(app.engine) as s:
        return {
            label: Row(sop, series, study, from_blob(blob, dim))
            for label, sop, series, study, blob in s.execute(q).tuples()
        }


def all_embedded(app: Sidecar, n: int) -> bool:
    """``n`` instances embedded and the index holding exactly the stored vectors."""
    assert app.embedding is not None
    with Session(app.engine) as s:
        done = s.scalar(
            select(func.count()).select_from(Instance)
            .where(Instance.state == InstanceState.EMBEDDED)
        )
    if done != n:
        return False
    emb = app.embedding
    in_index = {int(x) for x in emb.index.index.labels()}
    return bool(in_index) and in_index == emb.vectors.labels(emb.embedder.model_id)


def search(app: Sidecar, rows: dict[int, Row], k: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Each stored vector as a query against the serving index."""
    assert app.embedding is not None
    assert app.embedding.serving is app.embedding.index  # no model change in these tests
    labels = sorted(rows)
    found, scores = app.embedding.serving.index.search(
        np.stack([rows[x].vector for x in labels]), k=k
    )
    return found, scores, labels


def noise_series(n: int, seed0: int) -> list[Dataset]:
    """make_ct's seeded noise slices, one new series in a new study."""
    study, series = generate_uid(), generate_uid()
    return [make_ct(study_uid=study, series_uid=series, instance_number=i + 1, seed=seed0 + i)
            for i in range(n)]


def disc_series(n: int) -> list[Dataset]:
    """Slices of a bright disc that moves round the centre, one new series in a new study."""
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = make_ct(study_uid=study, series_uid=series, instance_number=i + 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
        yy, xx = np.mgrid[0:rows, 0:cols]
        angle = 2 * np.pi * i / n
        cy, cx = rows / 2 + rows / 4 * np.sin(angle), cols / 2 + cols / 4 * np.cos(angle)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (rows / 6) ** 2
        ds.PixelData = np.where(disc, 1300, 0).astype(np.uint16).tobytes()
        out.append(ds)
    return out


def assert_neighbours_in_own_series(app: Sidecar, rows: dict[int, Row]) -> None:
    found, scores, labels = search(app, rows, k=2)
    for i, label in enumerate(labels):
        assert found[i][0] == label, "a slice finds itself first"
        assert scores[i][0] > 0.999
        neighbour = rows[int(found[i][1])]
        assert neighbour.series_uid == rows[label].series_uid, (rows[label].sop, neighbour.sop)


# ----------------------------------------------------------------------- tests
def test_cstore_series_is_embedded_searchable_and_survives_a_restart(
    live: Callable[[], Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    app = live()
    assert app.embedding is not None
    datasets = noise_series(12, seed0=0)
    send(app, datasets)

    wait_for(lambda: all_embedded(app, 12), 60, what="12 instances embedded and indexed")

    rows = vector_rows(app)
    assert len(rows) == 12
    sent = {str(ds.SOPInstanceUID): ds for ds in datasets}
    assert {r.sop for r in rows.values()} == set(sent)
    for row in rows.values():  # label -> slice_vector -> instance -> series -> study
        assert row.study_uid == sent[row.sop].StudyInstanceUID
        assert row.series_uid == sent[row.sop].SeriesInstanceUID
    found, scores, labels = search(app, rows, k=3)
    assert [int(f[0]) for f in found] == labels, "each slice vector finds its own label first"
    assert (scores[:, 0] > 0.999).all()
    assert (scores[:, 0] > scores[:, 1]).all()
    first = labels[0]
    hit = rows[int(found[0][0])]
    assert (hit.sop, hit.study_uid) == (rows[first].sop, datasets[0].StudyInstanceUID)
    with Session(app.engine) as s:
        assert s.scalar(select(Study.stable)) is True

    config = app.config
    stop(app)  # saves the index
    saved = read_saved_facts(config.index_dir / app.embedding.embedder.model_id)
    assert saved["count"] == 12
    with caplog.at_level(logging.INFO, logger="sidecar.service"):
        again = live()
        # the search's in-memory vectors are loaded at start, before any query
        wait_for(lambda: again.search.cache_loaded, 60, what="search vectors loaded at start")
        wait_for(lambda: any(m.startswith("search vectors loaded in") for m in caplog.messages),
                 timeout=60, what="the log line")
    assert again.embedding is not None
    model_id = again.embedding.embedder.model_id
    assert f"index for model {model_id}: 12 vectors (loaded)" in caplog.messages
    assert {int(x) for x in again.embedding.index.index.labels()} == set(rows)
    assert search(again, rows, k=1)[0].ravel().tolist() == labels


def test_slices_find_their_own_series_first(live: Callable[[], Sidecar]) -> None:
    app = live()
    discs, noise = disc_series(12), noise_series(12, seed0=100)
    send(app, discs)
    send(app, noise)

    wait_for(lambda: all_embedded(app, 24), 60, what="24 instances embedded and indexed")

    rows = vector_rows(app)
    assert len(rows) == 24
    studies = {r.study_uid for r in rows.values()}
    assert studies == {discs[0].StudyInstanceUID, noise[0].StudyInstanceUID}
    assert_neighbours_in_own_series(app, rows)


@pytest.mark.dcmtk
@pytest.mark.shared_data
def test_storescu_real_ct_and_mr_studies(live: Callable[[], Sidecar], shared_data: Path) -> None:
    """dcm_qa_ct (a GE head CT, 28 slices) and dcm_qa_ts (one MR slice in nine transfer
    syntaxes, one series) sent by DCMTK, embedded and searched."""
    ct_files = sorted((shared_data / "dicom" / "dcm_qa_ct" / "In").rglob("*.dcm"))
    mr_files = sorted((shared_data / "dicom" / "dcm_qa_ts" / "In").glob("*.dcm"))
    if not ct_files or not mr_files:
        pytest.skip("dcm_qa_ct or dcm_qa_ts missing from the shared data")
    headers = {f: dcmread(f, stop_before_pixels=True) for f in ct_files + mr_files}
    study_of = {str(h.SOPInstanceUID): str(h.StudyInstanceUID) for h in headers.values()}
    app = live()

    storescu(app, ct_files)
    by_ts: dict[str, list[Path]] = {}
    for f in mr_files:
        by_ts.setdefault(str(headers[f].file_meta.TransferSyntaxUID), []).append(f)
    for ts, group in sorted(by_ts.items()):
        if ts not in STORESCU_PROPOSE:
            pytest.skip(f"no storescu option for transfer syntax {ts}")
        storescu(app, group, "-R", STORESCU_PROPOSE[ts])

    n = len(ct_files) + len(mr_files)
    wait_for(lambda: all_embedded(app, n), 60, what=f"{n} instances embedded and indexed")

    rows = vector_rows(app)
    assert len(rows) == n
    for row in rows.values():
        assert row.study_uid == study_of[row.sop]
    ct = {x for x, r in rows.items() if r.study_uid == headers[ct_files[0]].StudyInstanceUID}
    mr = set(rows) - ct
    assert (len(ct), len(mr)) == (len(ct_files), len(mr_files))

    found, scores, labels = search(app, rows, k=len(mr_files))
    for i, label in enumerate(labels):
        if label in ct:  # distinct slices: each finds itself first
            assert int(found[i][0]) == label
        else:  # the same image nine times: all nine first, equally close
            assert {int(x) for x in found[i]} == mr
            assert scores[i][0] == pytest.approx(scores[i][-1], abs=1e-3)
        assert scores[i][0] > 0.999
    # the nearest other slice belongs to the same series
    found, _, labels = search(app, rows, k=2)
    for i, label in enumerate(labels):
        other = int(found[i][1]) if int(found[i][0]) == label else int(found[i][0])
        assert (other in ct) == (label in ct), (rows[label].sop, rows[other].sop)
