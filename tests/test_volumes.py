"""Series as volumes (issue 22): geometry checks, resampling, the worker's volume step, search.

Phantoms are shapes in patient coordinates (mm) written as CT slices of any
orientation, tilt or spacing; the checks compare what the product builds with
where the shape physically is.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from sidecar.cli.main import main as cli
from sidecar.config import Config, VolumeConfig
from sidecar.db.models import VolumeVector
from sidecar.embeddings.model import TinyEmbedder
from sidecar.embeddings.volume import (
    SliceGeometry,
    VolumeRefused,
    build_volume,
    plan_volume,
    volume_planes,
)
from sidecar.embeddings.volume_worker import series_volume_vector
from sidecar.http.app import HttpServer
from sidecar.metrics import Metrics
from sidecar.search.front import QueryService
from sidecar.search.service import SearchService
from sidecar.search.types import Reference
from tests.conftest import file_meta, part10
from tests.test_http import serve
from tests.test_worker import Node

#: Every test that reaches the catalogue runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.catalogue

CT = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
Shape = Callable[[np.ndarray], np.ndarray]  # points (..., 3) in mm -> inside mask


def ellipsoid(centre: Sequence[float], radii: Sequence[float]) -> Shape:
    c, r = np.asarray(centre, dtype=np.float64), np.asarray(radii, dtype=np.float64)
    return lambda p: np.sum(((p - c) / r) ** 2, axis=-1) <= 1.0


def box(centre: Sequence[float], half: Sequence[float]) -> Shape:
    c, h = np.asarray(centre, dtype=np.float64), np.asarray(half, dtype=np.float64)
    return lambda p: np.all(np.abs(p - c) <= h, axis=-1)


def write_series(shape: Shape, *, n: int = 40, size: int = 48, pixel: float = 1.5,
                 step: float = 1.5, orientation: Sequence[float] = AXIAL,
                 tilt_degrees: float = 0.0, origin: Sequence[float] = (-36.0, -36.0, -30.0),
                 study: str | None = None, patient: str = "P1") -> list[Dataset]:
    """``shape`` as a CT series: soft tissue (HU 60) inside, air outside."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row, col)
    stack = normal + math.tan(math.radians(tilt_degrees)) * col  # tilt leans along the columns
    stack_step = stack / float(stack @ normal) * step
    study = study or generate_uid()
    series = generate_uid()
    jj, ii = np.meshgrid(np.arange(size), np.arange(size))
    out = []
    for k in range(n):
        ipp = np.asarray(origin, dtype=np.float64) + k * stack_step
        pts = ipp + (jj[..., None] * pixel) * row + (ii[..., None] * pixel) * col
        hu = np.where(shape(pts), 60.0, -1000.0)
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = patient, "Test^Volume", "CT"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240131", "101010", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [pixel, pixel]
        ds.SliceThickness = step
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
        ds.file_meta = file_meta(CT, ds.SOPInstanceUID)
        out.append(ds)
    return out


def geometries(series: list[Dataset]) -> list[SliceGeometry | None]:
    return [SliceGeometry(key=(i, 0), position=tuple(float(v) for v in ds.ImagePositionPatient),
                          orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
                          rows=int(ds.Rows), columns=int(ds.Columns),
                          spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])))
            for i, ds in enumerate(series)]


def physical_centroid(series: list[Dataset], cfg: VolumeConfig | None = None) -> np.ndarray:
    """Centre of the content of the volume the product builds, in LPS mm."""
    cfg = cfg or VolumeConfig()
    plan = plan_volume(geometries(series), cfg)
    slices = {}
    for key in plan.needed:
        ds = series[key[0]]  # type: ignore[index]
        hu = ds.pixel_array.astype(np.float32) - 1024
        slices[key] = np.clip((hu + 160) / 400, 0, 1).astype(np.float32)
    vol = build_volume(plan, slices)
    z, y, x = np.nonzero(vol.voxels > 0.4)
    return np.asarray(vol.origin) + vol.spacing_mm * np.asarray([x.mean(), y.mean(), z.mean()])


# --------------------------------------------------------------- geometry


def test_volume_sits_where_the_shape_is_whatever_the_acquisition() -> None:
    centre = (4.0, -6.0, 2.0)
    shape = ellipsoid(centre, (14.0, 9.0, 11.0))
    for kwargs in ({}, {"tilt_degrees": 20.0}, {"orientation": SAGITTAL,
                                                "origin": (30.0, -36.0, 36.0)}):
        found = physical_centroid(write_series(shape, **kwargs))
        assert np.linalg.norm(found - centre) < 1.5, (kwargs, found)


def test_variable_spacing_is_resampled_from_positions() -> None:
    shape = ellipsoid((0.0, 0.0, 0.0), (12.0, 12.0, 12.0))
    series = write_series(shape, n=50, step=1.0)
    kept = [ds for i, ds in enumerate(series) if i % 3 != 1]  # steps of 1 and 2 mm
    found = physical_centroid(kept)
    assert np.linalg.norm(found) < 1.5
    plan = plan_volume(geometries(kept), VolumeConfig())
    assert any("variable slice spacing" in note for note in plan.notes)


def _broken(kind: str) -> tuple[list[SliceGeometry | None], str]:
    series = write_series(box((0, 0, 0), (10, 10, 10)), n=30, size=16)
    geoms = geometries(series)
    if kind == "few":
        return geoms[:10], "fewer than volumes.min_slices"
    if kind == "duplicate":
        geoms[5] = SliceGeometry(**{**geoms[5].__dict__, "position": geoms[6].position})  # type: ignore[union-attr]
        return geoms, "share a position"
    if kind == "gap":
        return geoms[:12] + geoms[17:], "a gap of"
    if kind == "orientation":
        geoms[3] = SliceGeometry(**{**geoms[3].__dict__, "orientation": SAGITTAL})  # type: ignore[union-attr]
        return geoms, "disagree on orientation"
    if kind == "size":
        geoms[3] = SliceGeometry(**{**geoms[3].__dict__, "rows": 20})  # type: ignore[union-attr]
        return geoms, "disagree on size"
    if kind == "spacing":
        geoms[3] = SliceGeometry(**{**geoms[3].__dict__, "spacing": (0.7, 0.7)})  # type: ignore[union-attr]
        return geoms, "disagree on pixel spacing"
    if kind == "geometry":
        geoms[2] = None
        return geoms, "have no position or orientation"
    if kind == "tilt":
        tilted = write_series(box((0, 0, 0), (10, 10, 10)), n=30, size=16, tilt_degrees=50.0)
        return geometries(tilted), "degrees to their normal"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["few", "duplicate", "gap", "orientation", "size", "spacing",
                                  "geometry", "tilt"])
def test_series_that_is_not_one_volume_is_refused_with_its_reason(kind: str) -> None:
    geoms, words = _broken(kind)
    with pytest.raises(VolumeRefused, match=words):
        plan_volume(geoms, VolumeConfig())


def test_the_resampling_reads_only_the_slices_it_needs() -> None:
    series = write_series(box((0, 0, 0), (10, 10, 10)), n=200, size=16, pixel=1.0, step=0.5)
    plan = plan_volume(geometries(series), VolumeConfig(grid_voxels=32))
    assert plan.spacing_mm == pytest.approx(100.0 / 32, rel=0.01)
    assert len(plan.needed) <= 2 * plan.targets_mm.size < 200


def test_planes_cross_the_content_not_the_empty_margin() -> None:
    vol = np.zeros((40, 40, 40), dtype=np.float32)
    vol[30:38, 4:12, 20:28] = 1.0  # a small object in a corner
    planes = volume_planes(vol)
    assert len(planes) == 9
    assert all(p.max() == 1.0 for p in planes), "every plane must cut the object"


# --------------------------------------------------------------- vectors

CFG = Config.model_validate({"volumes": {"enabled": True}})


def _vector(series: list[Dataset], embedder: Any) -> np.ndarray:
    built = series_volume_vector(list(enumerate(series)), lambda i, _f: series[i], CFG, embedder)
    assert built.vector is not None, built.reason
    return built.vector


def test_the_same_anatomy_acquired_differently_gives_the_same_vector() -> None:
    emb = TinyEmbedder()
    shape = ellipsoid((0.0, 0.0, 0.0), (20.0, 12.0, 16.0))
    axial = _vector(write_series(shape), emb)
    sagittal = _vector(write_series(shape, orientation=SAGITTAL, origin=(30.0, -36.0, 36.0)),
                       emb)
    other = _vector(write_series(box((0.0, 0.0, 0.0), (8.0, 25.0, 6.0))), emb)
    same, different = float(axial @ sagittal), float(axial @ other)
    # the tiny test embedder maps everything close together: compare distances
    assert 1.0 - same < 0.2 * (1.0 - different), (same, different)


def test_colour_and_refused_series_say_why() -> None:
    series = write_series(box((0, 0, 0), (10, 10, 10)), n=20, size=16)
    series[0].PhotometricInterpretation = "RGB"
    built = series_volume_vector(list(enumerate(series)), lambda i, _f: series[i], CFG,
                                 TinyEmbedder())
    assert built.vector is None and "colour" in built.reason


# ------------------------------------------------- worker, catalogue, search


def _run_until_idle(node: Node) -> None:
    for _ in range(20):
        if node.emb.run_job().idle:
            return
    raise AssertionError("the embedding job does not converge")


@pytest.fixture
def volume_node(config_factory: Callable[..., Config]) -> Iterator[Node]:
    node = Node(config_factory({"preprocess": {"slice_spacing_mm": 3.0},
                                 "volumes": {"enabled": True}}))
    node.open()
    yield node
    node.dispose()


def test_series_volumes_rank_series_and_studies(volume_node: Node, tmp_path: Path) -> None:
    node = volume_node
    sphere = ellipsoid((0.0, 0.0, 0.0), (18.0, 18.0, 18.0))
    sphere2 = ellipsoid((1.0, -1.0, 0.0), (17.0, 18.5, 18.0))
    slab = box((0.0, 0.0, 0.0), (28.0, 6.0, 12.0))
    studies = {}
    for name, shape, patient in (("a", sphere, "P1"), ("b", sphere2, "P2"), ("c", slab, "P3")):
        series = write_series(shape, patient=patient)
        studies[name] = series[0].StudyInstanceUID
        node.put(*series)
    broken = write_series(slab, n=20, patient="P4")
    for ds in broken[10:]:
        ds.ImagePositionPatient = broken[9].ImagePositionPatient
    node.put(*broken)
    node.stabilise()
    _run_until_idle(node)
    with Session(node.engine) as s:
        rows = s.scalars(select(VolumeVector)).all()
    assert len(rows) == 4
    assert sum(r.vector is not None for r in rows) == 3
    (refused,) = [r for r in rows if r.vector is None]
    assert "share a position" in refused.reason

    search = SearchService(node.config, node.engine, node.emb, refresh_interval=0.0)
    result = search.search(Reference.study(studies["a"]), k=5)
    hits = result.hits
    assert [h.study_instance_uid for h in hits[:2]] == [studies["b"], studies["c"]]
    assert all(h.ranked_by == "volume" for h in hits[:2])
    assert hits[0].score > hits[1].score
    assert hits[0].calibrated_score is not None and hits[1].calibrated_score is not None
    assert hits[0].calibrated_score >= hits[1].calibrated_score
    assert hits[0].match is not None, "why it matched: the best slice pair"
    as_json = hits[0].to_dict()
    assert as_json["ranked_by"] == "volume" and "calibrated_score" in as_json

    # the series with no volume vector is asked by its slices
    asked = search.search(Reference.series(broken[0].SeriesInstanceUID), k=3, level="series")
    assert asked.hits and all(h.ranked_by == "slices" for h in asked.hits)

    # a deleted study leaves the volume index at the next look
    assert node.repo.delete_study(studies["b"]) is not None
    again = search.search(Reference.study(studies["a"]), k=5)
    assert studies["b"] not in [h.study_instance_uid for h in again.hits]

    # sidecar status names the volumes and the reason for the refused one
    cfg_path = tmp_path / "status.yaml"
    cfg_path.write_text(json.dumps({"storage": {"data_dir": str(node.config.data_dir)},
                                    "database": {"url": node.config.database.url}}))
    out = CliRunner().invoke(cli, ["status", "--json", "--config", str(cfg_path)])
    assert out.exit_code == 0, out.output
    status = json.loads(out.output)["volumes"]
    assert status["built"] == 2 and status["slice_wise_only"] == 1
    assert "share a position" in status["reasons"][0]["reason"]


def test_a_late_instance_rebuilds_the_series_volume(volume_node: Node) -> None:
    node = volume_node
    series = write_series(ellipsoid((0, 0, 0), (15, 15, 15)), n=30)
    node.put(*series[:20])
    node.stabilise()
    _run_until_idle(node)
    with Session(node.engine) as s:
        first = s.scalars(select(VolumeVector)).one()
    assert first.slices == 20
    node.put(*series[20:])
    node.repo.mark_stable_studies(60.0, now=dt.datetime.now(dt.UTC).replace(tzinfo=None)
                                  + dt.timedelta(minutes=10))
    _run_until_idle(node)
    with Session(node.engine) as s:
        second = s.scalars(select(VolumeVector)).one()
    assert second.slices == 30 and second.id != first.id


def test_a_zip_of_a_series_posted_over_http_is_searched_as_a_volume(volume_node: Node) -> None:
    node = volume_node
    sphere = ellipsoid((0.0, 0.0, 0.0), (18.0, 18.0, 18.0))
    slab = box((0.0, 0.0, 0.0), (28.0, 6.0, 12.0))
    near = write_series(ellipsoid((1.0, 0.0, -1.0), (17.0, 18.0, 19.0)), patient="P2")
    far = write_series(slab, patient="P3")
    node.put(*near, *far)
    node.stabilise()
    _run_until_idle(node)
    search = SearchService(node.config, node.engine, node.emb, refresh_interval=0.0)
    query = QueryService(node.config, search, metrics=Metrics())
    servers: list[HttpServer] = []
    try:
        client = serve(query, Metrics(), lambda: {"ok": True}, servers)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for i, ds in enumerate(write_series(sphere, patient="P9")):
                zf.writestr(f"series/{i:03d}.dcm", part10(ds))
            zf.writestr("README.txt", "not DICOM: skipped")
        answer = client.post(buf.getvalue(), content_type="application/zip", k=2)
        assert answer.status == 200, answer.body
        hits = answer.json()["hits"]
        assert [h["study_instance_uid"] for h in hits] == [near[0].StudyInstanceUID,
                                                            far[0].StudyInstanceUID]
        assert [h["ranked_by"] for h in hits] == ["volume", "volume"]
        assert hits[0]["calibrated_score"] >= hits[1]["calibrated_score"]
        bad = client.post(b"PK\x03\x04 broken", content_type="application/zip")
        assert bad.status == 400 and bad.error["kind"] == "not_zip"
    finally:
        for server in servers:
            server.stop()
        query.close()


def enhanced(series: list[Dataset]) -> Dataset:
    """The slices of ``series`` as one Enhanced CT multi-frame object (functional groups)."""
    first = series[0]
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
    ds.PatientID, ds.Modality = first.PatientID, "CT"
    ds.NumberOfFrames = len(series)
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    orient, measures, voi = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    voi.RescaleIntercept, voi.RescaleSlope, voi.RescaleType = -1024, 1, "HU"
    shared.PlaneOrientationSequence = [orient]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for sl in reversed(series):  # frames need not be in position order
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = sl.ImagePositionPatient
        item.PlanePositionSequence = [pos]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = b"".join(sl.PixelData for sl in reversed(series))
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    return ds


def test_an_enhanced_multi_frame_object_is_one_volume() -> None:
    emb = TinyEmbedder()
    shape = ellipsoid((0.0, 0.0, 0.0), (20.0, 12.0, 16.0))
    series = write_series(shape)
    single = _vector(series, emb)
    multi = _vector([enhanced(series)], emb)
    other = _vector(write_series(box((0.0, 0.0, 0.0), (8.0, 25.0, 6.0))), emb)
    assert 1.0 - float(single @ multi) < 0.2 * (1.0 - float(single @ other))
