"""The page for radiologists (``sidecar.http.ui``): over real HTTP, and in a real browser.

One running ``Sidecar`` per module (HTTP API on, the tiny deterministic embedder),
its studies sent by C-STORE (pynetdicom) and embedded. Slices are the noisy base
images of ``tests/test_search.py`` (same base ~0.9999 cosine, different <= ~0.45):

| study | patient | series (modality, body part: bases) | vs R  |
|-------|---------|-------------------------------------|-------|
| R     | P1      | CT HEAD: 0 1 2 3                    | (ref) |
| A     | P2      | CT HEAD: 0 1 2 3; CT CHEST: 8 8     | ~1.00 |
| S     | P1      | CT HEAD: 0 1 2 4                    | ~0.81 |
| C     | P4      | MR HEAD: 0 1 2 6                    | ~0.76 |
| B     | P3      | CT CHEST: 0 1 4 5                   | ~0.57 |
| X     | P5      | CT HEAD: 0 5 6 7 (HTML description) | ~0.35 |

The browser tests drive Debian's Chromium with Selenium (skipped without it);
screenshots go to the test's tmp directory and to /tmp/ui-shots/.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
import yaml
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from sidecar.config import HttpConfig, PreprocessConfig, load_config
from sidecar.db.ui_queries import UiQueries
from sidecar.embeddings import preprocess
from sidecar.embeddings.decode import FrameMeta
from sidecar.embeddings.model import TinyEmbedder
from sidecar.embeddings.pixels import window, window_rule
from sidecar.http.app import HttpServer, create_app
from sidecar.http.thumbnails import Thumbnails
from sidecar.http.tokens import TokenStore
from sidecar.http.ui import create_ui_router
from sidecar.metrics import Metrics
from sidecar.service.app import Sidecar
from tests.conftest import free_port, part10, wait_for
from tests.test_search import ct_slice

HTML_DESCRIPTION = "<script>alert(1)</script> <b>x</b>"
LAYOUT: dict[str, tuple[str, str, list[tuple[str, str, list[int]]]]] = {
    "R": ("P1", "CT HEAD reference", [("CT", "HEAD", [0, 1, 2, 3])]),
    "A": ("P2", "CT HEAD and chest", [("CT", "HEAD", [0, 1, 2, 3]), ("CT", "CHEST", [8, 8])]),
    "S": ("P1", "CT HEAD earlier", [("CT", "HEAD", [0, 1, 2, 4])]),
    "C": ("P4", "MR HEAD", [("MR", "HEAD", [0, 1, 2, 6])]),
    "B": ("P3", "CT CHEST", [("CT", "CHEST", [0, 1, 4, 5])]),
    "X": ("P5", HTML_DESCRIPTION, [("CT", "HEAD", [0, 5, 6, 7])]),
}
SHOTS = Path("/tmp/ui-shots")


@dataclass
class Site:
    app: Sidecar
    base: str
    studies: dict[str, str]  # name -> Study Instance UID
    sops: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # a part-10 file per study

    def name_of(self, uid: str) -> str:
        return next(n for n, u in self.studies.items() if u == uid)

    def get(self, path: str, headers: dict[str, str] | None = None, **params: Any) -> Answer:
        url = self.base + path + ("?" + urlencode(params) if params else "")
        return fetch(urllib.request.Request(url, headers=headers or {}))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def fetch(req: urllib.request.Request) -> Answer:
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                          resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def c_store_all(address: tuple[str, int], files: list[Any]) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
    assoc = ae.associate(*address, ae_title="SIDECAR")
    assert assoc.is_established
    try:
        for ds in files:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000, status
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("ui")
    data = {
        "dicom": {"port": free_port()},
        "storage": {"data_dir": str(tmp / "data"), "min_free_mb": 1},
        "stability": {"stable_age": 3600.0, "check_interval": 1.0},
        "worker": {"enabled": False},  # embedded below, by the test
        "logging": {"level": "WARNING"},
        "preprocess": {"slice_spacing_mm": 2.0,
                       "modality_window": {"CT": "soft_tissue", "MR": "soft_tissue"}},
        "query": {"default_k": 10},
        "http": {"enabled": True, "port": free_port()},
        "ui": {"viewer_url": "http://viewer.example/viewer?StudyInstanceUIDs={study}"},
    }
    (tmp / "sidecar.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp / "sidecar.yaml", environ={})
    app = Sidecar(cfg, embedder=TinyEmbedder())
    address = app.start()
    try:
        studies: dict[str, str] = {}
        sops: dict[str, list[str]] = {}
        files: dict[str, bytes] = {}
        datasets = []
        for name, (patient, description, series) in LAYOUT.items():
            uid = generate_uid()
            studies[name] = uid
            sops[name] = []
            for modality, body, bases in series:
                series_uid = generate_uid()
                for i, b in enumerate(bases):
                    ds = ct_slice(uid, series_uid, i + 1, i * 10.0, b, patient=patient,
                                  date="20240110", modality=modality, body=body,
                                  description=description)
                    sops[name].append(str(ds.SOPInstanceUID))
                    files.setdefault(name, part10(ds))
                    datasets.append(ds)
        c_store_all(address, datasets)
        app.repository.mark_stable_studies(0.0)
        assert app.embedding is not None
        while app.embedding.run_job().series:
            pass
        assert app.http is not None and app.http.address is not None
        host, port = app.http.address
        built = Site(app, f"http://{host}:{port}", studies, sops, files)

        def ready() -> bool:
            answer = built.get("/v1/similar", study=studies["R"], k=5)
            return answer.status == 200 and len(json.loads(answer.body)["hits"]) == 4

        wait_for(ready, 30, "the search to see the embedded studies")
        yield built
    finally:
        app.stop()


# ------------------------------------------------------------- JSON: why matched
def test_similar_json_carries_the_best_slice_pair(site: Site) -> None:
    body = json.loads(site.get("/v1/similar", study=site.studies["R"], k=3).body)
    hits = body["hits"]
    assert [site.name_of(h["study_instance_uid"]) for h in hits][:1] == ["A"]
    for hit in hits:
        m = hit["match"]
        assert m["hit_sop_instance_uid"] == hit["sop_instance_uid"]
        assert m["hit_frame"] == 0
        assert m["query_sop_instance_uid"] in site.sops["R"]
        assert m["query_frame"] == 0
        assert 0 <= m["query_slice"] < body["reference"]["slices"]
        assert m["cosine"] >= hit["score"] - 1e-6  # the best pair beats the mean
    # A holds R's four bases: its best pair is a near copy (cosine ~0.9999)
    assert hits[0]["match"]["cosine"] > 0.99
    # the same at image level: the hit is the slice itself
    img = json.loads(site.get("/v1/similar", study=site.studies["R"], k=2,
                              level="image").body)["hits"]
    assert all(h["match"]["hit_sop_instance_uid"] == h["sop_instance_uid"] for h in img)
    assert all(abs(h["match"]["cosine"] - h["score"]) < 1e-5 for h in img)


# ---------------------------------------------------------------- plain HTTP
def test_study_page_lists_ranked_hits_with_links(site: Site) -> None:
    answer = site.get(f"/ui/studies/{site.studies['R']}")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.text
    order = [name for name in ("A", "S", "C", "B", "X")
             if f'data-study="{site.studies[name]}"' in html]
    assert order == ["A", "C", "B", "X"]  # S is the same patient: left out by default
    positions = [html.index(f'data-study="{site.studies[n]}"') for n in order]
    assert positions == sorted(positions)
    assert f"http://viewer.example/viewer?StudyInstanceUIDs={site.studies['A']}" in html
    assert "Retrieve from" in html and ">SIDECAR<" in html
    assert "default-src 'none'" in answer.headers["content-security-policy"]


def test_filters_change_the_hits(site: Site) -> None:
    r = site.studies["R"]
    mr = site.get(f"/ui/studies/{r}/hits", modality="MR").text
    assert f'data-study="{site.studies["C"]}"' in mr and site.studies["A"] not in mr
    same = site.get(f"/ui/studies/{r}/hits", same_patient="1").text
    assert f'data-study="{site.studies["S"]}"' in same
    chest = site.get(f"/ui/studies/{r}/hits", body_part="CHEST").text
    assert sorted(n for n in ("A", "B", "C", "X") if site.studies[n] in chest) == ["A", "B"]
    top = site.get(f"/ui/studies/{r}/hits", k=1).text
    assert top.count('class="hit"') == 1
    bad = site.get(f"/ui/studies/{r}/hits", date_from="2024-13-01")
    assert bad.status == 400 and "2024-13-01" in bad.text


def test_html_in_dicom_values_is_text(site: Site) -> None:
    html = site.get(f"/ui/studies/{site.studies['X']}").text
    assert "<script>alert" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &lt;b&gt;x&lt;/b&gt;" in html
    listed = site.get("/ui/", patient_id="P5").text  # the study list escapes it too
    assert "&lt;script&gt;" in listed and "<script>alert" not in listed
    hits = site.get(f"/ui/studies/{site.studies['R']}").text
    assert "<script>alert" not in hits and "&lt;b&gt;x&lt;/b&gt;" in hits


def test_find_studies_like_a_c_find(site: Site) -> None:
    page = site.get("/ui/", patient_id="P1").text
    assert site.studies["R"] in page and site.studies["S"] in page and site.studies["A"] not in page
    wild = site.get("/ui/", patient_id="P*", modality="MR").text
    assert site.studies["C"] in wild and site.studies["R"] not in wild
    by_uid = site.get("/ui/", study_uid=site.studies["B"]).text
    assert "1 study found" in by_uid
    bad = site.get("/ui/", study_uid="1.2.x")
    assert bad.status == 400 and "not a valid UID" in bad.text


def test_unknown_and_malformed_uids_are_clear_404_pages(site: Site) -> None:
    for path in ("/ui/studies/1.2.3.4.999", "/ui/studies/not-a-uid%3Cb%3E",
                 "/ui/thumbnails/1.2.3.4.999/0.png", f"/ui/thumbnails/{site.sops['R'][0]}/7.png",
                 "/ui/nowhere"):
        answer = site.get(path)
        assert answer.status == 404, path
        assert answer.headers["content-type"].startswith("text/html"), path
        assert "<h1>" in answer.text and "<b>" not in answer.text, path
    assert "has been received" in site.get("/ui/studies/1.2.3.4.999").text
    bare = urllib.request.Request(site.base + "/ui", method="GET")
    with urllib.request.urlopen(bare, timeout=30) as resp:  # follows the redirect
        assert resp.status == 200 and resp.url == site.base + "/ui/"


def test_thumbnails_are_the_model_input_with_cache_headers(site: Site) -> None:
    sop = site.sops["R"][0]
    answer = site.get(f"/ui/thumbnails/{sop}/0.png")
    assert answer.status == 200 and answer.headers["content-type"] == "image/png"
    assert answer.headers["cache-control"] == "private, max-age=86400"
    etag = answer.headers["etag"]
    img = Image.open(BytesIO(answer.body))
    assert img.size == (64, 64) and img.mode == "L"  # the tiny embedder: 64 px, one channel
    assert img.text["window"] == "preset soft_tissue C 40 W 400"
    # the same pixels the embedding worker feeds the model
    stored = site.app.config.storage_dir
    found = site.app.repository.find_instance(sop)
    assert found is not None
    ds = dcmread(stored / found.file_path)
    expected = preprocess.prepare(ds, site.app.config.preprocess, 64, frames=[0])[0]
    got = np.asarray(img, dtype=np.float32) / 255.0
    assert abs(got - expected).max() <= 0.5 / 255 + 1e-6
    again = site.get(f"/ui/thumbnails/{sop}/0.png", headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    css = site.get("/ui/static/page.css")
    assert css.status == 200 and css.headers["cache-control"].startswith("private, max-age=")


def test_thumbnail_cache_stays_under_its_cap(site: Site, tmp_path: Path) -> None:
    thumbs = Thumbnails(site.app.config, UiQueries(site.app.engine), lambda: (64, 1))
    thumbs.directory = tmp_path / "thumbnails"
    first = thumbs.get(site.sops["R"][0], 0)
    assert first is not None
    one = first.path.stat().st_size
    thumbs.cap_bytes = 5 * one
    for sops in site.sops.values():
        for sop in sops:
            assert thumbs.get(sop, 0) is not None
            assert thumbs.size_bytes <= thumbs.cap_bytes
    kept = list(thumbs.directory.glob("*.png"))
    assert 1 <= len(kept) <= 5
    assert sum(p.stat().st_size for p in kept) == thumbs.size_bytes
    assert not list(thumbs.directory.glob(".*.tmp"))


def test_page_needs_the_query_scope_when_tokens_are_required(site: Site) -> None:
    app = site.app
    config = HttpConfig(port=free_port(), auth="token")
    tokens = TokenStore(app.engine)
    query_token, _ = tokens.create("ui-query", ["query"])
    metrics_token, _ = tokens.create("ui-metrics", ["metrics"])
    server = HttpServer(config, create_app(
        app.query, Metrics(), lambda: {"ok": True}, tokens=tokens, http_config=config,
        routers=[create_ui_router(app.config, app.engine, app.query, app.embedding)]))
    host, port = server.start()
    try:
        base = f"http://{host}:{port}"
        # the style sheet and script hold no patient data: open, for the sign-in page
        assert fetch(urllib.request.Request(base + "/ui/static/page.css")).status == 200
        paths = (f"/ui/studies/{site.studies['R']}", "/ui/", "/ui",
                 f"/ui/thumbnails/{site.sops['R'][0]}/0.png")
        for path in paths:
            bare = fetch(urllib.request.Request(base + path))
            assert bare.status == 401, path
            assert bare.headers["www-authenticate"].startswith("Bearer"), path
            wrong = fetch(urllib.request.Request(
                base + path, headers={"Authorization": f"Bearer {metrics_token}"}))
            assert wrong.status == 403 and b"query" in wrong.body, path
        page = fetch(urllib.request.Request(
            base + paths[0], headers={"Authorization": f"Bearer {query_token}"}))
        assert page.status == 200 and f'data-study="{site.studies["A"]}"'.encode() in page.body
    finally:
        server.stop()
        tokens.revoke("ui-query")
        tokens.revoke("ui-metrics")


# ------------------------------------------------------------------ browser
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1600",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / path.name)


def images_decoded(driver: Any) -> list[tuple[str, int]]:
    """(src, naturalWidth) of every image once all have loaded."""
    wait_for(lambda: driver.execute_script(
        "return Array.from(document.images).every(i => i.complete)"), 30, "images to load")
    return [(str(s), int(w)) for s, w in driver.execute_script(
        "return Array.from(document.images).map(i => [i.src, i.naturalWidth])")]


def studies_listed(driver: Any, selector: str = "li.hit") -> list[str]:
    """data-study of the listed hits, read in one script (the list may be replaced meanwhile)."""
    return [str(x) for x in driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.dataset.study)",
        selector)]


def no_alert(driver: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        _ = driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_browser_study_page(site: Site, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{site.base}/ui/studies/{site.studies['R']}")
    hits = browser.find_elements(By.CSS_SELECTOR, "li.hit")
    assert [site.name_of(h.get_attribute("data-study")) for h in hits] == ["A", "C", "B", "X"]
    assert [h.get_attribute("data-rank") for h in hits] == ["1", "2", "3", "4"]
    images = images_decoded(browser)
    assert len(images) >= 4 + 2 * 4  # key slices and a pair per hit
    assert all(width > 0 for _, width in images), images
    for hit in hits:  # why it matched: this study's slice beside the hit's
        pair = hit.find_elements(By.CSS_SELECTOR, ".why img")
        assert len(pair) == 2 and all(img.get_attribute("alt") for img in pair)
        assert "window: preset soft_tissue" in hit.find_element(By.CSS_SELECTOR, ".why").text
    assert all(i.get_attribute("alt") for i in browser.find_elements(By.TAG_NAME, "img"))
    shot(browser, tmp_path, "study-R")

    # a filter changes the results without a reload
    marker = browser.execute_script("window.__same_page = 1; return 1")
    box = browser.find_element(By.NAME, "modality")
    box.send_keys("MR", Keys.ENTER)
    wait_for(lambda: [site.name_of(u) for u in studies_listed(browser)] == ["C"], 30,
             "the MR filter to apply")
    assert browser.execute_script("return window.__same_page") == marker
    assert "modality=MR" in browser.current_url
    assert all(w > 0 for _, w in images_decoded(browser))
    shot(browser, tmp_path, "study-R-filter-MR")
    box.clear()
    browser.find_element(By.NAME, "same_patient").click()  # a change event refreshes
    wait_for(lambda: "S" in [site.name_of(u) for u in studies_listed(browser)], 30,
             "the same-patient study to appear")

    # keyboard: the first link in tab order is the skip link, then real links
    browser.get(f"{site.base}/ui/studies/{site.studies['R']}")
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("class") == "skip"


def test_browser_html_description_is_shown_as_text(site: Site, browser: Any,
                                                    tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{site.base}/ui/studies/{site.studies['X']}")
    assert no_alert(browser)
    assert browser.find_element(By.CSS_SELECTOR, "h1.study-title").text == HTML_DESCRIPTION
    assert not browser.find_elements(By.CSS_SELECTOR, "main b")
    shot(browser, tmp_path, "study-X-html")
    browser.get(f"{site.base}/ui/studies/{site.studies['R']}")
    assert no_alert(browser)
    link = browser.find_element(By.CSS_SELECTOR,
                                f"li.hit[data-study='{site.studies['X']}'] a.hit-link")
    assert link.text == HTML_DESCRIPTION
    link.click()  # the hit's link opens its own page
    wait_for(lambda: site.studies["X"] in browser.current_url, 30, "the hit's page")


def test_browser_find_and_query_by_example(site: Site, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{site.base}/ui/")
    browser.find_element(By.NAME, "patient_id").send_keys("P1", Keys.ENTER)
    wait_for(lambda: "patient_id=P1" in browser.current_url, 30, "the search")
    links = browser.find_elements(By.CSS_SELECTOR, "a.study-link")
    assert sorted(site.name_of(a.get_attribute("href").rsplit("/", 1)[1]) for a in links) == \
        ["R", "S"]
    example = tmp_path / "example.dcm"
    example.write_bytes(site.files["C"])  # an MR slice of C: C's own study is excluded
    browser.find_element(By.ID, "example-file").send_keys(str(example))
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#example-hits li.hit"), 60,
             "the example's hits")
    hits = browser.find_elements(By.CSS_SELECTOR, "#example-hits li.hit")
    names = [site.name_of(h.get_attribute("data-study")) for h in hits]
    # one query slice, base 0, which every other study holds: all tie near 1.0
    assert sorted(names) == ["A", "B", "R", "S", "X"]
    assert "your file" in hits[0].text
    assert all(w > 0 for _, w in images_decoded(browser))
    shot(browser, tmp_path, "index-example")


# ------------------------------------------------------------- window names
def test_window_rule_names_the_rule_window_applies() -> None:
    cfg = PreprocessConfig(modality_window={"CT": "lung"})
    frame = np.linspace(-1200, 1200, 64 * 64, dtype=np.float32).reshape(64, 64)
    ct = FrameMeta("CT", True, False, (40.0, 400.0), None)
    mr = FrameMeta("MR", False, True, None, None)
    assert window_rule(ct, cfg) == "preset lung C -600 W 1500"
    lung = np.clip((frame - (-600 - 750)) / 1500, 0, 1)
    assert np.allclose(window(frame, ct, cfg), lung, atol=1e-6)
    with_file = cfg.model_copy(update={"use_file_window": True})
    assert window_rule(ct, with_file) == "file window C 40 W 400"
    assert np.allclose(window(frame, ct, with_file), np.clip((frame + 160) / 400, 0, 1),
                       atol=1e-6)
    raw = FrameMeta("CT", False, False, None, None)  # no rescale: no HU, no preset
    assert window_rule(raw, cfg) == "percentiles 0.5-99.5"
    assert window_rule(mr, cfg) == "percentiles 0.5-99.5, inverted (MONOCHROME1)"
    assert window(frame, mr, cfg)[0, 0] == 1.0  # inverted: the lowest value is white


def test_three_channel_thumbnails_are_rgb(site: Site, tmp_path: Path) -> None:
    thumbs = Thumbnails(site.app.config, UiQueries(site.app.engine), lambda: (48, 3))
    thumbs.directory = tmp_path / "thumbnails"
    thumb = thumbs.get(site.sops["R"][0], 0)
    assert thumb is not None
    img = Image.open(thumb.path)
    assert img.size == (48, 48) and img.mode == "RGB"
    rgb = np.asarray(img)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()  # grey
    assert thumbs.get(site.sops["R"][0], 1) is None  # a frame it does not have
    assert thumbs.get("1.2.3.999", 0) is None


def test_page_searches_are_in_the_dicom_audit_trail(site: Site) -> None:
    path = f"/ui/studies/{site.studies['B']}/hits"
    assert site.get(path, modality="CT").status == 200
    log = site.app.config.audit_file_path

    def audited() -> bool:
        text = log.read_text(errors="replace") if log.exists() else ""
        return path in text and "110112" in text  # a Query message naming the page's route

    wait_for(audited, 30, "the page's search in the audit trail")
