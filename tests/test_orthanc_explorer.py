"""The "Similar studies" button in Orthanc Explorer (``integrations/orthanc/``).

A real Orthanc (Debian ``orthanc``) with its Python plugin (``orthanc-python``)
runs ``integrations/orthanc/similar_studies.py``, configured with the URL of a
running ``Sidecar`` (HTTP API on, tiny deterministic embedder). The studies are
uploaded to Orthanc and sent to the sidecar by C-STORE (as Orthanc's forwarding
would, without waiting for its stability delay); the ranking follows
``tests/test_search.py``'s construction: A holds R's bases (~1.0), B half (~0.5),
E none. Then over Orthanc's REST API and in Chromium: the button on R's study
page lists the sidecar's hits in rank order, each linked to its study page in
the same Orthanc, with a thumbnail that decodes. Skipped without Orthanc, its
Python plugin or Chromium; screenshots also go to /tmp/ui-shots/.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import generate_uid

from scripts.orthanc_pacs import OrthancPacs, orthanc_available
from sidecar.config import load_config
from sidecar.embeddings.model import TinyEmbedder
from sidecar.service.app import Sidecar
from tests.conftest import free_port, part10, wait_for
from tests.test_search import ct_slice
from tests.test_ui import browser, c_store_all, images_decoded, shot  # noqa: F401 - fixture

pytestmark = pytest.mark.orthanc

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "integrations" / "orthanc" / "similar_studies.py"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
STUDIES: dict[str, tuple[str, str, list[int]]] = {
    "R": ("PR", "CT HEAD reference", [0, 1, 2, 3]),
    "A": ("PA", "CT HEAD same", [0, 1, 2, 3]),
    "B": ("PB", "CT HEAD half", [0, 1, 4, 5]),
    "E": ("PE", "CT HEAD other", [4, 5, 6, 7]),
}


@dataclass
class Pair:
    pacs: OrthancPacs
    app: Sidecar
    uids: dict[str, str]  # name -> StudyInstanceUID
    ids: dict[str, str]  # name -> Orthanc id

    def rest(self, path: str) -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(self.pacs.url + path, timeout=60) as resp:
                return resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(), exc.headers.get("Content-Type", "")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    if not orthanc_available():
        pytest.skip("Orthanc not installed at /usr/sbin/Orthanc (apt-get install orthanc)")
    if not PLUGIN.exists():
        pytest.skip(f"Orthanc's Python plugin not installed at {PLUGIN} "
                    "(apt-get install orthanc-python)")
    tmp = tmp_path_factory.mktemp("explorer")
    data = {
        "dicom": {"port": free_port()},
        "storage": {"data_dir": str(tmp / "data"), "min_free_mb": 1},
        "stability": {"stable_age": 3600.0},
        "worker": {"enabled": False},
        "logging": {"level": "WARNING"},
        "preprocess": {"slice_spacing_mm": 2.0, "modality_window": {"CT": "soft_tissue"}},
        "http": {"enabled": True, "port": free_port()},
    }
    (tmp / "sidecar.yaml").write_text(yaml.safe_dump(data))
    app = Sidecar(load_config(tmp / "sidecar.yaml", environ={}), embedder=TinyEmbedder())
    address = app.start()
    assert app.http is not None and app.http.address is not None
    host, port = app.http.address
    pacs = OrthancPacs(tmp / "orthanc", extra={
        "Plugins": [str(PLUGIN)],
        "PythonScript": str(SCRIPT),
        "PythonVerbose": False,
        "OrthancExplorerEnabled": True,
        "PacsSidecar": {"Url": f"http://{host}:{port}", "Top": 5,
                        "PageUrl": f"http://{host}:{port}"},
    })
    try:
        pacs.start()
        uids: dict[str, str] = {}
        datasets = []
        for name, (patient, description, bases) in STUDIES.items():
            study, series = generate_uid(), generate_uid()
            uids[name] = study
            for i, b in enumerate(bases):
                ds = ct_slice(study, series, i + 1, i * 10.0, b, patient=patient,
                              date="20240110", description=description)
                pacs.upload(part10(ds))
                datasets.append(ds)
        c_store_all(address, datasets)
        app.repository.mark_stable_studies(0.0)
        assert app.embedding is not None
        while app.embedding.run_job().series:
            pass
        ids: dict[str, str] = {}
        for name, uid in uids.items():
            found = pacs.request("POST", "/tools/lookup", uid.encode(), content_type="text/plain")
            ids[name] = next(f["ID"] for f in found if f["Type"] == "Study")
        built = Pair(pacs, app, uids, ids)

        def ready() -> bool:
            status, body, _ = built.rest(f"/pacs-sidecar/studies/{ids['R']}/similar")
            return status == 200 and len(json.loads(body)["hits"]) == 3

        wait_for(ready, 30, "the sidecar's hits through Orthanc")
        yield built
    finally:
        pacs.stop()
        app.stop()


def test_orthanc_route_maps_the_hits_to_orthanc_ids(pair: Pair) -> None:
    status, body, ctype = pair.rest(f"/pacs-sidecar/studies/{pair.ids['R']}/similar")
    assert status == 200 and ctype.startswith("application/json")
    answer = json.loads(body)
    assert answer["study_instance_uid"] == pair.uids["R"]
    hits = answer["hits"]
    assert [h["orthanc_id"] for h in hits] == [pair.ids[n] for n in ("A", "B", "E")]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] > 0.99 and hits[0]["study_description"] == "CT HEAD same"
    assert hits[0]["explorer"] == f"explorer.html#study?uuid={pair.ids['A']}"
    assert hits[0]["sidecar_page"].endswith(f"/ui/studies/{pair.uids['A']}")
    # the thumbnail, fetched by Orthanc from the sidecar
    thumb = hits[0]["thumbnail"]
    assert thumb.startswith("../pacs-sidecar/thumbnails/")
    status, png, ctype = pair.rest(thumb.removeprefix(".."))
    assert status == 200 and ctype == "image/png" and png.startswith(b"\x89PNG")
    # k from the request; errors are named
    status, body, _ = pair.rest(f"/pacs-sidecar/studies/{pair.ids['R']}/similar?k=1")
    assert status == 200 and len(json.loads(body)["hits"]) == 1
    status, body, _ = pair.rest("/pacs-sidecar/studies/0000-nope/similar")
    assert status == 404 and "not an Orthanc study id" in json.loads(body)["error"]
    status, _, _ = pair.rest("/pacs-sidecar/thumbnails/1.2.3.999/0.png")
    assert status == 404


def test_explorer_button_lists_the_hits_with_working_links(
    pair: Pair, browser: Any, tmp_path: Path,  # noqa: F811 - the fixture
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{pair.pacs.url}/app/explorer.html#study?uuid={pair.ids['R']}")
    button = wait_for(lambda: [b for b in browser.find_elements(By.ID, "pacs-sidecar-similar")
                               if b.is_displayed()], 30, "the Similar studies button")[0]
    assert button.text.strip() == "Similar studies"
    button.click()
    items = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "li.pacs-sidecar-hit"), 30,
                     "the hits")
    names = {uid: name for name, uid in pair.uids.items()}
    assert [names[i.get_attribute("data-study")] for i in items] == ["A", "B", "E"]
    assert all(w > 0 for src, w in images_decoded(browser)
               if "/pacs-sidecar/thumbnails/" in src)
    thumbs = browser.find_elements(By.CSS_SELECTOR, "li.pacs-sidecar-hit img")
    assert len(thumbs) == 3 and all(t.get_attribute("alt") for t in thumbs)
    shot(browser, tmp_path, "orthanc-explorer-similar")
    link = items[0].find_element(By.CSS_SELECTOR, "a.pacs-sidecar-link")
    assert link.get_attribute("href").endswith(f"explorer.html#study?uuid={pair.ids['A']}")
    link.click()
    wait_for(lambda: pair.ids["A"] in browser.current_url, 30, "the hit's study page")
    wait_for(lambda: pair.uids["A"] in browser.page_source, 30,
             "the hit's study page to show its UID")
    shot(browser, tmp_path, "orthanc-explorer-hit")
