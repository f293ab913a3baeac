"""The embedding worker, the index service and the embedding commands.

Worker and index tests use the tiny deterministic embedder on a real catalogue
(SQLite) and real stored files; the crash tests run the embedding parts in a
child process and SIGKILL it at the dangerous moments; the command tests run
``sidecar embed`` / ``reindex`` / ``status`` with click's runner and the real
built-in model. No test sleeps to synchronise: waiting is polling a condition
with a deadline, and retry times are tested with a fake clock.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from sidecar.archive.store import InstanceStore, Origin
from sidecar.cli.main import main
from sidecar.config import Config
from sidecar.db.connect import open_catalogue
from sidecar.db.models import (
    Instance,
    InstanceState,
    Series,
    SeriesVector,
    SliceVector,
    Study,
    StudyVector,
)
from sidecar.db.repository import utcnow
from sidecar.db.vectors import NewVector, VectorRepository
from sidecar.embeddings import preprocess
from sidecar.embeddings.codec import from_blob, to_blob
from sidecar.embeddings.index_files import read_saved_facts
from sidecar.embeddings.model import TinyEmbedder, TorchEmbedder
from sidecar.embeddings.network import SliceNetV1, SliceNetV1Params
from sidecar.embeddings.service import IndexBusy, IndexService, OpenReport
from sidecar.service.lifecycle import Embedding
from tests.conftest import make_ct, part10, wait_for
from tests.conftest import make_sr as make_sr_base
from tests.test_damaged_pixels import make_rle_that_panics

#: Every test that reaches the catalogue runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.catalogue

REPO = Path(__file__).resolve().parent.parent
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


# --------------------------------------------------------------------- helpers
def ct_series(n: int, *, seed0: int = 0, first: int = 1) -> list[Dataset]:
    """``n`` CT slices of a new series in a new study, 1 mm apart (make_ct puts slice
    ``i`` at z = i mm); pixels seeded ``seed0 + i`` (give series distinct ``seed0``)."""
    study, series = generate_uid(), generate_uid()
    return [
        make_ct(study_uid=study, series_uid=series, instance_number=i, seed=seed0 + i)
        for i in range(first, first + n)
    ]



def make_sr(study: str, series: str) -> Dataset:
    """A Basic Text SR of the given study and series (skipped by the worker)."""
    return make_sr_base(study, series, patient_id="PID-SECRET-123")


@dataclass(frozen=True)
class InstanceRow:
    sop: str
    number: int | None
    state: InstanceState
    attempts: int
    error: str
    next_attempt_at: dt.datetime | None
    embedded_at: dt.datetime | None
    file_path: str


@dataclass(frozen=True)
class VectorRow:
    label: int
    sop: str
    frame: int
    position_mm: float | None
    series_uid: str
    study_uid: str
    blob: bytes
    consistent: bool  # the row's series/study keys are those of its instance


class Node:
    """Catalogue, storage and embedding parts on one data directory, as a command builds them."""

    def __init__(self, config: Config, embedder: Any = None) -> None:
        self.config = config
        self.engine, self.repo = open_catalogue(config)
        self.store = InstanceStore(config, self.repo)
        self.embedder = embedder if embedder is not None else TinyEmbedder()
        self.embedding: Embedding | None = None

    # ---------------------------------------------------------------- parts
    def open(self) -> OpenReport:
        """Build the embedding parts and open them (``Embedding.open``); returns what
        the index service's ``open`` reported."""
        self.embedding = Embedding(self.config, self.engine, self.embedder)
        service = self.embedding.index
        reports: list[OpenReport] = []
        real_open = service.open

        def open_and_report() -> OpenReport:
            reports.append(real_open())
            return reports[-1]

        service.open = open_and_report  # type: ignore[method-assign]
        self.embedding.open()
        (report,) = reports
        return report

    def close(self) -> None:
        """Save the index and release its lock."""
        if self.embedding is not None:
            self.embedding.close()
            self.embedding = None

    @property
    def emb(self) -> Embedding:
        assert self.embedding is not None, "open() first"
        return self.embedding

    @property
    def model_id(self) -> str:
        return str(self.embedder.model_id)

    # -------------------------------------------------------------- actions
    def put(self, *datasets: Dataset) -> None:
        for ds in datasets:
            self.store.store(part10(ds), None, Origin(ae_title="TEST", host="test"))

    def stabilise(self) -> int:
        """Mark every study stable now."""
        return self.repo.mark_stable_studies(60.0, now=utcnow() + dt.timedelta(minutes=5))

    def embed_all(self) -> int:
        """Run the worker until nothing is due; returns the number of runs that did work."""
        runs = 0
        while self.emb.worker.run_once().series:
            runs += 1
            assert runs < 50, "worker does not converge"
        return runs

    # ---------------------------------------------------------------- reads
    def instances(self) -> dict[str, InstanceRow]:
        with Session(self.engine) as s:
            return {
                i.sop_instance_uid: InstanceRow(
                    i.sop_instance_uid, i.instance_number, InstanceState(i.state), i.attempts,
                    i.error, i.next_attempt_at, i.embedded_at, i.file_path,
                )
                for i in s.scalars(select(Instance))
            }

    def states(self) -> dict[str, InstanceState]:
        return {uid: row.state for uid, row in self.instances().items()}

    def vectors(self) -> dict[int, VectorRow]:
        """Every slice vector row of the active model, mapped back to its instance."""
        q = (
            select(SliceVector, Instance, Series, Study)
            .join(Instance, Instance.id == SliceVector.instance_pk)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .where(SliceVector.model_id == self.model_id)
        )
        with Session(self.engine) as s:
            return {
                v.id: VectorRow(
                    v.id, i.sop_instance_uid, v.frame, v.position_mm,
                    se.series_instance_uid, st.study_instance_uid, v.vector,
                    v.series_pk == se.id and v.study_pk == st.id,
                )
                for v, i, se, st in s.execute(q).tuples()
            }

    def index_labels(self) -> set[int]:
        return {int(x) for x in self.emb.index.index.labels()}

    def db_labels(self) -> set[int]:
        return self.emb.vectors.labels(self.model_id)

    def mean_vectors(self) -> tuple[dict[str, tuple[int, bytes]], dict[str, tuple[int, bytes]]]:
        """Series and study mean vectors: UID -> (slices, blob)."""
        with Session(self.engine) as s:
            series = {
                uid: (n, blob)
                for uid, n, blob in s.execute(
                    select(Series.series_instance_uid, SeriesVector.slices, SeriesVector.vector)
                    .join(Series, Series.id == SeriesVector.series_pk)
                    .where(SeriesVector.model_id == self.model_id)
                ).tuples()
            }
            studies = {
                uid: (n, blob)
                for uid, n, blob in s.execute(
                    select(Study.study_instance_uid, StudyVector.slices, StudyVector.vector)
                    .join(Study, Study.id == StudyVector.study_pk)
                    .where(StudyVector.model_id == self.model_id)
                ).tuples()
            }
        return series, studies

    def search(self, rows: dict[int, VectorRow], k: int) -> dict[int, list[int]]:
        """Top-k labels of the live index for each stored vector as query."""
        labels = sorted(rows)
        queries = np.stack([from_blob(rows[x].blob, self.embedder.dim) for x in labels])
        found, _ = self.emb.index.index.search(queries, k=k)
        return {x: [int(y) for y in found[i]] for i, x in enumerate(labels)}

    def dispose(self) -> None:
        self.close()
        self.engine.dispose()


@pytest.fixture
def node_factory(config_factory: Callable[..., Config]) -> Iterator[Callable[..., Node]]:
    """Nodes on the test's data directory; all are closed afterwards."""
    nodes: list[Node] = []

    def make(overrides: dict[str, Any] | None = None, embedder: Any = None) -> Node:
        node = Node(config_factory(overrides), embedder)
        nodes.append(node)
        return node

    yield make
    for node in reversed(nodes):
        node.dispose()


def every_slice(**extra: Any) -> dict[str, Any]:
    """Overrides: embed every slice (no spacing, cap above the series sizes used)."""
    pre = {"slice_spacing_mm": 0, "max_slices_per_series": 64}
    pre.update(extra)
    return {"preprocess": pre}


def assert_consistent(node: Node) -> dict[int, VectorRow]:
    """Index labels == DB keys, each key maps back through instance/series/study."""
    rows = node.vectors()
    assert node.index_labels() == node.db_labels() == set(rows)
    assert all(r.consistent for r in rows.values())
    keys = [(r.sop, r.frame) for r in rows.values()]
    assert len(keys) == len(set(keys)), "a slice has two vectors"
    return rows


# ------------------------------------------------------------ worker: basics
def test_stable_series_is_embedded_and_maps_back(node_factory: Callable[..., Node]) -> None:
    node = node_factory(every_slice())
    a = ct_series(12)
    b = ct_series(5, seed0=100)
    node.put(*a, *b)
    assert node.stabilise() == 2
    node.open()

    stats = node.emb.worker.run_once()

    assert (stats.series, stats.instances_embedded, stats.instances_failed) == (2, 17, 0)
    assert stats.slices_embedded == 17
    assert set(node.states().values()) == {InstanceState.EMBEDDED}
    rows = assert_consistent(node)
    assert len(rows) == 17
    sent = {str(ds.SOPInstanceUID): ds for ds in a + b}
    for row in rows.values():
        ds = sent[row.sop]
        assert row.study_uid == ds.StudyInstanceUID
        assert row.series_uid == ds.SeriesInstanceUID
        assert row.frame == 0
        assert row.position_mm == pytest.approx(float(ds.InstanceNumber))
    # each stored vector finds its own label first (the index holds what the DB holds)
    for label, found in node.search(rows, k=1).items():
        assert found == [label]

    series_means, study_means = node.mean_vectors()
    assert set(series_means) == {a[0].SeriesInstanceUID, b[0].SeriesInstanceUID}
    assert set(study_means) == {a[0].StudyInstanceUID, b[0].StudyInstanceUID}
    for group, means in ((a, series_means[a[0].SeriesInstanceUID]),
                         (a, study_means[a[0].StudyInstanceUID]),
                         (b, series_means[b[0].SeriesInstanceUID])):
        slices, blob = means
        assert slices == len(group)
        mean = from_blob(blob, node.embedder.dim)
        assert np.linalg.norm(mean) == pytest.approx(1.0, abs=2e-3)
        uids = {str(ds.SOPInstanceUID) for ds in group}
        members = np.stack([from_blob(r.blob, node.embedder.dim)
                            for r in rows.values() if r.sop in uids])
        expected = members.mean(axis=0)
        expected /= np.linalg.norm(expected)
        np.testing.assert_allclose(mean, expected, atol=3e-3)


class RecordingEmbedder:
    """Passes batches on to ``inner`` and records their shapes."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.shapes = inner, []
        self.model_id, self.dim, self.input_size = inner.model_id, inner.dim, inner.input_size
        self.channels = inner.channels

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(tuple(batch.shape))
        return self.inner.embed(batch)


def test_three_channel_model_gets_colour_in_colour_and_grey_replicated(
    node_factory: Callable[..., Node],
) -> None:
    torch.manual_seed(0)
    net = SliceNetV1(SliceNetV1Params(in_channels=3, stem_width=8, widths=(8, 16), depths=(1, 1),
                                      separable=(False, False), dim=16))
    inner = TorchEmbedder(net, model_id="rgb-test", input_size=64, channels=3)
    embedder = RecordingEmbedder(inner)
    node = node_factory(every_slice(), embedder=embedder)
    colour = dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    grey = ct_series(3)
    node.put(colour, *grey)
    node.stabilise()
    node.open()

    stats = node.emb.worker.run_once()

    assert (stats.instances_embedded, stats.instances_failed) == (4, 0)
    assert embedder.shapes and all(len(s) == 4 and s[1:] == (3, 64, 64) for s in embedder.shapes)
    rows = {r.sop: r for r in assert_consistent(node).values()}
    cfg = node.config.preprocess
    for ds in (colour, grey[0]):
        stored = from_blob(rows[str(ds.SOPInstanceUID)].blob, inner.dim)
        expected = inner.embed(preprocess.prepare(ds, cfg, 64, channels=3))[0]
        np.testing.assert_allclose(stored, expected, atol=1e-3)  # blobs are float16
    # What the model saw of the colour image is colour, not its luminance replicated.
    seen = preprocess.prepare(colour, cfg, 64, channels=3)
    luminance = np.repeat(preprocess.prepare(colour, cfg, 64)[:, None], 3, axis=1)
    assert float(np.abs(seen - luminance).max()) > 0.5


def test_ingest_watch_sees_arrivals_within_its_window() -> None:
    from sidecar.embeddings.worker import IngestWatch

    now = [100.0]
    latest: list[int | None] = [None]
    watch = IngestWatch(lambda: latest[0], window=2.0, clock=lambda: now[0])
    assert not watch.active()  # the first probe only learns where things are
    latest[0] = 7  # the first instance arrives
    assert watch.active()
    now[0] += 1.5
    assert watch.active()  # within the window
    now[0] += 1.0
    assert not watch.active()  # 2.5 s without a new instance
    latest[0] = 8
    assert watch.active()

    def broken() -> int:
        raise RuntimeError("database gone")

    assert not IngestWatch(broken).active()  # no pacing rather than a failed job


class _Waits:
    """Stands in for the Embedding's stop event: records the pauses, never sleeps."""

    def __init__(self) -> None:
        self.pauses: list[float] = []

    def is_set(self) -> bool:
        return False

    def wait(self, timeout: float) -> bool:
        self.pauses.append(timeout)
        return False


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_worker_pauses_after_each_series_while_instances_arrive(
    node_factory: Callable[..., Node], monkeypatch: pytest.MonkeyPatch, share: float
) -> None:
    from sidecar.service import lifecycle as app

    node = node_factory({**every_slice(), "worker": {"ingest_share": share}})
    node.put(*ct_series(4), *ct_series(4, seed0=50), *ct_series(4, seed0=90))
    assert node.stabilise() == 3
    node.open()
    waits = _Waits()
    monkeypatch.setattr(node.emb, "_cancel", waits)
    # quiet: nothing arrives, no pause
    node.emb.worker.run_once(max_instances=4)
    assert waits.pauses == []

    # a study keeps arriving (one instance after every series): each series is paced
    assert node.emb._ingest.active() is False
    arriving = ct_series(3, seed0=200)
    busy: list[float] = []
    real = node.emb.pace

    def recording(seconds: float) -> float:
        busy.append(seconds)
        return real(seconds)

    node.emb.worker._pace = recording
    stats = node.emb.worker.run_once(progress=lambda _n: node.put(arriving.pop()))
    assert stats.series == 2 and len(busy) == 2
    if share == 1.0:
        assert waits.pauses == [] and stats.stage_seconds.get("paused", 0.0) == 0.0
    else:  # working half the time: pause as long as the series took (at most 5 s)
        assert waits.pauses == pytest.approx([min(b, app.MAX_PACE_PAUSE) for b in busy])
        assert stats.stage_seconds["paused"] >= 0.0
    assert set(node.states().values()) >= {InstanceState.EMBEDDED}


def test_second_run_is_a_noop(node_factory: Callable[..., Node]) -> None:
    node = node_factory(every_slice())
    node.put(*ct_series(6))
    node.stabilise()
    node.open()
    assert node.emb.worker.run_once().instances_embedded == 6
    before = (node.instances(), node.vectors(), node.mean_vectors(), node.index_labels())

    stats = node.emb.worker.run_once()

    assert (stats.series, stats.instances_embedded, stats.slices_embedded) == (0, 0, 0)
    after = (node.instances(), node.vectors(), node.mean_vectors(), node.index_labels())
    assert after == before
    assert len(node.emb.index.index) == 6


@pytest.mark.parametrize(
    ("spacing", "cap", "positions"),
    [
        (0.0, 64, set(range(1, 13))),  # every slice
        (5.0, 64, {1, 6, 12}),  # extent 11 mm: floor(11 / 5) + 1 = 3 targets at 1, 6.5, 12
        (0.0, 4, {1, 5, 8, 12}),  # the cap spreads 4 slices evenly
        (2.0, 4, {1, 5, 8, 12}),  # 6 targets by spacing, capped at 4
    ],
)
def test_slices_are_sampled_per_preprocess_settings(
    node_factory: Callable[..., Node], spacing: float, cap: int, positions: set[int]
) -> None:
    node = node_factory({"preprocess": {"slice_spacing_mm": spacing,
                                        "max_slices_per_series": cap}})
    series = ct_series(12)
    node.put(*reversed(series))  # arrival order must not matter
    node.stabilise()
    node.open()

    stats = node.emb.worker.run_once()

    rows = assert_consistent(node)
    assert {round(r.position_mm or -1) for r in rows.values()} == positions
    by_number = {int(ds.InstanceNumber): str(ds.SOPInstanceUID) for ds in series}
    assert {r.sop for r in rows.values()} == {by_number[p] for p in positions}
    # every instance is done, sampled or not; each slice vector once
    assert stats.instances_embedded == 12 and stats.slices_embedded == len(positions)
    assert set(node.states().values()) == {InstanceState.EMBEDDED}
    assert node.mean_vectors()[0][series[0].SeriesInstanceUID][0] == len(positions)


def test_study_that_is_not_stable_is_not_embedded(node_factory: Callable[..., Node]) -> None:
    node = node_factory(every_slice())
    quiet, busy = ct_series(4), ct_series(3, seed0=100)
    node.put(*quiet)
    node.stabilise()
    node.put(*busy)  # arrives after the stability check: still receiving
    node.open()

    node.emb.worker.run_once()

    states = node.states()
    assert {states[str(ds.SOPInstanceUID)] for ds in quiet} == {InstanceState.EMBEDDED}
    assert {states[str(ds.SOPInstanceUID)] for ds in busy} == {InstanceState.PENDING}
    assert {r.study_uid for r in assert_consistent(node).values()} == {quiet[0].StudyInstanceUID}
    assert busy[0].StudyInstanceUID not in node.mean_vectors()[1]

    node.stabilise()
    node.emb.worker.run_once()
    assert set(node.states().values()) == {InstanceState.EMBEDDED}
    assert len(assert_consistent(node)) == 7


def test_non_image_instances_are_ignored(node_factory: Callable[..., Node]) -> None:
    node = node_factory(every_slice())
    series = ct_series(4)
    study, series_uid = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
    sr_same_series = make_sr(study, series_uid)
    sr_alone = make_sr(generate_uid(), generate_uid())  # a study with nothing to embed
    node.put(series[0], series[1], sr_same_series, series[2], series[3], sr_alone)
    node.stabilise()
    node.open()

    stats = node.emb.worker.run_once()

    assert (stats.series, stats.instances_embedded, stats.instances_failed) == (1, 4, 0)
    states = node.states()
    assert states[str(sr_same_series.SOPInstanceUID)] == InstanceState.SKIPPED
    assert states[str(sr_alone.SOPInstanceUID)] == InstanceState.SKIPPED
    rows = assert_consistent(node)
    assert {r.sop for r in rows.values()} == {str(ds.SOPInstanceUID) for ds in series}
    assert node.mean_vectors()[1][study][0] == 4
    assert node.emb.worker.run_once().series == 0


def test_late_instance_reopens_the_study_and_only_it_is_embedded(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(every_slice())
    series = ct_series(12)
    study, series_uid = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
    node.put(*series)
    node.stabilise()
    node.open()
    node.emb.worker.run_once()
    before_rows, before_inst = node.vectors(), node.instances()
    assert len(before_rows) == 12

    late = make_ct(study_uid=study, series_uid=series_uid, instance_number=13, seed=13)
    node.put(late)
    with Session(node.engine) as s:
        assert s.scalar(select(Study.stable).where(Study.study_instance_uid == study)) is False
    assert node.emb.worker.run_once().series == 0, "a re-opened study must wait"
    assert node.states()[str(late.SOPInstanceUID)] == InstanceState.PENDING

    node.stabilise()
    stats = node.emb.worker.run_once()

    assert (stats.instances_embedded, stats.slices_embedded) == (1, 1)
    after_rows = assert_consistent(node)
    assert len(after_rows) == 13
    assert {k: after_rows[k] for k in before_rows} == before_rows  # old vectors untouched
    (new,) = set(after_rows) - set(before_rows)
    assert after_rows[new].sop == late.SOPInstanceUID
    after_inst = node.instances()
    for uid, row in before_inst.items():
        assert after_inst[uid] == row  # not processed again
    assert after_inst[str(late.SOPInstanceUID)].state == InstanceState.EMBEDDED
    series_means, study_means = node.mean_vectors()
    assert series_means[series_uid][0] == 13
    assert study_means[study][0] == 13


def test_late_instance_with_spaced_sampling_keeps_old_vectors(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory({"preprocess": {"slice_spacing_mm": 5.0}})
    series = ct_series(12)
    node.put(*series)
    node.stabilise()
    node.open()
    node.emb.worker.run_once()
    before_rows, before_inst = node.vectors(), node.instances()
    assert {round(r.position_mm or -1) for r in before_rows.values()} == {1, 6, 12}

    late = make_ct(study_uid=series[0].StudyInstanceUID, series_uid=series[0].SeriesInstanceUID,
                   instance_number=13, seed=13)
    node.put(late)
    node.stabilise()
    node.emb.worker.run_once()

    after_rows = assert_consistent(node)
    assert {k: after_rows[k] for k in before_rows} == before_rows
    new = {after_rows[k].sop for k in set(after_rows) - set(before_rows)}
    assert str(late.SOPInstanceUID) in new
    # what was added is part of the new sample (the new extent's slices), nothing else
    infos = [info for ds in [*series, late]
             for info in preprocess.frame_infos(ds, str(ds.SOPInstanceUID))]
    sampled = {sop for sop, _ in preprocess.sample(infos, node.config.preprocess)}
    assert new <= sampled
    after_inst = node.instances()
    for uid, row in before_inst.items():
        assert after_inst[uid] == row


def test_replaced_instance_is_embedded_again_from_its_new_pixels(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory({**every_slice(), "dicom": {"duplicate_policy": "replace"}})
    series = ct_series(3)
    node.put(*series)
    node.stabilise()
    node.open()
    node.emb.worker.run_once()
    old = {r.sop: (label, r.blob) for label, r in node.vectors().items()}

    changed = series[1].copy()
    rows, cols = int(changed.Rows), int(changed.Columns)
    yy = np.arange(rows)[:, None].repeat(cols, axis=1)
    changed.PixelData = np.where(yy < rows // 2, 0, 1400).astype(np.uint16).tobytes()
    node.put(changed)
    node.stabilise()
    node.emb.worker.run_once()

    uid = str(changed.SOPInstanceUID)
    assert node.states()[uid] == InstanceState.EMBEDDED
    rows_now = assert_consistent(node)
    ((label, row),) = [(k, r) for k, r in rows_now.items() if r.sop == uid]
    old_label, old_blob = old[uid]
    assert row.blob != old_blob, "the vector of the replaced pixels is stale"
    fresh = node.embedder.embed(preprocess.prepare(changed, node.config.preprocess,
                                                   node.embedder.input_size))
    np.testing.assert_allclose(from_blob(row.blob, node.embedder.dim), fresh[0], atol=2e-3)
    assert label > max(k for k, _ in old.values()), "a new label, never a reused one"
    assert old_label not in node.emb.index.index
    for other in series[::2]:  # the other instances keep their vectors
        assert rows_now[old[str(other.SOPInstanceUID)][0]].blob == old[str(other.SOPInstanceUID)][1]
    # the series mean is that of the current vectors
    mean = from_blob(node.mean_vectors()[0][series[0].SeriesInstanceUID][1], node.embedder.dim)
    current = np.stack([from_blob(r.blob, node.embedder.dim) for r in rows_now.values()])
    expected = current.mean(axis=0) / np.linalg.norm(current.mean(axis=0))
    np.testing.assert_allclose(mean, expected, atol=3e-3)


# -------------------------------------------------------------- worker: failures
class Clock:
    """A settable replacement for the worker repository's clock."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr("sidecar.db.vectors.utcnow", c)
    return c




def cli(config_path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config_path), *args],
                              catch_exceptions=False)


def status_failed_line(config_path: Path) -> str:
    res = cli(config_path, "status")
    assert res.exit_code == 0, res.output
    for word in ("pending", "embedded", "failed", "skipped"):
        assert word in res.stdout
    (line,) = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("failed")]
    return " ".join(line.split())


@pytest.mark.usefixtures("cli_isolation")
def test_unpreparable_instance_is_retried_with_backoff_then_given_up(
    node_factory: Callable[..., Node], clock: Clock, tmp_path: Path
) -> None:
    node = node_factory({**every_slice(), "worker": {"enabled": False, "max_attempts": 3,
                                                     "retry_backoff": 10.0}})
    series = ct_series(6)
    bad = series[2]
    bad.PhotometricInterpretation = "HSV"  # stored fine, refused by the preprocessor
    node.put(*series)
    node.stabilise()
    node.open()
    uid = str(bad.SOPInstanceUID)
    config_path = tmp_path / "sidecar.yaml"

    t0 = clock.now
    stats = node.emb.worker.run_once()
    assert (stats.instances_embedded, stats.instances_failed) == (5, 1)
    row = node.instances()[uid]
    assert row.state == InstanceState.FAILED
    assert "Photometric Interpretation 'HSV'" in row.error
    assert row.error.startswith("cannot prepare pixels")
    assert row.attempts == 1
    assert row.next_attempt_at == t0 + dt.timedelta(seconds=10)
    # the other instances of the series are embedded, the failed one has no vector
    rows = assert_consistent(node)
    assert {r.sop for r in rows.values()} == {str(ds.SOPInstanceUID) for ds in series} - {uid}
    assert status_failed_line(config_path) == "failed 1 (1 will be retried, 0 given up)"

    clock.advance(9.9)  # not yet
    assert node.emb.worker.run_once().series == 0
    assert node.instances()[uid].attempts == 1

    clock.advance(0.1)  # due: second attempt, backoff doubles
    stats = node.emb.worker.run_once()
    assert (stats.series, stats.instances_embedded, stats.instances_failed) == (1, 0, 1)
    row = node.instances()[uid]
    assert (row.state, row.attempts) == (InstanceState.FAILED, 2)
    assert row.next_attempt_at == clock.now + dt.timedelta(seconds=20)
    assert node.vectors() == rows, "the retry must not touch the other vectors"

    clock.advance(20)  # third and last attempt
    node.emb.worker.run_once()
    row = node.instances()[uid]
    assert (row.state, row.attempts, row.next_attempt_at) == (InstanceState.FAILED, 3, None)
    assert status_failed_line(config_path) == "failed 1 (0 will be retried, 1 given up)"

    clock.advance(86400 * 365)
    assert node.emb.worker.run_once().series == 0
    assert node.instances()[uid].attempts == 3
    assert assert_consistent(node) == rows
    states = node.states()
    assert sum(s == InstanceState.EMBEDDED for s in states.values()) == 5


@pytest.mark.usefixtures("cli_isolation")
def test_status_does_not_promise_retries_beyond_max_attempts(
    node_factory: Callable[..., Node], clock: Clock, tmp_path: Path
) -> None:
    """An instance failed twice with max_attempts 3, then max_attempts lowered to 2:
    the worker will not try it again, so status must count it as given up."""
    node = node_factory({**every_slice(), "worker": {"enabled": False, "max_attempts": 3,
                                                     "retry_backoff": 1.0}})
    series = ct_series(2)
    series[0].PhotometricInterpretation = "HSV"
    node.put(*series)
    node.stabilise()
    node.open()
    node.emb.worker.run_once()
    clock.advance(1)
    node.emb.worker.run_once()
    assert node.instances()[str(series[0].SOPInstanceUID)].attempts == 2
    node.close()

    lowered = node_factory({**every_slice(), "worker": {"enabled": False, "max_attempts": 2,
                                                        "retry_backoff": 1.0}})
    clock.advance(3600)
    lowered.open()
    assert lowered.emb.worker.run_once().series == 0  # the worker gives up on it
    assert status_failed_line(tmp_path / "sidecar.yaml") == (
        "failed 1 (0 will be retried, 1 given up)"
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [("truncate", "cannot prepare pixels"), ("garbage", "cannot read header")],
)
def test_damaged_file_fails_and_is_embedded_after_repair(
    node_factory: Callable[..., Node], clock: Clock, damage: str, message: str
) -> None:
    node = node_factory({**every_slice(), "worker": {"enabled": False, "retry_backoff": 5.0}})
    series = ct_series(5)
    node.put(*series)
    node.stabilise()
    uid = str(series[3].SOPInstanceUID)
    path = node.config.storage_dir / node.instances()[uid].file_path
    good = path.read_bytes()
    path.write_bytes(good[:-4000] if damage == "truncate" else b"\0not dicom\0" * 10)
    node.open()

    stats = node.emb.worker.run_once()

    assert (stats.instances_embedded, stats.instances_failed) == (4, 1)
    row = node.instances()[uid]
    assert row.state == InstanceState.FAILED
    assert row.error.startswith(message)
    assert (row.attempts, row.next_attempt_at) == (1, clock.now + dt.timedelta(seconds=5))
    assert len(assert_consistent(node)) == 4

    path.write_bytes(good)  # the administrator restores the file
    assert node.emb.worker.run_once().series == 0, "not before its retry time"
    clock.advance(5)
    stats = node.emb.worker.run_once()

    assert (stats.instances_embedded, stats.instances_failed, stats.slices_embedded) == (1, 0, 1)
    row = node.instances()[uid]
    assert (row.state, row.error, row.next_attempt_at) == (InstanceState.EMBEDDED, "", None)
    rows = assert_consistent(node)
    assert {r.sop for r in rows.values()} == {str(ds.SOPInstanceUID) for ds in series}


def test_a_decoder_panic_fails_its_instance_and_the_job_goes_on(
    node_factory: Callable[..., Node]
) -> None:
    # Torture finding (issue 19): pylibjpeg-rle panics on a damaged RLE frame; the panic is
    # a BaseException, so it went through every ``except Exception`` and killed the job at
    # each run, leaving the series pending for ever.
    node = node_factory({**every_slice(), "worker": {"enabled": False}})
    series = ct_series(5)
    make_rle_that_panics(series[3])
    node.put(*series)
    node.stabilise()
    node.open()

    stats = node.emb.worker.run_once()

    assert (stats.instances_embedded, stats.instances_failed) == (4, 1)
    row = node.instances()[str(series[3].SOPInstanceUID)]
    assert row.state == InstanceState.FAILED
    assert row.error.startswith("cannot prepare pixels: cannot decode RLE Lossless")
    assert len(assert_consistent(node)) == 4


# ------------------------------------------------------ index consistency at open
@pytest.fixture
def embedded(node_factory: Callable[..., Node]) -> Node:
    """Two embedded studies, index saved and closed."""
    node = node_factory(every_slice())
    node.put(*ct_series(8), *ct_series(6, seed0=100))
    node.stabilise()
    node.open()
    node.embed_all()
    node.close()
    return node


def index_dir(node: Node) -> Path:
    return node.config.index_dir / node.model_id


def test_open_loads_the_saved_index(embedded: Node) -> None:
    report = embedded.open()
    assert (report.loaded, report.added, report.deleted, report.count) == (True, 0, 0, 14)
    assert_consistent(embedded)


def test_deleted_index_files_are_rebuilt_with_identical_results(embedded: Node) -> None:
    embedded.open()
    rows = embedded.vectors()
    before = embedded.search(rows, k=4)
    embedded.close()
    for p in index_dir(embedded).iterdir():
        if p.name != ".lock":
            p.unlink()

    report = embedded.open()

    assert not report.loaded and "missing" in report.reason
    assert report.count == 14
    assert_consistent(embedded)
    assert embedded.search(rows, k=4) == before
    assert (index_dir(embedded) / "index.json").exists(), "the rebuilt index is saved"
    embedded.close()
    assert embedded.open().loaded


def test_label_unknown_to_the_database_is_deleted_on_open(embedded: Node) -> None:
    svc = IndexService(embedded.config, _vector_repo(embedded), embedded.model_id,
                       embedded.embedder.dim)
    svc.open()
    stray = np.ones((1, embedded.embedder.dim), dtype=np.float32)
    svc.add(np.asarray([10_000], dtype=np.int64), stray)
    svc.close()
    assert read_saved_facts(index_dir(embedded))["count"] == 15

    report = embedded.open()

    assert (report.loaded, report.deleted, report.added, report.count) == (True, 1, 0, 14)
    assert 10_000 not in embedded.emb.index.index
    found, _ = embedded.emb.index.index.search(stray, k=14)
    assert 10_000 not in found[0]
    assert_consistent(embedded)
    embedded.close()
    assert embedded.open().deleted == 0, "the repair was saved"


def _vector_repo(node: Node) -> VectorRepository:
    return VectorRepository(node.engine)


def test_vectors_committed_but_not_indexed_are_added_on_open(embedded: Node) -> None:
    """A crash between the commit and the index add, replayed with the repository."""
    late = ct_series(3, seed0=200)
    embedded.put(*late)
    embedded.stabilise()
    repo = _vector_repo(embedded)
    cfg = embedded.config
    (work,) = repo.due_series(max_instances=64, max_attempts=3)
    new = []
    for ref in work.instances:
        ds = next(d for d in late if d.SOPInstanceUID == ref.sop_instance_uid)
        vec = embedded.embedder.embed(preprocess.prepare(ds, cfg.preprocess,
                                                         embedded.embedder.input_size))[0]
        new.append(NewVector(ref.pk, 0, float(ds.InstanceNumber), to_blob(vec)))
    labels = repo.commit_series(
        work, embedded.model_id, new, sorted(work.due), {},
        retry_backoff=1.0, max_attempts=3, series_vector=None, study_vector=None,
    )
    assert len(labels) == 3
    assert read_saved_facts(index_dir(embedded))["count"] == 14  # the index is behind

    report = embedded.open()

    assert (report.loaded, report.added, report.deleted, report.count) == (True, 3, 0, 17)
    rows = assert_consistent(embedded)
    for label, found in embedded.search({x: rows[x] for x in labels}, k=1).items():
        assert found == [label]
    embedded.close()
    assert embedded.open().added == 0


@pytest.mark.parametrize("damage", ["graph_bytes", "graph_missing", "facts_garbage",
                                    "facts_other_model"])
def test_damaged_index_is_rebuilt(embedded: Node, damage: str) -> None:
    directory = index_dir(embedded)
    facts = read_saved_facts(directory)
    graph = directory / facts["index_file"]
    if damage == "graph_bytes":
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
    elif damage == "graph_missing":
        graph.unlink()
    elif damage == "facts_garbage":
        (directory / "index.json").write_text("{not json")
    else:
        (directory / "index.json").write_text(json.dumps({**facts, "model_id": "other"}))

    report = embedded.open()

    assert not report.loaded and report.reason
    assert report.count == 14
    assert_consistent(embedded)
    embedded.close()
    assert embedded.open().loaded


def test_index_is_owned_by_one_opener(embedded: Node) -> None:
    embedded.open()
    other = IndexService(embedded.config, _vector_repo(embedded), embedded.model_id,
                         embedded.embedder.dim)
    with pytest.raises(IndexBusy, match=f"pid {os.getpid()}"):
        other.open()
    embedded.close()
    other.open()
    other.close()


# ------------------------------------------------------------------ crash tests
DRIVER = r'''
"""Embedding parts in a child process that stops dead at one chosen moment."""
import os
import sys
import time
from pathlib import Path

from sidecar.db.connect import open_catalogue
from sidecar.service.lifecycle import Embedding
from sidecar.config import load_config
from sidecar.embeddings.model import TinyEmbedder
from sidecar.embeddings.service import IndexService

mode, config_path, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
block_at = int(sys.argv[4])


def hang(where):
    marker.write_text(where)
    while True:  # until SIGKILL
        time.sleep(3600)


class BlockingEmbedder:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.model_id, self.dim, self.input_size = inner.model_id, inner.dim, inner.input_size
        self.channels = inner.channels

    def embed(self, batch):
        self.calls += 1
        if self.calls >= block_at:
            hang("embed")
        return self.inner.embed(batch)


delete_study = sys.argv[5] if len(sys.argv) > 5 else ""
config = load_config(config_path, environ={})
engine, catalogue = open_catalogue(config)
embedder = TinyEmbedder()
if mode == "embed":
    embedder = BlockingEmbedder(embedder)
elif mode == "add":
    IndexService.add = lambda self, labels, vectors: hang("add")
emb = Embedding(config, engine, embedder)
emb.open()
if delete_study:  # as `sidecar delete-study` would, while this process runs
    catalogue.delete_study(delete_study)
emb.worker.run_once()
if mode == "save":
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "index.json":
            hang("save")
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    emb.index.save()
marker.write_text("finished")
'''


def kill_at(
    node: Node, tmp_path: Path, mode: str, block_at: int = 1, delete_study: str = ""
) -> str:
    """Run the driver on ``node``'s data directory, SIGKILL it where it blocks."""
    assert node.embedding is None, "the driver must be able to take the index lock"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / f"marker-{mode}-{block_at}"
    log = tmp_path / f"driver-{mode}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(driver), mode, str(tmp_path / "sidecar.yaml"), str(marker),
             str(block_at), delete_study],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            wait_for(lambda: marker.exists() or proc.poll() is not None, timeout=60,
                     what=f"the driver to reach {mode}")
            where = marker.read_text() if marker.exists() else ""
            assert proc.poll() is None, f"driver ended early: {log.read_text()}"
        finally:
            proc.kill()  # SIGKILL: no cleanup, no atexit, no save
            proc.wait(timeout=30)
    assert proc.returncode == -9
    assert where == mode, log.read_text()
    return where


def prepared(node_factory: Callable[..., Node]) -> tuple[Node, list[Dataset], list[Dataset]]:
    node = node_factory(every_slice())
    a, b = ct_series(6), ct_series(5, seed0=100)
    node.put(*a)
    node.put(*b)
    node.stabilise()
    return node, a, b


@pytest.mark.parametrize("block_at", [1, 2])
def test_kill_during_embedding(
    node_factory: Callable[..., Node], tmp_path: Path, block_at: int
) -> None:
    """Killed in the CNN of the first series (nothing committed) or of the second
    (first series committed and in the unsaved in-memory index)."""
    node, a, b = prepared(node_factory)
    kill_at(node, tmp_path, "embed", block_at)
    committed = node.vectors()
    assert len(committed) == (0 if block_at == 1 else len(a))

    report = node.open()

    assert report.added == len(committed)  # the index on disk had none of them
    node.embed_all()
    assert set(node.states().values()) == {InstanceState.EMBEDDED}
    rows = assert_consistent(node)
    assert len(rows) == len(a) + len(b)
    assert {k: rows[k] for k in committed} == committed, "committed vectors are kept"
    with Session(node.engine) as s:
        assert len(s.scalars(select(SliceVector.id)).all()) == len(a) + len(b)


@pytest.mark.catalogue("sqlite")  # the index files, not the catalogue
def test_kill_during_index_save(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    node, a, b = prepared(node_factory)
    # a first good save holding series a only
    node.open()
    assert node.emb.worker.run_once(max_instances=len(a)).instances_embedded == len(a)
    node.close()
    directory = index_dir(node)
    good = read_saved_facts(directory)
    assert good["count"] == len(a)

    kill_at(node, tmp_path, "save")

    # killed after the new graph file was renamed into place, before the commit point
    names = {p.name for p in directory.iterdir()}
    newer = [n for n in names if n.startswith("index-") and n.endswith(".bin")
             and n > good["index_file"]]
    assert newer and "index.json.tmp" in names
    assert read_saved_facts(directory) == good

    report = node.open()

    assert report.loaded, report.reason  # the previous good index
    assert (report.added, report.deleted, report.count) == (len(b), 0, len(a) + len(b))
    rows = assert_consistent(node)
    assert len(rows) == len(a) + len(b)
    assert set(node.states().values()) == {InstanceState.EMBEDDED}
    assert node.emb.worker.run_once().series == 0
    node.close()
    names = {p.name for p in directory.iterdir()}
    assert "index.json.tmp" not in names
    assert len([n for n in names if n.endswith(".bin")]) == 1, "stale files cleaned up"
    assert node.open().loaded


def test_kill_between_commit_and_index_add(
    node_factory: Callable[..., Node], tmp_path: Path
) -> None:
    node, a, b = prepared(node_factory)
    kill_at(node, tmp_path, "add")
    committed = node.vectors()
    assert {r.series_uid for r in committed.values()} == {a[0].SeriesInstanceUID}
    states = node.states()
    assert {states[str(ds.SOPInstanceUID)] for ds in a} == {InstanceState.EMBEDDED}
    assert {states[str(ds.SOPInstanceUID)] for ds in b} == {InstanceState.PENDING}

    report = node.open()

    assert report.added == len(a)
    node.embed_all()
    rows = assert_consistent(node)
    assert len(rows) == len(a) + len(b)
    assert {k: rows[k] for k in committed} == committed
    for label, found in node.search(rows, k=1).items():
        assert found == [label]


def test_deleted_study_labels_are_not_reused_for_new_vectors_after_a_crash(
    node_factory: Callable[..., Node], tmp_path: Path
) -> None:
    node, a, b = prepared(node_factory)
    node.open()
    node.embed_all()
    node.close()  # saved: labels of a and b
    old_b = {k for k, r in node.vectors().items() if r.study_uid == b[0].StudyInstanceUID}
    c = ct_series(5, seed0=300)
    node.put(*c)
    node.stabilise()

    # a running node: study b is deleted, then c is committed, then the process dies
    kill_at(node, tmp_path, "add", delete_study=b[0].StudyInstanceUID)
    rows_c = {k: r for k, r in node.vectors().items() if r.study_uid == c[0].StudyInstanceUID}
    assert len(rows_c) == 5
    reused = old_b & set(rows_c)

    node.open()
    rows = assert_consistent(node)
    dim = node.embedder.dim
    for label, row in rows.items():  # the index must hold each row's own vector
        _, score = node.emb.index.index.exact_search(from_blob(row.blob, dim), 1, [label])
        assert float(score[0][0]) > 0.999, (label, label in reused)
    assert not reused


# ---------------------------------------------------------------- the commands
@pytest.fixture
def ingested(
    config_factory: Callable[..., Config], tmp_path: Path, cli_isolation: None
) -> tuple[Config, Path, list[Dataset]]:
    """Two studies ingested with ``sidecar ingest``; embedding not run yet."""
    config = config_factory({"stability": {"stable_age": 0.01},
                             "logging": {"level": "WARNING"}})
    path = tmp_path / "sidecar.yaml"
    folder = tmp_path / "incoming"
    datasets = ct_series(7) + ct_series(4, seed0=100)
    for i, ds in enumerate(datasets):
        target = folder / f"{i:02d}.dcm"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(part10(ds))
    sr = make_sr(datasets[0].StudyInstanceUID, generate_uid())
    (folder / "sr.dcm").write_bytes(part10(sr))
    res = cli(path, "ingest", "-q", str(folder))
    assert res.exit_code == 0, res.output
    return config, path, datasets


def builtin_model(config: Config) -> TorchEmbedder:
    return TorchEmbedder.from_config(config.embedding)


def test_cli_embed_embeds_everything(ingested: tuple[Config, Path, list[Dataset]]) -> None:
    config, path, datasets = ingested

    res = cli(path, "embed", "-q")

    assert res.exit_code == 0, res.output
    # default sampling: 7 slices over 6 mm -> 2 targets; 4 over 3 mm -> 1
    assert "embed: 3 slices from 11 instances in 2 series, 0 failed" in res.stdout
    assert "embed" not in res.stderr.splitlines(), "the progress bar is hidden with -q"
    status = json.loads(cli(path, "status", "--json").stdout)
    assert status["instances"]["embedded"] == 11
    assert status["instances"]["pending"] == 0
    assert status["instances"]["skipped"] == 1
    model = builtin_model(config)
    assert status["vectors_by_model"] == {model.model_id: 3}
    assert status["active_model_id"] == model.model_id
    node = Node(config, model)
    try:
        node.open()
        rows = assert_consistent(node)
        assert {r.study_uid for r in rows.values()} == {
            datasets[0].StudyInstanceUID, datasets[-1].StudyInstanceUID}
    finally:
        node.dispose()
    again = cli(path, "embed", "-q")
    assert "embed: 0 slices from 0 instances in 0 series" in again.stdout


def test_cli_embed_shows_progress_without_quiet(
    ingested: tuple[Config, Path, list[Dataset]],
) -> None:
    _, path, _ = ingested
    res = cli(path, "embed")
    assert res.exit_code == 0, res.output
    assert "embed" in res.stderr.splitlines()  # the bar's label (stderr is not a tty)


def test_cli_reindex_rebuilds_from_stored_vectors_without_the_cnn(
    ingested: tuple[Config, Path, list[Dataset]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, path, _ = ingested
    assert cli(path, "embed", "-q").exit_code == 0
    model = builtin_model(config)
    node = Node(config, model)
    node.open()
    rows = node.vectors()
    before = node.search(rows, k=3)
    saved = read_saved_facts(index_dir(node))
    node.close()

    def no_cnn(self: Any, batch: Any) -> Any:
        raise AssertionError("reindex must not run the CNN")

    monkeypatch.setattr(TorchEmbedder, "embed", no_cnn)
    res = cli(path, "reindex", "-q")

    assert res.exit_code == 0, res.output
    assert f"index of model {model.model_id} rebuilt from 3 stored vectors" in res.stdout
    now = read_saved_facts(index_dir(node))
    assert now["index_file"] != saved["index_file"], "a new index was written"
    assert now["labels_sha256"] == saved["labels_sha256"]
    try:
        assert node.open().loaded
        assert node.vectors() == rows
        assert_consistent(node)
        assert node.search(rows, k=3) == before
    finally:
        node.dispose()


def test_cli_reindex_reembed_runs_the_cnn_again(
    ingested: tuple[Config, Path, list[Dataset]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, path, _ = ingested
    assert cli(path, "embed", "-q").exit_code == 0
    model = builtin_model(config)
    node = Node(config, model)
    node.open()
    before = node.vectors()
    with Session(node.engine) as s:
        created = set(s.scalars(select(SliceVector.created_at)).all())
    node.close()
    calls: list[int] = []
    real = TorchEmbedder.embed

    def counting(self: TorchEmbedder, batch: Any) -> Any:
        calls.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(TorchEmbedder, "embed", counting)
    res = cli(path, "reindex", "--reembed", "-q")

    assert res.exit_code == 0, res.output
    assert "re-embedded 3 slices, 0 failed" in res.stdout
    assert "11 instances queued" in res.stderr
    assert sum(calls) == 3
    try:
        node.open()
        after = assert_consistent(node)
        with Session(node.engine) as s:
            assert created.isdisjoint(s.scalars(select(SliceVector.created_at)).all())
        # same slices, same (deterministic) vectors, rows written anew
        assert sorted((r.sop, r.frame, r.blob) for r in after.values()) == sorted(
            (r.sop, r.frame, r.blob) for r in before.values())
        assert set(node.states().values()) == {InstanceState.EMBEDDED, InstanceState.SKIPPED}
    finally:
        node.dispose()


def test_cli_embed_refuses_while_the_index_is_in_use(
    ingested: tuple[Config, Path, list[Dataset]],
) -> None:
    config, path, datasets = ingested
    model = builtin_model(config)
    holder = Node(config, model)
    holder.open()  # as a running `sidecar serve` would
    try:
        res = cli(path, "embed", "-q")
        assert res.exit_code != 0
        assert "Error: the index of model" in res.stderr
        assert f"in use by pid {os.getpid()}" in res.stderr
        assert "Traceback" not in res.output
        assert res.stdout == ""
        assert set(holder.states().values()) == {InstanceState.PENDING, InstanceState.SKIPPED}
        res = cli(path, "reindex", "-q")
        assert res.exit_code != 0 and "in use by" in res.stderr
    finally:
        holder.dispose()
    assert cli(path, "embed", "-q").exit_code == 0


def test_cli_embed_with_a_missing_model_file_fails_cleanly(
    ingested: tuple[Config, Path, list[Dataset]], tmp_path: Path
) -> None:
    _, path, _ = ingested
    data = yaml.safe_load(path.read_text())
    data["embedding"] = {"model_path": str(tmp_path / "missing.pt")}
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["--config", str(path), "embed", "-q"])
    assert res.exit_code == 1, res.output
    assert "missing.pt" in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)
