"""Signing in to the page when tokens are required (``sidecar.http.sessions``, ``signin``).

The page of ``tests/test_ui.py``'s site, served again by a second HTTP server
with ``http.auth: token``: over real HTTP (no redirect followed, to see each
answer) and in Chromium, which signs in with the form like a radiologist.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from sidecar.config import HttpConfig
from sidecar.http.app import HttpServer, create_app
from sidecar.http.sessions import COOKIE, Sessions
from sidecar.http.tokens import TokenStore
from sidecar.http.ui import create_ui_router
from sidecar.metrics import Metrics
from tests.conftest import free_port, wait_for
from tests.test_ui import Answer, Site, browser, fetch, images_decoded, shot, site  # noqa: F401

__all__ = ["browser", "site"]  # module fixtures of tests/test_ui.py, used here too


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass
class Guarded:
    base: str
    tokens: TokenStore
    query: str
    metrics: str
    events: list[tuple[str, str | None, str, str]]

    def ask(self, path: str, *, cookie: str = "", data: bytes | None = None,
            headers: dict[str, str] | None = None) -> Answer:
        h = {"Accept": "text/html", **(headers or {})}
        if cookie:
            h["Cookie"] = f"{COOKIE}={cookie}"
        req = urllib.request.Request(self.base + path, data=data, headers=h,
                                     method="POST" if data is not None else "GET")
        try:
            with _OPENER.open(req, timeout=60) as resp:
                return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                              resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                              exc.read())

    def sign_in(self, token: str, nxt: str = "/ui/") -> Answer:
        return self.ask("/ui/login", data=urlencode({"token": token, "next": nxt}).encode(),
                        headers={"Content-Type": "application/x-www-form-urlencoded"})


def session_of(answer: Answer) -> str:
    header = answer.headers["set-cookie"]
    assert header.startswith(f"{COOKIE}=")
    return header.split(";")[0].split("=", 1)[1]


@pytest.fixture
def guarded(site: Site) -> Iterator[Guarded]:  # noqa: F811 - the fixture of test_ui
    app = site.app
    config = HttpConfig(port=free_port(), auth="token")
    tokens = TokenStore(app.engine)
    query, _ = tokens.create(f"reader-{time.monotonic_ns()}", ["query"])
    metrics, _ = tokens.create(f"prom-{time.monotonic_ns()}", ["metrics"])
    sessions = Sessions(tokens, app.engine, lifetime=3600, secure=False)
    events: list[tuple[str, str | None, str, str]] = []

    def on_event(kind: str, name: str | None, remote: str, path: str) -> None:
        events.append((kind, name, remote, path))

    server = HttpServer(config, create_app(
        app.query, Metrics(), lambda: {"ok": True}, tokens=tokens, http_config=config,
        on_security_event=on_event, sessions=sessions,
        routers=[create_ui_router(app.config, app.engine, app.query, app.embedding,
                                  auditor=app.auditor, sessions=sessions,
                                  on_security_event=on_event)]))
    host, port = server.start()
    try:
        yield Guarded(f"http://{host}:{port}", tokens, query, metrics, events)
    finally:
        server.stop()
        for row in tokens.list():
            if row.name.startswith(("reader-", "prom-")):
                tokens.revoke(row.name)


def test_a_browser_without_a_session_is_sent_to_sign_in_and_comes_back(
    site: Site, guarded: Guarded,  # noqa: F811
) -> None:
    study = f"/ui/studies/{site.studies['R']}"
    first = guarded.ask(study)
    assert first.status == 303 and first.headers["location"] == f"/ui/login?next={study}"
    form = guarded.ask(f"/ui/login?next={study}")
    assert form.status == 200 and b'type="password"' in form.body
    assert b'action="/ui/logout"' not in form.body  # nothing to sign out of yet
    assert f'value="{study}"'.encode() in form.body
    assert guarded.ask("/ui/static/page.css").status == 200  # no patient data: open
    # what is not a page navigation keeps the API's 401
    thumb = guarded.ask(f"/ui/thumbnails/{site.sops['R'][0]}/0.png", headers={"Accept": "*/*"})
    assert thumb.status == 401 and thumb.headers["www-authenticate"].startswith("Bearer")

    bad = guarded.sign_in("sct_not-a-token", study)
    assert bad.status == 401 and b"not valid" in bad.body and "set-cookie" not in bad.headers
    wrong = guarded.sign_in(guarded.metrics, study)
    assert wrong.status == 403 and b"query scope" in wrong.body
    assert [e[0] for e in guarded.events][-2:] == ["invalid_token", "insufficient_scope"]

    ok = guarded.sign_in(guarded.query, study)
    assert ok.status == 303 and ok.headers["location"] == study
    cookie_header = ok.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=3600"):
        assert attribute in cookie_header
    cookie = session_of(ok)
    assert guarded.query not in cookie_header  # the cookie holds no token
    page = guarded.ask(study, cookie=cookie)
    assert page.status == 200 and f'data-study="{site.studies["A"]}"'.encode() in page.body
    assert b'action="/ui/logout"' in page.body
    assert guarded.ask(f"/ui/thumbnails/{site.sops['R'][0]}/0.png", cookie=cookie,
                       headers={"Accept": "image/png"}).status == 200
    # the cookie is for the page only: the JSON API still wants the bearer token
    api = guarded.ask(f"/v1/similar?study={site.studies['R']}", cookie=cookie,
                      headers={"Accept": "application/json"})
    assert api.status == 401
    # never back to another site after signing in
    assert guarded.sign_in(guarded.query, "//evil.example/").headers["location"] == "/ui/"


def test_a_session_ends_with_its_token_tampering_or_sign_out(
    site: Site, guarded: Guarded,  # noqa: F811
) -> None:
    study = f"/ui/studies/{site.studies['R']}"
    cookie = session_of(guarded.sign_in(guarded.query, study))
    assert guarded.ask(study, cookie=cookie).status == 200
    forged = cookie[:-4] + ("0000" if not cookie.endswith("0000") else "1111")
    assert guarded.ask(study, cookie=forged).status == 303  # back to sign-in
    assert guarded.ask(f"/ui/thumbnails/{site.sops['R'][0]}/0.png", cookie=forged,
                       headers={"Accept": "*/*"}).status == 401
    # a cross-site POST carried by the cookie is refused
    cross = guarded.ask("/ui/search", cookie=cookie, data=b"x",
                        headers={"Origin": "http://evil.example",
                                 "Content-Type": "application/dicom"})
    assert cross.status == 403 and b"cross_site_request" in cross.body
    # signing out clears it
    out = guarded.ask("/ui/logout", cookie=cookie, data=b"")
    assert out.status == 303 and "Max-Age=0" in out.headers["set-cookie"]
    # revoking the token ends every session it opened, at once
    name = next(r.name for r in guarded.tokens.list() if r.name.startswith("reader-"))
    guarded.tokens.revoke(name)
    again = guarded.ask(study, cookie=cookie)
    assert again.status == 303 and "Max-Age=0" in again.headers["set-cookie"]
    assert ("revoked_token", name) in [(e[0], e[1]) for e in guarded.events]


def test_sessions_expire_and_share_one_key(site: Site, guarded: Guarded) -> None:  # noqa: F811
    now = [1_000_000.0]
    sessions = Sessions(guarded.tokens, site.app.engine, lifetime=60, secure=True,
                        clock=lambda: now[0])
    verdict, cookie = sessions.issue(guarded.query)
    assert verdict.outcome == "ok" and cookie
    assert "; Secure" in sessions.set_cookie(cookie)  # under http.tls
    # another node on the same catalogue (the same key) accepts it
    other = Sessions(guarded.tokens, site.app.engine, lifetime=60, secure=True,
                     clock=lambda: now[0])
    assert other.check(cookie).outcome == "ok"
    now[0] += 61
    assert sessions.check(cookie).outcome == "expired"
    assert sessions.check("v1.x.y.z").outcome == "invalid"
    assert sessions.issue("sct_unknown")[1] == ""


def test_browser_signs_in_with_the_form(site: Site, guarded: Guarded,  # noqa: F811
                                        browser: Any, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(f"{guarded.base}/ui/studies/{site.studies['R']}")
    wait_for(lambda: "/ui/login" in browser.current_url, 30, "the sign-in page")
    shot(browser, tmp_path, "signin")
    browser.find_element(By.ID, "token").send_keys(guarded.query)
    browser.find_element(By.CSS_SELECTOR, "form.find button[type=submit]").click()
    wait_for(lambda: f"/ui/studies/{site.studies['R']}" in browser.current_url, 30,
             "the study page after signing in")
    hits = browser.find_elements(By.CSS_SELECTOR, "li.hit")
    assert [site.name_of(h.get_attribute("data-study")) for h in hits] == ["A", "C", "B", "X"]
    assert all(w > 0 for _, w in images_decoded(browser))
    shot(browser, tmp_path, "signed-in-study-R")
    browser.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait_for(lambda: "/ui/login" in browser.current_url, 30, "the sign-in page again")
    browser.get(f"{guarded.base}/ui/studies/{site.studies['R']}")
    wait_for(lambda: "/ui/login" in browser.current_url, 30, "signed out")


def test_the_service_offers_sign_in_when_tokens_are_required(
    config_factory: Any,
) -> None:
    from sidecar.embeddings.model import TinyEmbedder  # noqa: PLC0415
    from sidecar.service.app import Sidecar  # noqa: PLC0415

    cfg = config_factory({"http": {"enabled": True, "port": free_port(), "auth": "token"},
                          "worker": {"enabled": False}})
    app = Sidecar(cfg, embedder=TinyEmbedder())
    app.start()
    try:
        assert app.http is not None and app.http.address is not None
        host, port = app.http.address
        token, _ = TokenStore(app.engine).create("radiologist", ["query"])
        g = Guarded(f"http://{host}:{port}", TokenStore(app.engine), token, "", [])
        assert g.ask("/ui/").headers["location"] == "/ui/login?next=/ui/"
        ok = g.sign_in(token)
        assert ok.status == 303 and g.ask("/ui/", cookie=session_of(ok)).status == 200
    finally:
        app.stop()
    # audited: the sign-in as a successful User Authentication (Login)
    from lxml import etree  # noqa: PLC0415

    from tests.test_audit import audit_file, event_id  # noqa: PLC0415

    logins = [etree.fromstring(m) for m in audit_file(cfg)]
    assert any(event_id(m) == ("110114", ("110122",))
               and m.find("EventIdentification").get("EventOutcomeIndicator") == "0"
               for m in logins)
