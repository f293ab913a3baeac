"""Bearer-token access to the HTTP API: which scope each route needs, and the check.

:class:`Access` is an ASGI middleware inside ``app._Guard``. It answers 401
(``WWW-Authenticate: Bearer``, RFC 6750) for a missing, malformed, unknown,
expired or revoked token and 403 for a token without the route's scope,
in the API's JSON error format. Every refusal goes to one callback,
``on_security_event(kind, token_name, remote, path)`` (default:
:func:`log_security_event`, a WARNING); the token itself is never logged.
The name of an accepted token is put in ``scope["state"]["token_name"]``.
Under ``/ui`` a page session cookie (:mod:`sidecar.http.sessions`) stands for
the token that opened it, and a browser that brings neither is sent to the
sign-in page. Route table and modes: docs/http-api.md; design:
docs/design/http-access.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final
from urllib.parse import quote, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar.config import HttpConfig
from sidecar.http.sessions import PATH as SESSION_PATH
from sidecar.http.sessions import Sessions, cookie_value
from sidecar.http.tokens import TokenStore, Verdict, grants

logger = logging.getLogger(__name__)

#: Kinds of security event: the error kinds of the 401/403 answers.
MISSING, INVALID, EXPIRED, REVOKED, SCOPE, CROSS_SITE = (
    "missing_token", "invalid_token", "expired_token", "revoked_token", "insufficient_scope",
    "cross_site_request")
OPEN: Final = ""  # no token needed
ANY: Final = "*"  # any valid token, whatever its scopes
#: The scope each route needs; a path not listed needs ``admin`` (closed by default).
ROUTE_SCOPES: Final[dict[str, str]] = {
    "/v1/similar": "query",
    "/v1/search": "query",
    "/metrics": "metrics",
    "/healthz": OPEN,
    "/openapi.json": ANY,
}
#: The scope of every path under a prefix: the page (``sidecar.http.ui``) runs queries;
#: its sign-in page and its style sheet and script (no patient data) are open.
PREFIX_SCOPES: Final[dict[str, str]] = {"/ui/login": OPEN, "/ui/logout": OPEN,
                                        "/ui/static": OPEN, "/ui": "query"}
LOGIN: Final = "/ui/login"
REALM: Final = "pacs-sidecar"

SecurityEventHandler = Callable[[str, str | None, str, str], None]


def log_security_event(kind: str, token_name: str | None, remote: str, path: str) -> None:
    """The default security-event handler: one WARNING (never the token)."""
    who = f"token {token_name!r}" if token_name else "no token name"
    logger.warning("HTTP API: refused %s from %s: %s (%s)", path, remote or "?", kind, who)


def needed_scope(path: str, config: HttpConfig) -> str:
    """The scope a request to ``path`` needs (``OPEN``, ``ANY`` or a scope name)."""
    for prefix, scope in PREFIX_SCOPES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return scope
    needed = ROUTE_SCOPES.get(path, "admin")
    if path == "/metrics" and not config.metrics_auth:
        return OPEN
    return needed


def describe(config: HttpConfig) -> str:
    """One line for the start-up log: what the HTTP API asks of its clients."""
    return _describe(config) + _describe_tls(config)


def _describe(config: HttpConfig) -> str:
    metrics = ("/metrics needs scope metrics" if config.metrics_auth
               else "/metrics open (http.metrics_auth: false)")
    if config.auth == "none":
        where = "loopback" if config.loopback else "client certificates only"
        return f"HTTP API: no bearer tokens (http.auth: none, {where}); tokens sent are ignored"
    if config.tokens_required:
        why = ("http.auth: token" if config.auth == "token"
               else f"http.auth: auto and bind_address {config.bind_address} is beyond loopback")
        return f"HTTP API: bearer tokens required ({why}); /healthz open; {metrics}"
    assumed = "" if "auth" in config.model_fields_set else " (not set: assumed)"
    return (f"HTTP API: http.auth: auto{assumed} and bind_address {config.bind_address} is "
            "loopback: requests without a token are served, a token sent is checked and its "
            "scopes apply; set http.auth: token to require one (and behind a reverse proxy)")


def _describe_tls(config: HttpConfig) -> str:
    if not config.tls.enabled:
        return ""
    if config.tls.require_client_certificate:
        return "; HTTPS with client certificates required (http.tls)"
    return "; HTTPS without client certificates (http.tls)"


def _bearer(scope: Scope) -> tuple[bool, str]:
    """(an Authorization header was sent, the bearer token or "" when malformed)."""
    for key, value in scope.get("headers", []):
        if key.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() != "bearer":
                return True, ""
            return True, token.strip()
    return False, ""


def _challenge(error: str = "", description: str = "", scope: str = "") -> str:
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(parts)


_MESSAGES: Final = {
    MISSING: "this route needs a bearer token: send 'Authorization: Bearer <token>' "
             "(an administrator creates one with sidecar token create)",
    INVALID: "the bearer token is not valid (malformed or unknown)",
    EXPIRED: "the bearer token has expired: ask an administrator for a new one",
    REVOKED: "the bearer token has been revoked",
}
_OUTCOME_KIND: Final = {"invalid": INVALID, "expired": EXPIRED, "revoked": REVOKED}


class Access:
    """ASGI middleware: refuse what the token (or its absence) does not allow.

    Parameters
    ----------
    app
        The application inside.
    config
        The ``http`` section (``auth``, ``metrics_auth``, ``bind_address``).
    tokens
        The catalogue's tokens.
    on_security_event
        Called (in a worker thread) for every refusal with ``(kind, token_name,
        remote, path)``; ``token_name`` is ``None`` when no known token was sent.
        An exception from it is logged; the refusal stands.
    """

    def __init__(self, app: ASGIApp, *, config: HttpConfig, tokens: TokenStore,
                 on_security_event: SecurityEventHandler = log_security_event,
                 sessions: Sessions | None = None) -> None:
        self.app = app
        self._config = config
        self._tokens = tokens
        self._on_event = on_security_event
        self._sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._config.auth == "none":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        needed = needed_scope(path, self._config)
        sent, token = _bearer(scope)
        session = self._session_cookie(scope, path) if not sent else ""
        if needed == OPEN or (not sent and not session and not self._config.tokens_required):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        remote = str(client[0]) if client else ""
        if session and not _same_origin(scope):
            await self._refuse(scope, receive, send, CROSS_SITE, None, remote, path)
            return
        if not sent and not session:
            if self._sessions is not None and _page_navigation(scope, path):
                await _to_sign_in(path)(scope, receive, send)
                return
            await self._refuse(scope, receive, send, MISSING, None, remote, path)
            return
        verdict: Verdict
        if session:
            assert self._sessions is not None
            verdict = await run_in_threadpool(self._sessions.check, session)
        else:
            verdict = (await run_in_threadpool(self._tokens.authenticate, token)
                       if token else Verdict("invalid"))
        name = verdict.token.name if verdict.token is not None else None
        if verdict.outcome != "ok":
            if session and self._sessions is not None and _page_navigation(scope, path):
                # a session that ended (expired, its token revoked): sign in again
                await run_in_threadpool(self._report, _OUTCOME_KIND[verdict.outcome], name,
                                        remote, path)
                again = _to_sign_in(path, {"Set-Cookie": self._sessions.clear_cookie()})
                await again(scope, receive, send)
                return
            await self._refuse(scope, receive, send, _OUTCOME_KIND[verdict.outcome], name,
                               remote, path)
            return
        assert verdict.token is not None
        if needed != ANY and not grants(verdict.token.scopes, needed):
            await self._refuse(scope, receive, send, SCOPE, name, remote, path, needed=needed,
                               held=verdict.token.scopes)
            return
        scope.setdefault("state", {})["token_name"] = name
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, kind: str,
                      name: str | None, remote: str, path: str, *, needed: str = "",
                      held: tuple[str, ...] = ()) -> None:
        await run_in_threadpool(self._report, kind, name, remote, path)
        if kind == CROSS_SITE:
            status = 403
            message = (f"{path}: a request carried by the page's session cookie must come from "
                       "the page itself (its Origin differs)")
            header = _challenge()
            body = {"kind": kind, "message": message}
        elif kind == SCOPE:
            status = 403
            message = (f"the token {name!r} lacks scope {needed!r} needed by {path} "
                       f"(it has {', '.join(held)}); admin includes every scope")
            header = _challenge("insufficient_scope", f"scope {needed} needed", needed)
            body = {"kind": kind, "message": message, "required_scope": needed}
        else:
            status = 401
            message = _MESSAGES[kind]
            header = (_challenge() if kind == MISSING
                      else _challenge("invalid_token", kind.replace("_", " ")))
            body = {"kind": kind, "message": message}
        response = JSONResponse({"error": body}, status_code=status,
                                headers={"WWW-Authenticate": header})
        await response(scope, receive, send)


    def _report(self, kind: str, name: str | None, remote: str, path: str) -> None:
        try:
            self._on_event(kind, name, remote, path)
        except Exception:  # noqa: BLE001 - reporting must not turn a refusal into a 500
            logger.exception("HTTP API: the security event handler failed")

    def _session_cookie(self, scope: Scope, path: str) -> str:
        """The page session cookie of a request under ``/ui`` ("" elsewhere or without)."""
        if self._sessions is None or not (path == SESSION_PATH
                                          or path.startswith(SESSION_PATH + "/")):
            return ""
        for key, value in scope.get("headers", []):
            if key.lower() == b"cookie":
                found = cookie_value(value.decode("latin-1"))
                if found:
                    return found
        return ""


def _to_sign_in(path: str, headers: dict[str, str] | None = None) -> RedirectResponse:
    """303 to the page's sign-in, which comes back to ``path`` afterwards."""
    return RedirectResponse(f"{LOGIN}?next={quote(path, safe='/')}", 303, headers=headers)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return ""


def _page_navigation(scope: Scope, path: str) -> bool:
    """A browser asking for a page (GET of HTML under /ui): worth a redirect to sign in."""
    return (scope.get("method") == "GET" and path.startswith(SESSION_PATH)
            and "text/html" in _header(scope, b"accept"))


def _same_origin(scope: Scope) -> bool:
    """False for a state-changing request whose ``Origin`` is not this server's host."""
    if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
        return True
    origin = _header(scope, b"origin")
    if not origin:
        return True  # SameSite=Strict keeps the cookie off cross-site requests anyway
    return urlsplit(origin).netloc.lower() == _header(scope, b"host").lower()


__all__ = ["PREFIX_SCOPES", "ROUTE_SCOPES", "Access", "SecurityEventHandler", "describe",
           "log_security_event", "needed_scope"]
