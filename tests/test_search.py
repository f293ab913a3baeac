"""The similarity search service (``sidecar.search.service``) and ``sidecar search``.

One archive is built per module with the tiny deterministic embedder: every
slice is a noisy copy (8 HU of noise) of one of a few distinct *base* images
(8x8 blocks of random soft-tissue values), so two slices of the same base
have a cosine of ~0.9999 and slices of different bases at most ~0.45. Study
scores under the documented method (mean over the query slices of the best
cosine in the candidate) then follow from the construction; the comments
give the expected values for the reference study R (bases 0, 1, 2, 3).

| study | patient | date     | series (modality, body part: bases)          | score vs R |
|-------|---------|----------|----------------------------------------------|------------|
| R     | P1      | 20240105 | CT HEAD: 0 1 2 3                             | (reference)|
| A     | P2      | 20240110 | CT HEAD: 0 1 2 3; CT CHEST: 8 8              | ~1.00      |
| S     | P1      | 20230101 | CT HEAD: 0 1 2 4                             | ~0.81      |
| C     | P4      | 20220615 | MR HEAD: 0 1 2 6                             | ~0.76      |
| B     | P3      | 20240301 | CT CHEST: 0 1 4 5                            | ~0.57      |
| M     | P5      | 20240110 | CT ABDOMEN: 0 then 9 x9                      | ~0.27      |
| E     | P7      | 20240110 | CT HEAD: 4 5 6 7                             | ~0.23      |
| N     | P8      | 20240110 | CT HEAD: 6 6 7 7 7, 1 mm apart (3 sampled)   | ~0.17      |
| D     | P6      | 20240110 | CT ABDOMEN: 4 blends 0.7 x base 0 + 0.3 x 7  | ~0.15      |

Plus a study whose embedding failed (F), a structured report (K, skipped) and
a study still receiving (P, pending). The module's embedding parts keep the
index lock for the whole module, as a running ``sidecar serve`` would, so
every CLI test also shows that ``sidecar search`` works beside it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import sidecar.search.service as search_mod
from sidecar.archive.store import InstanceStore, Origin
from sidecar.cli.main import main
from sidecar.config import Config, load_config
from sidecar.db.connect import open_catalogue
from sidecar.db.models import Study, StudyVector
from sidecar.db.repository import Repository
from sidecar.embeddings import preprocess
from sidecar.embeddings.codec import from_blob
from sidecar.embeddings.index import VectorIndex
from sidecar.embeddings.index_files import read_saved_facts
from sidecar.embeddings.model import TinyEmbedder
from sidecar.embeddings.service import IndexBusy, IndexService
from sidecar.errors import BadQuery, IndexUnavailable, NotEmbedded, UnknownReference
from sidecar.search.readonly import ReadOnlyEmbedding
from sidecar.search.service import SearchService
from sidecar.search.types import Reference, SearchFilters, SearchResult
from sidecar.service.lifecycle import Embedding
from tests.conftest import free_port, make_ct, part10
from tests.conftest import make_sr as make_sr_base

pytestmark = [pytest.mark.usefixtures("cli_isolation"),  # env, cwd and logging restored
              pytest.mark.catalogue]  # on SQLite and PostgreSQL


# ------------------------------------------------------------------ images
def base(b: int) -> np.ndarray:
    """Base image ``b``: 8x8 blocks of random HU in the soft-tissue window, 64x64."""
    rng = np.random.default_rng(1000 + b)
    return np.kron(rng.uniform(-150, 230, (8, 8)), np.ones((8, 8)))


BLEND = ("blend", 0)  # 0.7 x base 0 + 0.3 x base 7


def content(spec: int | tuple[str, int]) -> np.ndarray:
    if isinstance(spec, tuple):
        return 0.7 * base(0) + 0.3 * base(7)
    return base(spec)


_noise_seed = iter(range(10_000, 1_000_000))


def ct_slice(
    study: str, series: str, number: int, z: float, spec: int | tuple[str, int], *,
    patient: str, date: str, modality: str = "CT", body: str = "HEAD",
    description: str = "", seed: int | None = None,
) -> Dataset:
    """One 64x64 slice whose pixels are a noisy copy of a base image."""
    ds = make_ct(study_uid=study, series_uid=series, instance_number=number, patient_id=patient)
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.StudyDate = date
    ds.Modality = modality
    ds.BodyPartExamined = body
    ds.StudyDescription = description
    rng = np.random.default_rng(next(_noise_seed) if seed is None else seed)
    hu = content(spec) + rng.normal(0, 8, (64, 64))
    ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()
    return ds


def make_sr(study: str, patient: str) -> Dataset:
    return make_sr_base(study, patient_id=patient)


# ----------------------------------------------------------------- archive
@dataclass
class StudyInfo:
    uid: str
    series: list[str] = field(default_factory=list)
    sops: list[list[str]] = field(default_factory=list)  # per series, by instance number


# name -> patient, date, [(modality, body, [bases], spacing mm)]
LAYOUT: dict[str, tuple[str, str, list[tuple[str, str, list[Any], float]]]] = {
    "R": ("P1", "20240105", [("CT", "HEAD", [0, 1, 2, 3], 10.0)]),
    "A": ("P2", "20240110", [("CT", "HEAD", [0, 1, 2, 3], 10.0), ("CT", "CHEST", [8, 8], 10.0)]),
    "S": ("P1", "20230101", [("CT", "HEAD", [0, 1, 2, 4], 10.0)]),
    "C": ("P4", "20220615", [("MR", "HEAD", [0, 1, 2, 6], 10.0)]),
    "B": ("P3", "20240301", [("CT", "CHEST", [0, 1, 4, 5], 10.0)]),
    "M": ("P5", "20240110", [("CT", "ABDOMEN", [0] + [9] * 9, 10.0)]),
    "E": ("P7", "20240110", [("CT", "HEAD", [4, 5, 6, 7], 10.0)]),
    "N": ("P8", "20240110", [("CT", "HEAD", [6, 6, 7, 7, 7], 1.0)]),
    "D": ("P6", "20240110", [("CT", "ABDOMEN", [BLEND] * 4, 10.0)]),
}


@dataclass
class Archive:
    config: Config
    config_path: Path
    engine: Engine
    repo: Repository
    emb: Embedding
    service: SearchService
    studies: dict[str, StudyInfo]

    def name_of(self, study_uid: str) -> str:
        return next(n for n, s in self.studies.items() if s.uid == study_uid)

    def names(self, result: SearchResult) -> list[str]:
        return [self.name_of(h.study_instance_uid) for h in result.hits]

    def search(self, ref: Reference, k: int = 10, **kwargs: Any) -> SearchResult:
        return self.service.search(ref, k=k, **kwargs)


def write_config(directory: Path, database_url: str = "") -> tuple[Config, Path]:
    data: dict[str, Any] = {
        "dicom": {"port": free_port()},
        "storage": {"data_dir": str(directory / "data"), "min_free_mb": 1},
        "stability": {"stable_age": 60.0, "check_interval": 1.0},
        "worker": {"enabled": False},
        "logging": {"level": "WARNING"},
        # every slice 10 mm apart is sampled; N's slices 1 mm apart are thinned
        "preprocess": {"slice_spacing_mm": 2.0,
                       "modality_window": {"CT": "soft_tissue", "MR": "soft_tissue"}},
    }
    if database_url:
        data["database"] = {"url": database_url}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, environ={}), path


def build_archive(
    directory: Path, layout: dict[str, tuple[str, str, list[tuple[str, str, list[Any], float]]]],
    *, extras: bool = True, database_url: str = "",
) -> Archive:
    """Store ``layout`` (plus F, K and P with ``extras``), embed it with the tiny embedder
    and keep the embedding parts open (they hold the index lock); the catalogue at
    ``database_url`` (default: SQLite in the data directory)."""
    cfg, path = write_config(directory, database_url)
    engine, repo = open_catalogue(cfg)
    store = InstanceStore(cfg, repo)
    origin = Origin("TEST", "127.0.0.1")
    studies: dict[str, StudyInfo] = {}
    for name, (patient, date, series_list) in layout.items():
        info = StudyInfo(generate_uid())
        for modality, body, bases, spacing in series_list:
            series_uid = generate_uid()
            info.series.append(series_uid)
            info.sops.append([])
            for i, spec in enumerate(bases):
                ds = ct_slice(info.uid, series_uid, i + 1, i * spacing, spec, patient=patient,
                              date=date, modality=modality, body=body,
                              description=f"study {name}")
                info.sops[-1].append(str(ds.SOPInstanceUID))
                store.store(part10(ds), None, origin)
        studies[name] = info
    if extras:
        # F: its pixels cannot be prepared (embedding fails); K: a report (skipped)
        failing = StudyInfo(generate_uid(), [generate_uid()], [[]])
        for i in range(2):
            ds = ct_slice(failing.uid, failing.series[0], i + 1, i * 10.0, 5, patient="P10",
                          date="20240110")
            ds.PhotometricInterpretation = "HSV"
            failing.sops[0].append(str(ds.SOPInstanceUID))
            store.store(part10(ds), None, origin)
        studies["F"] = failing
        report = StudyInfo(generate_uid())
        sr = make_sr(report.uid, "P11")
        report.series.append(str(sr.SeriesInstanceUID))
        report.sops.append([str(sr.SOPInstanceUID)])
        store.store(part10(sr), None, origin)
        studies["K"] = report
    repo.mark_stable_studies(0.0)

    emb = Embedding(cfg, engine, TinyEmbedder())
    emb.open()  # holds the index lock, like `sidecar serve`
    while emb.run_job().series:
        pass
    if extras:
        # P: still receiving when the query comes (not stable, pending)
        pending = StudyInfo(generate_uid(), [generate_uid()], [[]])
        ds = ct_slice(pending.uid, pending.series[0], 1, 0.0, 0, patient="P12",
                      date="20240110")
        pending.sops[0].append(str(ds.SOPInstanceUID))
        store.store(part10(ds), None, origin)
        studies["P"] = pending
    service = SearchService(cfg, engine, emb, refresh_interval=0.0)
    return Archive(cfg, path, engine, repo, emb, service, studies)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, module_database_url: str,
            ) -> Iterator[Archive]:
    built = build_archive(tmp_path_factory.mktemp("search"), LAYOUT,
                          database_url=module_database_url)
    try:
        yield built
    finally:
        built.emb.close()
        built.engine.dispose()


def query_image(spec: int | tuple[str, int], *, patient: str = "P9", seed: int = 7) -> Dataset:
    """A slice that is not in the archive (new UIDs, another patient)."""
    ds = ct_slice(generate_uid(), generate_uid(), 1, 0.0, spec, patient=patient,
                  date="20240601", seed=seed)
    return ds


# -------------------------------------------------------------- study level
def test_study_level_ranking_follows_the_construction(archive: Archive) -> None:
    r = archive.studies["R"]
    result = archive.search(Reference.study(r.uid), k=3)

    assert archive.names(result) == ["A", "C", "B"]
    assert [h.rank for h in result.hits] == [1, 2, 3]
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > 0.99
    assert 0.70 < scores[1] < 0.80 and 0.50 < scores[2] < 0.65
    assert result.model_id == archive.emb.serving.model_id
    assert result.level == "study" and result.k == 3
    ref = result.reference
    assert (ref.kind, ref.uid, ref.study_instance_uid, ref.slices) == ("study", r.uid, r.uid, 4)
    assert ref.excluded_studies == 2  # R itself and S (same patient)
    # the best-matching series of A is its HEAD series, not the CHEST one
    top = result.hits[0]
    a = archive.studies["A"]
    assert top.series_instance_uid == a.series[0]
    assert top.sop_instance_uid in a.sops[0]
    # catalogue attributes a tool shows
    assert top.patient_id == "P2" and top.study_date == "20240110"
    assert top.modalities_in_study == ("CT",) and top.modality == "CT"
    assert top.body_part_examined == "HEAD" and top.study_description == "study A"
    assert top.accession_number == "ACC001"
    assert result.hits[1].modalities_in_study == ("MR",)


def test_reference_study_and_same_patient_are_excluded_unless_asked(archive: Archive) -> None:
    r = archive.studies["R"]
    default = archive.names(archive.search(Reference.study(r.uid), k=20))
    assert "R" not in default and "S" not in default
    assert set(default) == {"A", "C", "B", "M", "E", "N", "D"}

    with_patient = archive.search(Reference.study(r.uid), k=20, include_same_patient=True)
    names = archive.names(with_patient)
    assert names[:4] == ["A", "S", "C", "B"]
    assert "R" not in names, "the reference's own study is never a hit"
    assert with_patient.reference.excluded_studies == 1


def test_k_larger_than_available_returns_every_candidate(archive: Archive) -> None:
    result = archive.search(Reference.study(archive.studies["R"].uid), k=500)
    assert len(result.hits) == 7
    assert [h.rank for h in result.hits] == list(range(1, 8))
    # studies without vectors (failed, skipped, pending) are never hits
    assert not {"F", "K", "P"} & set(archive.names(result))


def test_series_reference_excludes_its_own_study(archive: Archive) -> None:
    a = archive.studies["A"]
    result = archive.search(Reference.series(a.series[0]), k=3)
    assert result.reference.kind == "series" and result.reference.slices == 4
    assert result.reference.study_instance_uid == a.uid
    names = archive.names(result)
    assert "A" not in names
    # R holds the same four bases; S three of them plus base 4
    assert names == ["R", "S", "C"]


def test_reranking_beats_mean_vectors_when_a_mean_misleads(archive: Archive) -> None:
    """M holds one slice identical to the query among nine unrelated ones; every slice of
    D is a blend close to it. The means rank D first, the documented method ranks M first."""
    query = query_image(0)
    flt = SearchFilters(body_part="ABDOMEN")  # the two studies in question: M and D
    result = archive.search(Reference.images([query]), k=2, filters=flt)
    assert archive.names(result) == ["M", "D"]
    m_score, d_score = (h.score for h in result.hits)
    assert m_score > 0.99 and 0.90 < d_score < 0.98

    # mean-vector-only ranking, computed here from the stored study means
    embedder = TinyEmbedder()
    q = embedder.embed(preprocess.prepare(query, archive.config.preprocess, 64))[0]
    uids = {archive.studies[n].uid: n for n in ("M", "D")}
    with Session(archive.engine) as s:
        rows = s.execute(
            select(Study.study_instance_uid, StudyVector.vector)
            .join(Study, Study.id == StudyVector.study_pk)
            .where(StudyVector.model_id == embedder.model_id,
                   Study.study_instance_uid.in_(list(uids)))
        ).all()
    by_mean = sorted(rows, key=lambda r: -float(from_blob(r[1], embedder.dim) @ q))
    assert [uids[r[0]] for r in by_mean] == ["D", "M"]
    blobs = {str(uid): bytes(blob) for uid, blob in rows}
    mean_m = float(from_blob(blobs[archive.studies["M"].uid], embedder.dim) @ q)
    assert mean_m < 0.5 < m_score


def test_slice_ann_finds_candidates_the_means_miss(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one candidate from the means (D), the slice ANN stage still brings in M."""
    monkeypatch.setattr(search_mod, "MIN_CANDIDATES", 1)
    monkeypatch.setattr(search_mod, "RERANK_FACTOR", 1)
    result = archive.search(Reference.images([query_image(0)]), k=1,
                            filters=SearchFilters(body_part="ABDOMEN"))
    assert archive.names(result) == ["M"]
    assert result.candidates == 2


# --------------------------------------------------------- series and image
def test_series_level_ranks_series(archive: Archive) -> None:
    r = archive.studies["R"]
    result = archive.search(Reference.study(r.uid), k=20, level="series")
    a, c, b = (archive.studies[n] for n in "ACB")
    series = [h.series_instance_uid for h in result.hits]
    assert series[:3] == [a.series[0], c.series[0], b.series[0]]
    assert series[-1] == a.series[1], "A's CHEST series (bases 8, 8) is the least similar"
    assert len(series) == 8 and len(set(series)) == 8


def test_image_level_ranks_instances(archive: Archive) -> None:
    r = archive.studies["R"]
    result = archive.search(Reference.instance(r.sops[0][0]), k=4, level="image")
    first_slices = {archive.studies[n].sops[0][0] for n in ("A", "C", "B", "M")}
    assert {h.sop_instance_uid for h in result.hits} == first_slices  # base 0 everywhere
    assert all(h.score > 0.99 for h in result.hits)
    assert result.reference.kind == "instance" and result.reference.slices == 1

    more = archive.search(Reference.instance(r.sops[0][0]), k=8, level="image")
    assert {h.sop_instance_uid for h in more.hits[4:]} == set(archive.studies["D"].sops[0])
    assert all(0.9 < h.score < 0.98 for h in more.hits[4:])
    assert all(h.study_instance_uid not in {r.uid, archive.studies["S"].uid} for h in more.hits)


def test_instance_that_was_not_sampled_uses_the_nearest_sampled_slice(archive: Archive) -> None:
    n = archive.studies["N"]  # slices at 0..4 mm, sampled at 0, 2 and 4 mm
    result = archive.search(Reference.instance(n.sops[0][1]), k=2)
    assert "not sampled" in result.reference.note and "1.0 mm away" in result.reference.note
    assert result.reference.slices == 1
    assert set(archive.names(result)) == {"C", "E"}  # both hold base 6, as slice 0 does
    assert all(h.score > 0.99 for h in result.hits)


# ------------------------------------------------------------------ filters
@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (SearchFilters(modalities=("MR",)), ["C"]),
        (SearchFilters(modalities=("ct",)), ["A", "B", "M", "E", "N", "D"]),
        (SearchFilters(modalities=("MR", "XA")), ["C"]),
        (SearchFilters(modalities="XA\\MR"), ["C"]),  # type: ignore[arg-type]
        (SearchFilters(modalities=("*",)), ["A", "C", "B", "M", "E", "N", "D"]),
        (SearchFilters(study_date="20240101-20240131"), ["A", "M", "E", "N", "D"]),
        (SearchFilters(study_date="-20231231"), ["C"]),
        (SearchFilters(study_date="20240201-"), ["B"]),
        (SearchFilters(study_date="20240110"), ["A", "M", "E", "N", "D"]),
        (SearchFilters(body_part="CHEST"), ["A", "B"]),
        (SearchFilters(body_part="abd*"), ["M", "D"]),
        (SearchFilters(body_part="HEAD", study_date="20240110"), ["A", "E", "N"]),
        (SearchFilters(modalities=("US",)), []),
    ],
)
def test_study_filters(archive: Archive, filters: SearchFilters, expected: list[str]) -> None:
    result = archive.search(Reference.study(archive.studies["R"].uid), k=20, filters=filters)
    names = archive.names(result)
    assert set(names) == set(expected)
    if len(expected) > 1:  # the first is always the best by construction
        assert names[0] == expected[0]


def test_filters_at_series_and_image_level(archive: Archive) -> None:
    r = archive.studies["R"]
    chest = archive.search(Reference.study(r.uid), k=10, level="series",
                           filters=SearchFilters(body_part="CHEST"))
    b, a = archive.studies["B"], archive.studies["A"]
    assert [h.series_instance_uid for h in chest.hits] == [b.series[0], a.series[1]]
    assert all(h.body_part_examined == "CHEST" for h in chest.hits)

    mr = archive.search(Reference.instance(r.sops[0][0]), k=10, level="image",
                        filters=SearchFilters(modalities=("MR",)))
    c = archive.studies["C"]
    assert [h.sop_instance_uid for h in mr.hits][0] == c.sops[0][0]
    assert {h.sop_instance_uid for h in mr.hits} == set(c.sops[0])
    assert all(h.modality == "MR" for h in mr.hits)


def test_selective_image_filter_goes_exact(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = archive.studies["R"]
    ref, flt = Reference.instance(r.sops[0][0]), SearchFilters(body_part="ABDOMEN")
    ann = archive.search(ref, k=6, level="image", filters=flt)
    monkeypatch.setattr(search_mod, "EXACT_LIMIT", 1)
    exact = archive.search(ref, k=6, level="image", filters=flt)
    assert [h.sop_instance_uid for h in exact.hits] == [h.sop_instance_uid for h in ann.hits]
    assert exact.hits[0].sop_instance_uid == archive.studies["M"].sops[0][0]
    assert {h.sop_instance_uid for h in exact.hits[1:5]} == set(archive.studies["D"].sops[0])


# ---------------------------------------------------------------- by image
def test_query_by_images_not_in_the_archive(archive: Archive) -> None:
    images = [query_image(b, seed=100 + b) for b in (0, 1, 2, 3)]
    series = generate_uid()
    for i, ds in enumerate(images):  # one series of four slices, 10 mm apart
        ds.SeriesInstanceUID = series
        ds.StudyInstanceUID = images[0].StudyInstanceUID
        ds.ImagePositionPatient = [0.0, 0.0, 10.0 * i]
    result = archive.search(Reference.images(images), k=3)
    assert result.reference.kind == "dataset" and result.reference.slices == 4
    assert result.reference.study_instance_uid == ""  # not archived: nothing excluded
    names = archive.names(result)
    assert set(names[:2]) == {"R", "A"} and names[2] == "S"  # patient P9 excludes nobody


def test_query_image_of_an_archived_patient_excludes_that_patient(archive: Archive) -> None:
    result = archive.search(Reference.images([query_image(4, patient="P7")]), k=10)
    names = archive.names(result)
    assert "E" not in names  # E is P7's and holds base 4
    assert set(names[:2]) == {"B", "S"}  # the others that hold base 4
    assert result.reference.excluded_studies == 1
    with_patient = archive.search(Reference.images([query_image(4, patient="P7")]), k=10,
                                  include_same_patient=True)
    assert set(archive.names(with_patient)[:3]) == {"B", "S", "E"}


# ------------------------------------------------------------------- errors
def test_unknown_reference(archive: Archive) -> None:
    for ref in (Reference.study("1.2.3.4"), Reference.series("1.2.3.4"),
                Reference.instance("1.2.3.4")):
        with pytest.raises(UnknownReference, match="1.2.3.4"):
            archive.search(ref)


def test_not_embedded_states(archive: Archive) -> None:
    with pytest.raises(NotEmbedded, match="pending .*still receiving") as pending:
        archive.search(Reference.study(archive.studies["P"].uid))
    assert pending.value.state == "pending" and pending.value.counts == {"pending": 1}

    failed = archive.studies["F"]
    with pytest.raises(NotEmbedded, match="embedding failed for 2 instances") as exc:
        archive.search(Reference.study(failed.uid))
    assert exc.value.state == "failed"
    assert "HSV" in str(exc.value)
    with pytest.raises(NotEmbedded, match="failed for 1 instance ") as exc:
        archive.search(Reference.instance(failed.sops[0][0]))
    assert exc.value.state == "failed"

    with pytest.raises(NotEmbedded, match="skipped") as skipped:
        archive.search(Reference.study(archive.studies["K"].uid))
    assert skipped.value.state == "skipped"


def test_bad_queries(archive: Archive) -> None:
    r = Reference.study(archive.studies["R"].uid)
    with pytest.raises(BadQuery, match="exactly one reference"):
        Reference(study_instance_uid="1.2.3", series_instance_uid="1.2.4")
    with pytest.raises(BadQuery, match="exactly one reference"):
        Reference()
    with pytest.raises(BadQuery, match="not a valid UID"):
        Reference.study("1.2.abc")
    for k in (0, -1, 100_000):
        with pytest.raises(BadQuery, match="k must be"):
            archive.search(r, k=k)
    with pytest.raises(BadQuery, match="level"):
        archive.search(r, level="patient")
    for value in ("20240230", "20240105-20240101", "2024-01-01", "-", "yesterday"):
        with pytest.raises(BadQuery, match="StudyDate"):
            archive.search(r, filters=SearchFilters(study_date=value))
    blank = query_image(0)
    del blank.PixelData
    with pytest.raises(BadQuery, match="cannot be embedded"):
        archive.search(Reference.images([blank]))


def test_index_unavailable(archive: Archive) -> None:
    r = Reference.study(archive.studies["R"].uid)
    with pytest.raises(IndexUnavailable, match="embedding is turned off"):
        SearchService(archive.config, archive.engine, None).search(r, k=3)

    class OtherModel:  # the configured model differs from the serving one (re-embedding)
        serving = archive.emb.serving
        embedder = TinyEmbedder(seed=1)

    service = SearchService(archive.config, archive.engine, OtherModel())
    assert archive.names(service.search(r, k=1)) == ["A"], "archived references still work"
    with pytest.raises(IndexUnavailable, match="query by image is unavailable"):
        service.search(Reference.images([query_image(0)]), k=1)


def test_concurrent_queries_agree(archive: Archive) -> None:
    r = archive.studies["R"]
    refs = [(Reference.study(r.uid), "study"), (Reference.series(r.series[0]), "series"),
            (Reference.instance(r.sops[0][0]), "image")]
    expected = [archive.search(ref, k=5, level=lvl).hits for ref, lvl in refs]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(10):
                for (ref, lvl), want in zip(refs, expected, strict=True):
                    assert archive.search(ref, k=5, level=lvl).hits == want
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]


def test_result_to_dict_is_json(archive: Archive) -> None:
    result = archive.search(Reference.study(archive.studies["R"].uid), k=2)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["model_id"] == result.model_id
    assert data["hits"][0]["rank"] == 1
    assert data["hits"][0]["modalities_in_study"] == ["CT"]
    assert data["reference"]["kind"] == "study"


# ---------------------------------------------------------------------- CLI
def cli(archive: Archive, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(archive.config_path), "search", *args])


def test_cli_works_while_another_process_holds_the_index_lock(archive: Archive) -> None:
    service = IndexService(archive.config, archive.emb.vectors, archive.emb.serving.model_id,
                           archive.emb.serving.dim)
    with pytest.raises(IndexBusy):
        service.open()  # the module's embedding parts hold it, as `sidecar serve` would
    index_dir = archive.config.index_dir / archive.emb.serving.model_id
    before = sorted((p.name, p.stat().st_mtime_ns) for p in index_dir.iterdir())

    res = cli(archive, "--study", archive.studies["R"].uid, "-k", "3")

    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"model {archive.emb.serving.model_id}   level study")
    assert "rank" in lines[1] and "score" in lines[1] and "study UID" in lines[1]
    rows = lines[2:]
    assert len(rows) == 3
    for row, name in zip(rows, ["A", "C", "B"], strict=True):
        assert archive.studies[name].uid in row
    assert rows[0].split()[0] == "1" and "20240110" in rows[0] and "study A" in rows[0]
    assert rows[1].split()[3] == "MR"
    a = archive.studies["A"]
    assert f"{a.series[0]} / " in rows[0]
    after = sorted((p.name, p.stat().st_mtime_ns) for p in index_dir.iterdir())
    assert after == before, "the read-only copy is never saved"


def test_cli_json(archive: Archive) -> None:
    res = cli(archive, "--instance", archive.studies["R"].sops[0][0], "--level", "image",
              "-k", "4", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["level"] == "image" and data["k"] == 4
    assert data["reference"]["kind"] == "instance"
    assert [h["rank"] for h in data["hits"]] == [1, 2, 3, 4]
    assert {h["sop_instance_uid"] for h in data["hits"]} == {
        archive.studies[n].sops[0][0] for n in ("A", "C", "B", "M")}
    assert {"score", "patient_id", "study_date", "modality", "body_part_examined",
            "accession_number", "study_description", "series_instance_uid"} <= set(data["hits"][0])


def test_cli_uses_the_configured_default_k_and_is_audited(archive: Archive) -> None:
    audit = archive.config.audit_log_path
    before = audit.read_text().splitlines() if audit.exists() else []
    res = cli(archive, "--study", archive.studies["R"].uid, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["k"] == archive.config.query.default_k
    bad = cli(archive, "--series", "1.2.3.4.5")
    assert bad.exit_code == 1 and "no series with UID 1.2.3.4.5" in bad.output
    records = [json.loads(x) for x in audit.read_text().splitlines()[len(before):]]
    assert [(r["interface"], r["outcome"]) for r in records] == [
        ("cli", "ok"), ("cli", "unknown_reference")]
    assert records[0]["requester"] and records[0]["hits"] == 7
    assert records[0]["reference"] == {"kind": "study", "uid": archive.studies["R"].uid}


def test_cli_filters_and_same_patient(archive: Archive) -> None:
    r = archive.studies["R"].uid
    res = cli(archive, "--study", r, "--same-patient", "--json")
    names = [archive.name_of(h["study_instance_uid"]) for h in json.loads(res.stdout)["hits"]]
    assert names[:2] == ["A", "S"]
    res = cli(archive, "--study", r, "--modality", "MR", "--json")
    names = [archive.name_of(h["study_instance_uid"]) for h in json.loads(res.stdout)["hits"]]
    assert names == ["C"]
    res = cli(archive, "--study", r, "--date", "20240201-", "--body-part", "CHEST", "--json")
    names = [archive.name_of(h["study_instance_uid"]) for h in json.loads(res.stdout)["hits"]]
    assert names == ["B"]


def test_cli_query_by_file_and_folder(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the configured model is replaced by the module's tiny one (as the serving model)
    monkeypatch.setattr("sidecar.embeddings.model.load_embedder", lambda cfg: TinyEmbedder())
    file = tmp_path / "one.dcm"
    file.write_bytes(part10(query_image(0)))
    res = cli(archive, str(file), "--body-part", "ABDOMEN", "-k", "2")
    assert res.exit_code == 0, res.output
    rows = res.stdout.splitlines()[2:]
    assert archive.studies["M"].uid in rows[0] and archive.studies["D"].uid in rows[1]

    folder = tmp_path / "folder"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    for i, b in enumerate((0, 1, 2, 3)):
        ds = query_image(b, seed=200 + b)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.ImagePositionPatient = [0.0, 0.0, 10.0 * i]
        (folder / f"{i}.dcm").write_bytes(part10(ds))
    (folder / "notes.txt").write_text("not DICOM")
    res = cli(archive, str(folder), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["reference"]["kind"] == "dataset" and data["reference"]["slices"] == 4
    names = [archive.name_of(h["study_instance_uid"]) for h in data["hits"]]
    assert set(names[:2]) == {"R", "A"}


def test_cli_query_by_file_needs_the_serving_model(archive: Archive, tmp_path: Path) -> None:
    """The configured (built-in) model is not the model whose vectors serve queries."""
    file = tmp_path / "one.dcm"
    file.write_bytes(part10(query_image(0)))
    res = cli(archive, str(file))
    assert res.exit_code == 1, res.output
    assert "query by image is unavailable" in res.stderr
    assert f"vectors of model {archive.emb.serving.model_id}" in res.stderr


def test_cli_errors_and_usage(archive: Archive, tmp_path: Path) -> None:
    res = cli(archive, "--study", "1.2.3.4")
    assert res.exit_code == 1
    assert "no study with UID 1.2.3.4" in res.stderr and "Traceback" not in res.output
    res = cli(archive, "--study", archive.studies["P"].uid)
    assert res.exit_code == 1 and "pending" in res.stderr
    res = cli(archive, "--study", "1.2.x")
    assert res.exit_code == 1 and "not a valid UID" in res.stderr
    res = cli(archive, "--study", archive.studies["R"].uid, "--date", "2024")
    assert res.exit_code == 1 and "StudyDate" in res.stderr
    assert cli(archive).exit_code == 2
    assert cli(archive, "--study", "1.2.3", "--series", "1.2.4").exit_code == 2
    assert cli(archive, "--study", "1.2.3", "--level", "patient").exit_code == 2
    assert cli(archive, "--study", "1.2.3", "-k", "0").exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli(archive, str(empty))
    assert res.exit_code == 2 and "no DICOM file" in res.stderr


def test_cli_with_nothing_embedded(config_factory: Callable[..., Config], tmp_path: Path) -> None:
    config_factory()
    res = CliRunner().invoke(main, ["--config", str(tmp_path / "sidecar.yaml"), "search",
                                    "--study", "1.2.3"])
    assert res.exit_code == 1
    assert "nothing has been embedded" in res.stderr


def test_read_only_copy_follows_the_database_and_is_never_saved(
    tmp_path: Path, database_url: str,
) -> None:
    """Beside a running service: its unsaved vectors, a missing index file and a saved
    index all give the same answer; the copy never writes the index directory."""
    small = build_archive(tmp_path / "small", {k: LAYOUT[k] for k in ("R", "A", "B")},
                          extras=False, database_url=database_url)
    r, a = small.studies["R"].uid, small.studies["A"].uid
    index_dir = small.config.index_dir / small.emb.serving.model_id

    def run() -> Result:
        res = CliRunner().invoke(main, ["--config", str(small.config_path), "--log-level",
                                        "INFO", "search", "--study", r, "-k", "1", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["hits"][0]["study_instance_uid"] == a
        return res

    try:
        # 1. the service saved an empty index at start; its 14 vectors are not saved yet
        assert read_saved_facts(index_dir)["count"] == 0
        assert "14 vectors added from the database" in run().stderr
        assert read_saved_facts(index_dir)["count"] == 0, "never saved by the reader"
        # 2. the index files are gone: built in memory from the stored vectors
        for p in index_dir.glob("index*"):
            p.unlink()
        assert "building a read-only copy from the stored vectors" in run().stderr
        assert not list(index_dir.glob("index*"))
        # 3. the service saves: loaded as it is, nothing to add
        small.emb.maintain()
        assert read_saved_facts(index_dir)["count"] == 14
        assert "added from the database" not in run().stderr
        # the same through the API, with the parts a reader opens
        parts = ReadOnlyEmbedding(small.config, small.engine)
        assert parts.serving.model_id == small.emb.serving.model_id
        assert len(parts.serving.index) == len(small.emb.serving.index) == 14
        assert parts.embedder is None
        service = SearchService(small.config, small.engine, parts)
        ref = Reference.study(r)
        assert service.search(ref, k=5).hits == small.search(ref, k=5).hits
    finally:
        small.emb.close()
        small.engine.dispose()


def test_not_embedded_under_the_serving_model(archive: Archive) -> None:
    """During re-embedding the old model serves: a study with vectors of the new model
    only is reported as such."""

    class OldModelServing:
        model_id = "old-model"
        dim = archive.emb.serving.dim
        index = VectorIndex(archive.emb.serving.dim, archive.config.index)

    class Parts:
        serving = OldModelServing()
        embedder = None

    service = SearchService(archive.config, archive.engine, Parts())
    with pytest.raises(NotEmbedded, match="vectors of model tiny-.* only") as exc:
        service.search(Reference.study(archive.studies["R"].uid), k=1)
    assert exc.value.state == "embedded" and "old-model" in str(exc.value)


def test_series_means_follow_new_recomputed_and_deleted_series(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, database_url: str,
) -> None:
    """A service's in-memory series means take new and recomputed means without reading
    the others, and read them all again after a deletion; each time they equal a fresh
    load, and the answers follow."""
    small = build_archive(tmp_path / "small", {k: LAYOUT[k] for k in ("R", "A", "B")},
                          extras=False, database_url=database_url)
    service, model_id, dim = small.service, small.emb.serving.model_id, small.emb.serving.dim

    def as_dict(means: Any) -> dict[int, tuple[int, bytes]]:
        return {int(k): (int(s), v.tobytes())
                for k, s, v in zip(means.keys, means.study_keys, means.matrix, strict=True)}

    def same_as_fresh_load() -> None:
        fresh = SearchService(small.config, small.engine, small.emb)
        assert as_dict(service._means) == as_dict(fresh._mean_matrix(model_id, dim))

    try:
        r, a = small.studies["R"], small.studies["A"]
        assert small.names(service.search(Reference.study(r.uid), k=5))[0] == "A"
        before = service._means
        assert before is not None and before.keys.size == 4  # R, A (two), B
        # a new study like R, and a fifth slice for R's series (its mean is recomputed)
        store = InstanceStore(small.config, small.repo)
        new_study, new_series = generate_uid(), generate_uid()
        for i, spec in enumerate([0, 1, 2, 3]):
            store.store(part10(ct_slice(new_study, new_series, i + 1, i * 10.0, spec,
                                        patient="P20", date="20240110")), None, Origin("T", "h"))
        store.store(part10(ct_slice(r.uid, r.series[0], 5, 40.0, 7, patient="P1",
                                    date="20240105")), None, Origin("T", "h"))
        small.repo.mark_stable_studies(0.0)
        while small.emb.run_job().series:
            pass
        with caplog.at_level("DEBUG", logger="sidecar.search.service"):
            hits = service.search(Reference.study(a.uid), k=5)
        assert any("1 recomputed, 1 new" in m for m in caplog.messages), caplog.messages
        assert not any("loaded" in m and "series mean" in m for m in caplog.messages)
        assert new_study in {h.study_instance_uid for h in hits.hits}
        assert as_dict(service._means) != as_dict(before)
        same_as_fresh_load()
        # a deleted study: everything is read again
        assert small.repo.delete_study(small.studies["B"].uid) is not None
        caplog.clear()
        with caplog.at_level("DEBUG", logger="sidecar.search.service"):
            hits = service.search(Reference.study(a.uid), k=5)
        assert any("loaded 4 series mean vectors" in m for m in caplog.messages), caplog.messages
        assert small.studies["B"].uid not in {h.study_instance_uid for h in hits.hits}
        same_as_fresh_load()
    finally:
        small.emb.close()
        small.engine.dispose()
