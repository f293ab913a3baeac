"""Bearer tokens of the HTTP API: the CLI, the checks over real HTTP, the settings.

Tokens are made with ``sidecar token create`` (click's CliRunner) on the
archive's own configuration, so the servers below check them against the very
catalogue the CLI wrote. Servers run uvicorn on loopback as in test_http.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import os
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from scripts.tls_pki import OPENSSL, Pki, make_pki
from sidecar.cli.main import main
from sidecar.config import Config, HttpConfig, HttpTlsConfig, load_config
from sidecar.db.tokens import TokenRow
from sidecar.errors import ConfigError
from sidecar.http.app import HttpServer, create_app
from sidecar.http.auth import ROUTE_SCOPES, describe, needed_scope
from sidecar.http.tokens import TokenError, TokenStore, digest
from sidecar.metrics import Metrics
from sidecar.search.front import QueryService
from sidecar.service.app import Sidecar
from tests.conftest import _NAMED_LOGGERS, free_port, wait_for
from tests.test_http import Answer, Client
from tests.test_search import LAYOUT, Archive, build_archive
from tests.test_serve import SIDECAR, _env

AUTH_LAYOUT = {name: LAYOUT[name] for name in ("R", "A", "B")}
Event = tuple[str, str | None, str, str]


def cli(cfg: Path, *args: str) -> Result:
    """Run the CLI, then put logging back (it reconfigures the root logger, caplog's too)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in _NAMED_LOGGERS}
    try:
        return CliRunner().invoke(main, ["--config", str(cfg), *args], catch_exceptions=False)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def create(cfg: Path, name: str, *scopes: str, extra: tuple[str, ...] = ()) -> str:
    args = [a for s in scopes for a in ("--scope", s)]
    result = cli(cfg, "token", "create", name, *args, *extra)
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("sct_") and len(token) == 4 + 43, result.stdout
    assert token not in result.stderr
    return token


def listed(cfg: Path, *extra: str) -> dict[str, dict[str, Any]]:
    result = cli(cfg, "token", "list", "--json", *extra)
    assert result.exit_code == 0, result.output
    return {row["name"]: row for row in json.loads(result.stdout)}


@dataclass
class Node:
    archive: Archive
    query: QueryService
    servers: list[HttpServer] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def cfg(self) -> Path:
        return self.archive.config_path

    def serve(self, **http: Any) -> Client:
        config = HttpConfig(port=free_port(), **http)
        app = create_app(self.query, Metrics(), lambda: {"ok": True}, max_upload_mb=1,
                         tokens=TokenStore(self.archive.engine), http_config=config,
                         on_security_event=lambda *event: self.events.append(event))
        server = HttpServer(config, app)
        host, port = server.start()
        self.servers.append(server)
        return Client(f"http://{host}:{port}")

    def uid(self, name: str) -> str:
        return self.archive.studies[name].uid


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    archive = build_archive(tmp_path_factory.mktemp("auth"), AUTH_LAYOUT, extras=False)
    query = QueryService(archive.config, archive.service, metrics=Metrics())
    n = Node(archive, query)
    try:
        yield n
    finally:
        for server in n.servers:
            server.stop()
        query.close()
        archive.emb.close()
        archive.engine.dispose()


@pytest.fixture(scope="module")
def required(node: Node) -> Client:
    """A server with ``http.auth: token``."""
    return node.serve(auth="token")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def similar(client: Client, node: Node, token: str | None = None, **headers: str) -> Answer:
    hdrs = {**(bearer(token) if token else {}), **headers}
    return client.request("GET", "/v1/similar", {"study": node.uid("R")}, headers=hdrs)


def refused(answer: Answer, status: int, kind: str) -> dict[str, Any]:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["www-authenticate"].startswith('Bearer realm="pacs-sidecar"')
    err = answer.error
    assert err["kind"] == kind, err
    return err


# ---------------------------------------------------------------------- CLI
def test_cli_create_list_revoke(node: Node) -> None:
    token = create(node.cfg, "viewer", "query", extra=("--expires-days", "30"))
    rows = listed(node.cfg)
    row = rows["viewer"]
    assert row["scopes"] == ["query"] and row["state"] == "active"
    assert row["last_used_at"] is None and row["revoked_at"] is None
    expires = dt.datetime.fromisoformat(row["expires_at"])
    created = dt.datetime.fromisoformat(row["created_at"])
    assert abs((expires - created) - dt.timedelta(days=30)) < dt.timedelta(seconds=1)
    table = cli(node.cfg, "token", "list")
    assert table.exit_code == 0 and "viewer" in table.stdout and "query" in table.stdout
    assert token not in table.output and token not in json.dumps(rows)
    assert digest(token) not in table.output

    again = cli(node.cfg, "token", "create", "viewer", "--scope", "query")
    assert again.exit_code == 1 and "a token named 'viewer' exists" in again.output
    bad = cli(node.cfg, "token", "create", "x", "--scope", "everything")
    assert bad.exit_code == 2 and "'everything' is not one of" in bad.output
    assert cli(node.cfg, "token", "create", "y").exit_code == 2  # --scope is required
    bad_name = cli(node.cfg, "token", "create", "no spaces", "--scope", "query")
    assert bad_name.exit_code == 1 and "token name 'no spaces'" in bad_name.output

    revoked = cli(node.cfg, "token", "revoke", "viewer")
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    assert "viewer" not in listed(node.cfg)
    assert listed(node.cfg, "--all")["viewer"]["state"] == "revoked"
    twice = cli(node.cfg, "token", "revoke", "viewer")
    assert twice.exit_code == 1 and "no token named 'viewer'" in twice.output
    # the name is free again once revoked
    assert create(node.cfg, "viewer", "query") != token
    assert cli(node.cfg, "token", "revoke", "viewer").exit_code == 0


def test_the_token_is_stored_hashed_only(node: Node) -> None:
    token = create(node.cfg, "hashed", "query")
    db = node.archive.config.data_dir / "sidecar.db"
    raw = b"".join(p.read_bytes() for p in db.parent.glob("sidecar.db*"))
    assert token.encode() not in raw and token[4:].encode() not in raw
    assert token[4:24].encode() not in raw  # not even a part of it
    assert digest(token).encode() in raw  # what is kept instead
    cli(node.cfg, "token", "revoke", "hashed")


# ------------------------------------------------------------- 401 and 403
def test_missing_and_malformed_tokens_are_401(node: Node, required: Client) -> None:
    err = refused(similar(required, node), 401, "missing_token")
    assert "Authorization: Bearer" in err["message"]
    answer = similar(required, node, Authorization="Basic dXNlcjpwYXNz")
    refused(answer, 401, "invalid_token")
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    refused(similar(required, node, "sct_" + "A" * 43), 401, "invalid_token")  # unknown
    refused(similar(required, node, "not-a-token"), 401, "invalid_token")
    refused(similar(required, node, Authorization="Bearer"), 401, "invalid_token")
    # an answer before the body was read still reaches the client
    answer = required.post(b"\0" * 200_000)
    refused(answer, 401, "missing_token")


def test_scopes(node: Node, required: Client) -> None:
    query = create(node.cfg, "q", "query")
    metrics = create(node.cfg, "prom", "metrics")
    admin = create(node.cfg, "root", "admin")
    try:
        assert similar(required, node, query).status == 200
        answer = required.request("GET", "/metrics", headers=bearer(query))
        err = refused(answer, 403, "insufficient_scope")
        assert err["required_scope"] == "metrics" and "'q' lacks scope 'metrics'" in err["message"]
        assert 'error="insufficient_scope"' in answer.headers["www-authenticate"]
        assert 'scope="metrics"' in answer.headers["www-authenticate"]
        assert required.request("GET", "/metrics", headers=bearer(metrics)).status == 200
        refused(similar(required, node, metrics), 403, "insufficient_scope")
        assert similar(required, node, admin).status == 200
        assert required.request("GET", "/metrics", headers=bearer(admin)).status == 200
        # open, any token, closed by default
        assert required.get("/healthz").status == 200
        refused(required.get("/openapi.json"), 401, "missing_token")
        assert required.request("GET", "/openapi.json", headers=bearer(metrics)).status == 200
        refused(required.get("/v1/nothing"), 401, "missing_token")
        err = refused(required.request("GET", "/v1/nothing", headers=bearer(query)), 403,
                      "insufficient_scope")
        assert err["required_scope"] == "admin"
        assert required.request("GET", "/v1/nothing", headers=bearer(admin)).status == 404
    finally:
        for name in ("q", "prom", "root"):
            cli(node.cfg, "token", "revoke", name)


def test_every_route_has_a_scope(node: Node, required: Client) -> None:
    app = create_app(node.query, Metrics(), lambda: {"ok": True})
    paths = {getattr(r, "path", "") for r in app.routes}
    assert paths == set(ROUTE_SCOPES)


def test_revoked_token_is_refused_at_once(node: Node, required: Client) -> None:
    token = create(node.cfg, "soon-gone", "query")
    assert similar(required, node, token).status == 200
    assert cli(node.cfg, "token", "revoke", "soon-gone").exit_code == 0
    refused(similar(required, node, token), 401, "revoked_token")
    assert node.events[-1] == ("revoked_token", "soon-gone", "127.0.0.1", "/v1/similar")


def test_expired_token_is_refused(node: Node, required: Client) -> None:
    now = dt.datetime.now(dt.UTC)
    past = TokenStore(node.archive.engine, clock=lambda: now - dt.timedelta(days=2))
    token, row = past.create("old", ["query"], expires_days=1)
    assert row.expires_at is not None and row.expires_at < now
    err = refused(similar(required, node, token), 401, "expired_token")
    assert "expired" in err["message"]
    assert listed(node.cfg)["old"]["state"] == "expired"
    fresh = TokenStore(node.archive.engine, clock=lambda: now - dt.timedelta(hours=1))
    ok, _ = fresh.create("fresh", ["query"], expires_days=1)
    assert similar(required, node, ok).status == 200
    for name in ("old", "fresh"):
        cli(node.cfg, "token", "revoke", name)


def test_last_used_is_recorded(node: Node, required: Client) -> None:
    token = create(node.cfg, "used", "query")
    assert listed(node.cfg)["used"]["last_used_at"] is None
    before = dt.datetime.now(dt.UTC)
    assert similar(required, node, token).status == 200
    first = dt.datetime.fromisoformat(listed(node.cfg)["used"]["last_used_at"])
    assert before - dt.timedelta(seconds=1) <= first <= dt.datetime.now(dt.UTC)
    # written at most once a minute by the server's store ...
    assert similar(required, node, token).status == 200
    assert dt.datetime.fromisoformat(listed(node.cfg)["used"]["last_used_at"]) == first
    # ... and every time by a store told so
    later = first + dt.timedelta(minutes=5)
    store = TokenStore(node.archive.engine, touch_interval=0, clock=lambda: later)
    assert store.authenticate(token).outcome == "ok"
    assert dt.datetime.fromisoformat(listed(node.cfg)["used"]["last_used_at"]) == later
    cli(node.cfg, "token", "revoke", "used")


def test_the_token_name_is_the_requester(node: Node, required: Client) -> None:
    token = create(node.cfg, "ris-gateway", "query")
    assert similar(required, node, token).status == 200
    lines = node.query.audit.path.read_text().splitlines()
    assert json.loads(lines[-1])["requester"] == "ris-gateway"
    cli(node.cfg, "token", "revoke", "ris-gateway")


def test_security_events_and_logs_never_show_the_token(
    node: Node, required: Client, caplog: pytest.LogCaptureFixture
) -> None:
    token = create(node.cfg, "careful", "metrics")
    cli(node.cfg, "token", "revoke", "careful")
    node.events.clear()
    with caplog.at_level(logging.DEBUG):
        refused(similar(required, node, token), 401, "revoked_token")
        refused(similar(required, node), 401, "missing_token")
        refused(similar(required, node, token[:-1] + "x"), 401, "invalid_token")
        wait_for(lambda: any("-> 401" in r.getMessage() for r in caplog.records), 5, "log")
    assert node.events == [("revoked_token", "careful", "127.0.0.1", "/v1/similar"),
                           ("missing_token", None, "127.0.0.1", "/v1/similar"),
                           ("invalid_token", None, "127.0.0.1", "/v1/similar")]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert token not in text and token[4:20] not in text and token[:-1] not in text


def test_the_default_handler_logs_a_warning(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    config = HttpConfig(port=free_port(), auth="token")
    server = HttpServer(config, create_app(node.query, Metrics(), lambda: {"ok": True},
                                           tokens=TokenStore(node.archive.engine),
                                           http_config=config))
    host, port = server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.http.auth"):
            client = Client(f"http://{host}:{port}")
            refused(similar(client, node, "sct_" + "B" * 43), 401, "invalid_token")
        messages = [r.getMessage() for r in caplog.records if r.name == "sidecar.http.auth"]
        assert messages == ["HTTP API: refused /v1/similar from 127.0.0.1: invalid_token "
                            "(no token name)"]
        assert all(r.levelno == logging.WARNING for r in caplog.records
                   if r.name == "sidecar.http.auth")
    finally:
        server.stop()


# -------------------------------------------------------------------- modes
def test_auto_on_loopback_serves_without_a_token_and_checks_one_sent(node: Node) -> None:
    client = node.serve()  # auth: auto, 127.0.0.1
    assert similar(client, node).status == 200
    assert client.get("/metrics").status == 200
    refused(similar(client, node, "sct_" + "C" * 43), 401, "invalid_token")
    token = create(node.cfg, "loop", "metrics")
    refused(similar(client, node, token), 403, "insufficient_scope")  # its scopes apply
    assert client.request("GET", "/metrics", headers=bearer(token)).status == 200
    cli(node.cfg, "token", "revoke", "loop")


def test_metrics_auth_false_opens_metrics_only(node: Node) -> None:
    client = node.serve(auth="token", metrics_auth=False)
    assert client.get("/metrics").status == 200
    refused(similar(client, node), 401, "missing_token")


def test_auth_none_asks_nothing(node: Node) -> None:
    client = node.serve(auth="none")
    assert similar(client, node).status == 200
    assert similar(client, node, "sct_" + "D" * 43).status == 200


def test_token_store_refuses_bad_input(node: Node) -> None:
    store = TokenStore(node.archive.engine)
    with pytest.raises(TokenError, match="scopes must be among"):
        store.create("s", [])
    with pytest.raises(TokenError, match="positive"):
        store.create("s", ["query"], expires_days=0)
    assert store.authenticate("").outcome == "invalid"
    assert isinstance(store.list(), list) and all(isinstance(r, TokenRow) for r in store.list())


# ----------------------------------------------------------------- settings
def test_beyond_loopback_requires_tokens() -> None:
    remote = HttpConfig(bind_address="0.0.0.0", allow_remote=True)
    assert remote.auth == "auto" and remote.tokens_required
    assert "bearer tokens required (http.auth: auto and bind_address 0.0.0.0 is beyond " \
           "loopback)" in describe(remote)
    local = HttpConfig()
    assert not local.tokens_required and "(not set: assumed)" in describe(local)
    assert "(not set" not in describe(HttpConfig(auth="auto"))
    assert HttpConfig(auth="token").tokens_required
    assert needed_scope("/metrics", HttpConfig(metrics_auth=False)) == ""
    with pytest.raises(ValueError, match="http.auth is none but http.bind_address 0.0.0.0"):
        HttpConfig(bind_address="0.0.0.0", allow_remote=True, auth="none")
    HttpConfig(bind_address="::1", auth="none")  # loopback: allowed


@pytest.mark.usefixtures("cli_isolation")
def test_check_config_and_serve_refuse_remote_without_auth(tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
        "http": {"enabled": True, "bind_address": "0.0.0.0", "allow_remote": True,
                 "auth": "none", "port": free_port()},
    }))
    with pytest.raises(ConfigError, match="http.auth is none"):
        load_config(cfg)
    for command in ("check-config", "serve"):
        result = CliRunner().invoke(main, ["--config", str(cfg), command])
        assert result.exit_code == 1, result.output
        assert "http.auth is none but http.bind_address 0.0.0.0 is beyond loopback" \
            in result.output
        assert "set http.auth: token" in result.output


def test_serve_with_tokens_end_to_end(tmp_path: Path) -> None:
    """`sidecar serve` as a process: start log, a CLI token, refusals, nothing secret logged."""
    http_port = free_port()
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({
        "dicom": {"port": free_port(), "receiver_processes": 1},
        "worker": {"enabled": False},
        "storage": {"data_dir": "data", "min_free_mb": 1},
        "http": {"enabled": True, "port": http_port, "auth": "token"},
        "logging": {"level": "DEBUG"},
    }))
    made = subprocess.run([SIDECAR, "--config", str(cfg), "token", "create", "prom",
                           "--scope", "metrics"], capture_output=True, text=True, env=_env(),
                          check=True)
    token = made.stdout.strip()
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([SIDECAR, "--config", str(cfg), "serve"], stdout=fh,
                                stderr=subprocess.STDOUT, text=True, env=_env(),
                                start_new_session=True)
    try:
        wait_for(lambda: "sidecar ready" in log.read_text() or proc.poll() is not None,
                 60, "sidecar ready")
        assert proc.poll() is None, log.read_text()
        base = f"http://127.0.0.1:{http_port}"

        def get(path: str, token: str | None = None) -> int:
            req = urllib.request.Request(base + path, headers=bearer(token) if token else {})
            try:
                with urllib.request.urlopen(req, timeout=10) as rsp:
                    return int(rsp.status)
            except urllib.error.HTTPError as exc:
                exc.close()
                return int(exc.code)

        assert get("/healthz") == 200
        assert get("/metrics") == 401
        assert get("/metrics", token) == 200
        assert get("/v1/similar?study=1.2.3", token) == 403
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text() + made.stderr
    assert "HTTP API: bearer tokens required (http.auth: token)" in text
    assert "refused /metrics from 127.0.0.1: missing_token" in text
    assert "refused /v1/similar from 127.0.0.1: insufficient_scope (token 'prom')" in text
    assert token not in text and token[4:20] not in text
    assert "Bearer sct_" not in text and "authorization" not in log.read_text().lower()



# ---------------------------------------------------------------- mutual TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if OPENSSL is None:
        pytest.skip("openssl command not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def https_get(url: str, ctx: ssl.SSLContext | None, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers=bearer(token) if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def tls_config(pki: Pki, **extra: Any) -> HttpTlsConfig:
    return HttpTlsConfig(enabled=True, certificate=pki.server_cert, private_key=pki.server_key,
                         ca_certificates=pki.ca, **extra)


def test_mutual_tls_and_tokens(node: Node, pki: Pki) -> None:
    config = HttpConfig(port=free_port(), auth="token", tls=tls_config(pki))
    server = HttpServer(config, create_app(node.query, Metrics(), lambda: {"ok": True},
                                           tokens=TokenStore(node.archive.engine),
                                           http_config=config))
    host, port = server.start()
    assert server.scheme == "https"
    token = create(node.cfg, "tls-client", "query")
    try:
        url = f"https://localhost:{port}/v1/similar?study={node.uid('R')}"
        good = client_context(pki, pki.client_cert, pki.client_key)
        assert https_get(url, good, token) == 200
        assert https_get(url, good) == 401  # a certificate does not replace the token
        assert https_get(f"https://localhost:{port}/healthz", good) == 200
        for ctx in (client_context(pki), client_context(pki, pki.rogue_cert, pki.rogue_key)):
            with pytest.raises((OSError, http.client.HTTPException)):
                https_get(f"https://localhost:{port}/healthz", ctx)
        with pytest.raises((OSError, http.client.HTTPException)):
            https_get(f"http://{host}:{port}/healthz", None)  # plain HTTP
    finally:
        server.stop()
        cli(node.cfg, "token", "revoke", "tls-client")


def test_https_without_client_certificates(node: Node, pki: Pki) -> None:
    config = HttpConfig(port=free_port(), auth="token",
                        tls=tls_config(pki, require_client_certificate=False))
    server = HttpServer(config, create_app(node.query, Metrics(), lambda: {"ok": True},
                                           tokens=TokenStore(node.archive.engine),
                                           http_config=config))
    _, port = server.start()
    try:
        assert https_get(f"https://localhost:{port}/healthz", client_context(pki)) == 200
        with pytest.raises((OSError, http.client.HTTPException)):  # a bad certificate still fails
            https_get(f"https://localhost:{port}/healthz",
                      client_context(pki, pki.rogue_cert, pki.rogue_key))
    finally:
        server.stop()


def test_client_certificates_may_replace_tokens_beyond_loopback(pki: Pki) -> None:
    cfg = HttpConfig(bind_address="0.0.0.0", allow_remote=True, auth="none", tls=tls_config(pki))
    assert not cfg.tokens_required
    assert describe(cfg) == ("HTTP API: no bearer tokens (http.auth: none, client certificates "
                             "only); tokens sent are ignored; HTTPS with client certificates "
                             "required (http.tls)")
    with pytest.raises(ValueError, match="http.auth is none"):
        HttpConfig(bind_address="0.0.0.0", allow_remote=True, auth="none",
                   tls=tls_config(pki, require_client_certificate=False))
    with pytest.raises(ValueError, match="http.tls.ca_certificates is not set"):
        HttpTlsConfig(enabled=True, certificate=pki.server_cert, private_key=pki.server_key)


@pytest.mark.usefixtures("cli_isolation")
def test_bad_https_files_are_named(tmp_path: Path, pki: Pki, node: Node) -> None:
    missing = tmp_path / "nope.pem"
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
        "http": {"enabled": True, "port": free_port(), "tls": {
            "enabled": True, "certificate": str(missing), "private_key": str(pki.server_key),
            "ca_certificates": str(pki.ca)}},
    }))
    for command in ("check-config", "serve"):
        result = CliRunner().invoke(main, ["--config", str(cfg), command])
        assert result.exit_code == 1, result.output
        assert f"http.tls.certificate: {missing} does not exist" in result.output
    wrong = tls_config(pki).model_copy(update={"private_key": pki.client_key})
    with pytest.raises(ConfigError, match="http.tls: cannot use certificate"):
        HttpServer(HttpConfig(tls=wrong), create_app(node.query, Metrics(), lambda: {"ok": True}))


def test_an_upgraded_loopback_config_is_served_and_says_what_it_assumed(
    config_factory: Callable[..., Config], sidecar_factory: Callable[[Config], Sidecar],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Today's config (no http.auth, loopback): served without tokens, a WARNING says so."""
    port = free_port()
    with caplog.at_level(logging.INFO, logger="sidecar.service.app"):
        sidecar_factory(config_factory({"http": {"enabled": True, "port": port}}))
    said = [r for r in caplog.records if "http.auth: auto (not set: assumed)" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, caplog.text
    assert https_get(f"http://127.0.0.1:{port}/metrics", None) == 200
    assert https_get(f"http://127.0.0.1:{port}/metrics", None, "sct_" + "E" * 43) == 401
