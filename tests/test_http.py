"""The HTTP API (``sidecar.http.app``), over real HTTP on loopback.

One small archive per module, built with the tiny deterministic embedder
(``tests/test_search.py`` explains the construction: slices are noisy copies
of a few base images, same base ~0.9999 cosine, different bases <= ~0.45):

| study | patient | series (modality, body part: bases) | score vs R |
|-------|---------|-------------------------------------|------------|
| R     | P1      | CT HEAD: 0 1 2 3                    | (reference)|
| A     | P2      | CT HEAD: 0 1 2 3; CT CHEST: 8 8     | ~1.00      |
| S     | P1      | CT HEAD: 0 1 2 4                    | ~0.81      |
| C     | P4      | MR HEAD: 0 1 2 6                    | ~0.76      |
| B     | P3      | CT CHEST: 0 1 4 5                   | ~0.57      |
| E     | P7      | CT HEAD: 4 5 6 7                    | ~0.23      |

plus F (embedding failed), K (a report, skipped) and P (pending). The
server runs with ``query.default_k: 2``, ``query.max_k: 5`` and
``http.max_upload_mb: 1``. Base 8 is found in A's CHEST series only.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from sidecar.config import HttpConfig, QueryConfig
from sidecar.http.app import HttpServer, HttpServerError, create_app
from sidecar.metrics import CatalogueFigures, Metrics
from sidecar.search.front import QueryService
from sidecar.search.service import SearchService
from sidecar.search.types import Reference
from tests.conftest import free_port
from tests.test_search import LAYOUT, Archive, build_archive, ct_slice, make_sr, part10

HTTP_LAYOUT = {name: LAYOUT[name] for name in ("R", "A", "S", "C", "B", "E")}
EMBEDDED = sum(len(bases) for _, _, series in HTTP_LAYOUT.values() for _, _, bases, _ in series)


# ------------------------------------------------------------------ client
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        data = self.json()
        assert set(data) == {"error"}, data
        err: dict[str, Any] = data["error"]
        assert isinstance(err["kind"], str) and isinstance(err["message"], str) and err["message"]
        return err


@dataclass
class Client:
    base: str

    def request(
        self, method: str, path: str, params: dict[str, Any] | None = None, *,
        data: bytes | Iterable[bytes] | None = None, headers: dict[str, str] | None = None,
    ) -> Answer:
        url = self.base + path + ("?" + urlencode(params, doseq=True) if params else "")
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                              resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                              exc.read())

    def raw_post(self, body: bytes, **params: Any) -> Answer:
        """POST with no Content-Type at all (urllib always adds one)."""
        split = urlsplit(self.base)
        conn = http.client.HTTPConnection(split.hostname or "", split.port, timeout=30)
        try:
            conn.putrequest("POST", "/v1/search?" + urlencode(params, doseq=True))
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **params: Any) -> Answer:
        return self.request("GET", path, params)

    def post(self, body: bytes | Iterable[bytes], content_type: str | None = "application/dicom",
             **params: Any) -> Answer:
        headers = {"Content-Type": content_type} if content_type is not None else {}
        return self.request("POST", "/v1/search", params, data=body, headers=headers)


# ----------------------------------------------------------------- fixtures
@dataclass
class Api:
    archive: Archive
    client: Client
    query: QueryService
    health: dict[str, Any]
    servers: list[HttpServer] = field(default_factory=list)

    def name_of(self, study_uid: str) -> str:
        return self.archive.name_of(study_uid)

    def names(self, body: dict[str, Any]) -> list[str]:
        return [self.name_of(h["study_instance_uid"]) for h in body["hits"]]

    def uid(self, name: str) -> str:
        return self.archive.studies[name].uid

    def audit(self) -> list[dict[str, Any]]:
        lines = self.query.audit.path.read_text().splitlines()
        return [json.loads(line) for line in lines]

    def stored_file(self, sop: str) -> bytes:
        found = self.archive.repo.find_instance(sop)
        assert found is not None
        return (self.archive.config.storage_dir / found.file_path).read_bytes()


def figures(archive: Archive) -> Callable[[], CatalogueFigures]:
    def read() -> CatalogueFigures:
        rep = archive.repo.status()
        return CatalogueFigures(rep.instances_by_state, rep.studies, rep.studies_stable,
                                rep.stored_bytes)

    return read


def serve(query: QueryService, metrics: Metrics, health: Callable[[], dict[str, Any]],
          servers: list[HttpServer]) -> Client:
    app = create_app(query, metrics, health, max_upload_mb=1)
    server = HttpServer(HttpConfig(port=free_port()), app)
    host, port = server.start()
    servers.append(server)
    return Client(f"http://{host}:{port}")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    archive = build_archive(tmp_path_factory.mktemp("http"), HTTP_LAYOUT)
    cfg = archive.config.model_copy(update={"query": QueryConfig(default_k=2, max_k=5)})
    metrics = Metrics(catalogue=figures(archive))
    query = QueryService(cfg, archive.service, metrics=metrics)
    health: dict[str, Any] = {"ok": True, "dicom": "listening", "worker": "running"}
    servers: list[HttpServer] = []
    try:
        client = serve(query, metrics, lambda: dict(health), servers)
        yield Api(archive, client, query, health, servers)
    finally:
        for server in servers:
            server.stop()
        query.close()
        archive.emb.close()
        archive.engine.dispose()


@pytest.fixture
def other_server(api: Api) -> Iterator[Callable[[QueryService], Client]]:
    """Serve another QueryService over the same archive (stopped after the test)."""
    servers: list[HttpServer] = []

    def start(query: QueryService) -> Client:
        return serve(query, Metrics(), lambda: {"ok": True}, servers)

    yield start
    for server in servers:
        server.stop()


# ------------------------------------------------------------- GET similar
def test_similar_study_ranks_like_the_search_service(api: Api) -> None:
    r = api.uid("R")
    answer = api.client.get("/v1/similar", study=r, k=3)
    assert answer.status == 200
    body = answer.json()
    assert api.names(body) == ["A", "C", "B"]
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3]
    assert body["hits"][0]["score"] > 0.99 and 0.70 < body["hits"][1]["score"] < 0.80
    assert body["level"] == "study" and body["k"] == 3
    assert body["reference"] == {"kind": "study", "uid": r, "study_instance_uid": r,
                                 "slices": 4, "excluded_studies": 2, "note": ""}
    # the same dict as `sidecar search --json` (SearchResult.to_dict), timing aside
    direct = api.archive.service.search(Reference.study(r), k=3).to_dict()
    assert body["hits"] == direct["hits"] and body["model_id"] == direct["model_id"]


def test_k_default_and_cap_come_from_the_query_config(api: Api) -> None:
    r = api.uid("R")
    default = api.client.get("/v1/similar", study=r).json()
    assert default["k"] == 2 and api.names(default) == ["A", "C"]
    capped = api.client.get("/v1/similar", study=r, k=50, include_same_patient=1).json()
    assert capped["k"] == 5  # lowered to max_k, not refused
    assert api.names(capped) == ["A", "S", "C", "B", "E"]


def test_same_patient_and_levels(api: Api) -> None:
    r = api.archive.studies["R"]
    with_patient = api.client.get("/v1/similar", study=r.uid, k=3, include_same_patient="true")
    assert api.names(with_patient.json()) == ["A", "S", "C"]

    series = api.client.get("/v1/similar", series=r.series[0], k=5, level="series").json()
    assert series["level"] == "series" and series["reference"]["kind"] == "series"
    a, c = api.archive.studies["A"], api.archive.studies["C"]
    assert [h["series_instance_uid"] for h in series["hits"][:2]] == [a.series[0], c.series[0]]

    image = api.client.get("/v1/similar", instance=r.sops[0][0], k=3, level="image").json()
    assert image["level"] == "image" and image["reference"]["slices"] == 1
    first_slices = {api.archive.studies[n].sops[0][0] for n in ("A", "C", "B")}  # base 0
    assert {h["sop_instance_uid"] for h in image["hits"]} == first_slices


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"modality": "MR"}, ["C"]),
        ({"modality": ["XA", "MR"]}, ["C"]),
        ({"modality": "XA\\MR"}, ["C"]),
        ({"modality": "ct"}, ["A", "B", "E"]),
        ({"study_date": "20240101-20240131"}, ["A", "E"]),
        ({"study_date": "-20231231"}, ["C"]),
        ({"body_part": "CHEST"}, ["A", "B"]),
        ({"body_part": "he*", "modality": "CT"}, ["A", "E"]),
    ],
)
def test_filters(api: Api, params: dict[str, Any], expected: list[str]) -> None:
    answer = api.client.get("/v1/similar", study=api.uid("R"), k=5, **params)
    assert answer.status == 200, answer.body
    assert api.names(answer.json()) == expected


# ------------------------------------------------------------------ errors
def test_unknown_reference_is_404(api: Api) -> None:
    for name in ("study", "series", "instance"):
        answer = api.client.get("/v1/similar", **{name: "1.2.3.4"})
        assert answer.status == 404
        err = answer.error
        assert err["kind"] == "unknown_reference" and "1.2.3.4" in err["message"]


def test_not_embedded_is_409_with_its_state(api: Api) -> None:
    pending = api.client.get("/v1/similar", study=api.uid("P"))
    assert pending.status == 409
    err = pending.error
    assert err["kind"] == "not_embedded" and err["state"] == "pending"
    assert err["counts"] == {"pending": 1} and "still receiving" in err["message"]

    failed = api.client.get("/v1/similar", study=api.uid("F"))
    assert failed.status == 409 and failed.error["state"] == "failed"
    skipped = api.client.get("/v1/similar", study=api.uid("K"))
    assert skipped.status == 409 and skipped.error["state"] == "skipped"


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({}, "exactly one reference"),
        ({"study": "1.2.3", "series": "1.2.4"}, "exactly one reference"),
        ({"study": "1.2.abc"}, "not a valid UID"),
        ({"study": "R", "k": "abc"}, "'k'"),
        ({"study": "R", "k": 0}, "'k'"),
        ({"study": "R", "k": -3}, "'k'"),
        ({"study": "R", "level": "patient"}, "'level'"),
        ({"study": "R", "include_same_patient": "perhaps"}, "'include_same_patient'"),
        ({"study": "R", "study_date": "20240230"}, "StudyDate"),
        ({"study": "R", "modality": "C-T"}, "Modality"),
        ({"study": "R", "modalities": "CT"}, "unknown query parameter 'modalities'"),
        ({"study": ["R", "R"]}, "more than once"),
    ],
)
def test_bad_queries_are_400(api: Api, params: dict[str, Any], needle: str) -> None:
    r = api.uid("R")
    params = {k: ([r] * len(v) if isinstance(v, list) else r if v == "R" else v)
              for k, v in params.items()}
    answer = api.client.get("/v1/similar", **params)
    assert answer.status == 400
    err = answer.error
    assert err["kind"] == "bad_query" and needle in err["message"], err


def test_unknown_route_and_method(api: Api) -> None:
    missing = api.client.get("/v2/similar", study=api.uid("R"))
    assert missing.status == 404
    assert missing.error["kind"] == "not_found" and "/v1/similar" in missing.error["message"]
    wrong = api.client.request("POST", "/v1/similar", data=b"")
    assert wrong.status == 405 and wrong.error["kind"] == "method_not_allowed"
    assert "GET" in wrong.headers.get("allow", "")


def test_index_unavailable_is_503(api: Api, other_server: Callable[[QueryService], Client]) -> None:
    off = QueryService(api.archive.config, SearchService(api.archive.config,
                                                         api.archive.engine, None))
    try:
        answer = other_server(off).get("/v1/similar", study=api.uid("R"))
    finally:
        off.close()
    assert answer.status == 503
    assert answer.error["kind"] == "unavailable" and "turned off" in answer.error["message"]


def test_unexpected_error_is_a_bare_500_and_logged(
    api: Api, other_server: Callable[[QueryService], Client], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = QueryService(api.archive.config, SearchService(api.archive.config,
                                                            api.archive.engine, api.archive.emb))

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom while reading Doe^Secret")

    monkeypatch.setattr(broken.search_service, "search", fail)
    try:
        with caplog.at_level(logging.ERROR, logger="sidecar.http.app"):
            answer = other_server(broken).get("/v1/similar", study=api.uid("R"))
    finally:
        broken.close()
    assert answer.status == 500
    assert answer.error["kind"] == "internal"
    assert b"boom" not in answer.body and b"Doe" not in answer.body
    assert b"Traceback" not in answer.body
    logged = [r for r in caplog.records if r.name == "sidecar.http.app" and r.exc_info]
    assert len(logged) == 1 and "GET /v1/similar" in logged[0].getMessage()
    assert isinstance(logged[0].exc_info[1], RuntimeError)  # type: ignore[index]


# ------------------------------------------------------------ POST search
def anonymised(data: bytes, *, patient: str = "P9") -> bytes:
    """The same image under new UIDs and another patient: not in the archive."""
    ds = dcmread(BytesIO(data))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = patient
    return part10(ds)


def test_post_finds_the_study_an_image_came_from(api: Api) -> None:
    a = api.archive.studies["A"]
    chest = api.stored_file(a.sops[1][0])  # base 8: only in A's CHEST series
    answer = api.client.post(anonymised(chest), k=3)
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["reference"]["kind"] == "dataset"
    assert body["reference"]["study_instance_uid"] == ""  # its study is not archived
    assert api.names(body)[0] == "A" and body["hits"][0]["score"] > 0.99
    assert body["hits"][0]["series_instance_uid"] == a.series[1]
    assert all(h["score"] < 0.6 for h in body["hits"][1:])

    image = api.client.post(anonymised(chest), "application/octet-stream", level="image", k=2)
    assert image.status == 200
    assert {h["sop_instance_uid"] for h in image.json()["hits"]} == set(a.sops[1])


def test_post_of_an_archived_image_excludes_its_own_study(api: Api) -> None:
    a = api.archive.studies["A"]
    body = api.client.post(api.stored_file(a.sops[1][0]), k=5).json()
    assert body["reference"]["study_instance_uid"] == a.uid
    assert body["reference"]["uid"] == a.sops[1][0]
    assert body["reference"]["excluded_studies"] == 1
    assert "A" not in api.names(body)


def test_post_filters_and_no_content_type(api: Api) -> None:
    e = api.archive.studies["E"]
    base4 = anonymised(api.stored_file(e.sops[0][0]))  # base 4: in S, B and E
    plain = api.client.raw_post(base4, k=5)
    assert plain.status == 200, plain.body
    assert set(api.names(plain.json())[:3]) == {"S", "B", "E"}
    # urllib's (and curl --data-binary's) default type is accepted too
    chest = api.client.post(base4, None, k=5, body_part="CHEST")
    assert api.names(chest.json()) == ["B", "A"]


@pytest.mark.filterwarnings("ignore:VR lookup failed:UserWarning")  # pydicom, on the garbage
def test_post_errors(api: Api) -> None:
    image = part10(ct_slice(generate_uid(), generate_uid(), 1, 0.0, 0, patient="P9",
                            date="20240601"))
    for ctype in ("multipart/form-data; boundary=x", "application/json", "text/plain"):
        wrong = api.client.post(image, ctype)
        assert wrong.status == 415 and wrong.error["kind"] == "unsupported_media_type"
        assert "application/dicom" in wrong.error["message"]

    empty = api.client.post(b"")
    assert empty.status == 400 and empty.error["kind"] == "not_dicom"
    garbage = api.client.post(b"this is not a DICOM file at all, not even close" * 10)
    assert garbage.status == 400 and garbage.error["kind"] == "not_dicom"

    report = api.client.post(part10(make_sr(generate_uid(), "P9")))
    assert report.status == 400
    assert report.error["kind"] == "bad_query" and "cannot be embedded" in report.error["message"]

    uid_param = api.client.post(image, study=api.uid("R"))
    assert uid_param.status == 400 and "unknown query parameter 'study'" in uid_param.error[
        "message"]
    bad_level = api.client.post(image, level="patient")
    assert bad_level.status == 400 and "'level'" in bad_level.error["message"]


def big_image() -> bytes:
    """A valid CT image of about 1.2 MiB (the server's limit is 1 MiB)."""
    ds: Dataset = ct_slice(generate_uid(), generate_uid(), 1, 0.0, 0, patient="P9",
                           date="20240601")
    ds.Rows = ds.Columns = 800
    ds.PixelData = np.zeros((800, 800), dtype=np.uint16).tobytes()
    data = part10(ds)
    assert 1024 * 1024 < len(data) < 2 * 1024 * 1024
    return data


def test_upload_too_large_is_413(api: Api) -> None:
    data = big_image()
    declared = api.client.post(data)  # refused on its Content-Length
    assert declared.status == 413 and declared.error["kind"] == "payload_too_large"
    assert "1 MiB" in declared.error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked, counted while read
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]

    streamed = api.client.post(chunks())
    assert streamed.status == 413 and streamed.error["kind"] == "payload_too_large"

    # other answers given before the body is read reach a client still sending it too
    assert api.client.post(data, "text/plain").status == 415
    assert api.client.post(data, level="patient").status == 400

    # a client that waits for 100 Continue is answered before it sends anything
    split = urlsplit(api.client.base)
    conn = http.client.HTTPConnection(split.hostname or "", split.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/search")
        conn.putheader("Content-Type", "application/dicom")
        conn.putheader("Content-Length", str(len(data)))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert json.loads(resp.read())["error"]["kind"] == "payload_too_large"
    finally:
        conn.close()
    # the server is fine afterwards
    assert api.client.get("/healthz").status == 200


# ------------------------------------------------------- health, metrics
def test_healthz(api: Api) -> None:
    ok = api.client.get("/healthz")
    assert ok.status == 200
    assert ok.json() == {"status": "ok", "dicom": "listening", "worker": "running"}
    api.health["ok"] = False
    api.health["worker"] = "stopped"
    try:
        down = api.client.get("/healthz")
    finally:
        api.health["ok"] = True
        api.health["worker"] = "running"
    assert down.status == 503
    assert down.json() == {"status": "unhealthy", "dicom": "listening", "worker": "stopped"}


def test_healthz_when_the_check_raises(api: Api) -> None:
    def broken() -> dict[str, Any]:
        raise OSError("database locked")

    servers: list[HttpServer] = []
    client = serve(api.query, Metrics(), broken, servers)
    try:
        answer = client.get("/healthz")
    finally:
        for server in servers:
            server.stop()
    assert answer.status == 503 and answer.json()["status"] == "unhealthy"
    assert "database locked" not in answer.body.decode()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics(api: Api) -> None:
    assert api.client.get("/v1/similar", study=api.uid("R"), level="series").status == 200
    answer = api.client.get("/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = answer.body.decode()
    assert f'sidecar_instances{{state="embedded"}} {float(EMBEDDED)}' in text
    samples = metric_samples(text)
    assert samples[("sidecar_instances", (("state", "failed"),))] == 2
    assert samples[("sidecar_instances", (("state", "pending"),))] == 1
    assert samples[("sidecar_embedding_queue_depth", ())] == 1
    assert samples[("sidecar_instances_received", ())] == EMBEDDED + 2 + 1 + 1
    buckets = [line for line in text.splitlines()
               if line.startswith("sidecar_query_duration_seconds_bucket{")
               and 'interface="http"' in line and 'level="series"' in line]
    assert buckets and any('le="+Inf"' in line for line in buckets)
    assert samples[("sidecar_query_duration_seconds_bucket",
                    (("interface", "http"), ("le", "+Inf"), ("level", "series")))] >= 1
    assert samples[("sidecar_query_duration_seconds_count",
                    (("interface", "http"), ("level", "series")))] >= 1


def test_queries_are_counted_and_audited(api: Api) -> None:
    before_audit = len(api.audit())
    before = metric_samples(api.client.get("/metrics").body.decode())
    key = ("sidecar_queries_total", (("interface", "http"), ("outcome", "unknown_reference")))

    r = api.uid("R")
    assert api.client.get("/v1/similar", study=r, k=2).status == 200
    assert api.client.get("/v1/similar", study="1.2.3.4").status == 404
    assert api.client.get("/v1/similar", study=api.uid("P")).status == 409
    assert api.client.get("/v1/similar", study=r, k="x").status == 400  # refused before a query
    forwarded = api.client.request("GET", "/v1/similar", {"study": r},
                                   headers={"X-Forwarded-For": "10.9.8.7"})
    assert forwarded.status == 200

    records = api.audit()[before_audit:]
    assert [rec["outcome"] for rec in records] == ["ok", "unknown_reference", "not_embedded",
                                                   "ok"]
    assert all(rec["interface"] == "http" for rec in records)
    assert [rec["address"] for rec in records] == ["127.0.0.1"] * 3 + ["10.9.8.7"]
    assert records[0]["reference"] == {"kind": "study", "uid": r}
    assert records[0]["studies"] == [api.uid("A"), api.uid("C")]
    after = metric_samples(api.client.get("/metrics").body.decode())
    assert after[key] == before.get(key, 0.0) + 1


def test_no_uids_in_logs_at_info(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    r = api.archive.studies["R"]
    with caplog.at_level(logging.INFO):
        assert api.client.get("/v1/similar", study=r.uid).status == 200
        assert api.client.get("/v1/similar", study=api.uid("P")).status == 409
    shown = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO]
    assert not any(r.uid in msg or api.uid("P") in msg for msg in shown), shown
    with caplog.at_level(logging.DEBUG, logger="sidecar.http.app"):
        assert api.client.get("/v1/similar", study=r.uid).status == 200
        deadline = time.monotonic() + 5  # logged once the answer is sent: wait for it
        while time.monotonic() < deadline:
            debug = [rec.getMessage() for rec in caplog.records if rec.name == "sidecar.http.app"]
            if any(msg.startswith("HTTP GET /v1/similar -> 200") for msg in debug):
                break
            time.sleep(0.01)
    assert any(msg.startswith("HTTP GET /v1/similar -> 200") for msg in debug), debug
    assert not any(r.uid in msg for msg in debug)


# ------------------------------------------------------------------ server
def test_server_start_stop_and_port_in_use(api: Api) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        app = create_app(api.query, Metrics(), lambda: {"ok": True})
        with pytest.raises(HttpServerError, match=f"cannot listen on 127.0.0.1:{port}"):
            HttpServer(HttpConfig(port=port), app).start()

    server = HttpServer(HttpConfig(port=free_port()), app)
    host, bound = server.start()
    try:
        assert server.running
        with pytest.raises(HttpServerError, match="already running"):
            server.start()
        assert Client(f"http://{host}:{bound}").get("/healthz").status == 200
    finally:
        server.stop()
    assert not server.running
    server.stop()  # idempotent
    with pytest.raises(OSError), socket.create_connection((host, bound), timeout=2):
        pass


def test_port_zero_picks_a_free_port(api: Api) -> None:
    cfg = HttpConfig.model_construct(**{**dict(HttpConfig()), "port": 0})
    server = HttpServer(cfg, create_app(api.query, Metrics(), lambda: {"ok": True}))
    host, port = server.start()
    try:
        assert host == "127.0.0.1" and port > 0
        assert Client(f"http://{host}:{port}").get("/healthz").status == 200
    finally:
        server.stop()


def test_no_signal_handlers_are_installed(api: Api) -> None:
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = HttpServer(HttpConfig(port=free_port()),
                        create_app(api.query, Metrics(), lambda: {"ok": True}))
    server.start()
    try:
        during = {sig: signal.getsignal(sig) for sig in before}
    finally:
        server.stop()
    assert during == before
    assert {sig: signal.getsignal(sig) for sig in before} == before


