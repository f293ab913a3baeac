"""The page's sign-in and sign-out (``/ui/login``, ``/ui/logout``; :mod:`sidecar.http.sessions`).

Only when tokens are required (``http.tokens_required``). A good token with the
``query`` (or ``admin``) scope opens a session and goes back to the page asked
for (``next``, only ever a path under ``/ui/``); a bad one is refused with 401 and
audited like a bad bearer token; both are logged without the token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from sidecar.audit.events import Auditor
from sidecar.http.sessions import Sessions, cookie_value
from sidecar.http.tokens import grants

logger = logging.getLogger(__name__)

_MAX_FORM = 4096


class _Renders(Protocol):
    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse: ...


def _next(value: str) -> str:
    """Where to go after signing in: a path under /ui/ (never another site)."""
    if value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/"


def add_signin_routes(router: APIRouter, pages: _Renders, sessions: Sessions, *,
                      auditor: Auditor | None,
                      on_failure: Callable[[str, str | None, str, str], None] | None) -> None:
    """Add ``GET``/``POST /login`` and ``POST /logout`` to the page's ``router``."""
    hours = round(sessions.lifetime / 3600, 1)

    def form(message: str, nxt: str, status: int) -> HTMLResponse:
        return pages.render("login.html", status, message=message, next=_next(nxt),
                            hours=f"{hours:g}", signed=False)

    @router.get("/login")
    def login_page(next: str = "/ui/") -> HTMLResponse:  # noqa: A002 - the query's name
        return form("", next, 200)

    @router.post("/login")
    async def login(request: Request) -> Response:
        body = await request.body()
        fields = parse_qs(body[:_MAX_FORM].decode("utf-8", "replace"))
        token = (fields.get("token") or [""])[0].strip()
        nxt = (fields.get("next") or ["/ui/"])[0]
        remote = request.client.host if request.client else ""
        verdict, cookie = await run_in_threadpool(sessions.issue, token)
        name = verdict.token.name if verdict.token is not None else None
        if verdict.outcome != "ok" or verdict.token is None:
            kind = {"expired": "expired_token", "revoked": "revoked_token"}.get(
                verdict.outcome, "invalid_token")
            if on_failure is not None:
                await run_in_threadpool(on_failure, kind, name, remote, "/ui/login")
            return form("That token is not valid (unknown, expired or revoked).", nxt, 401)
        if not grants(verdict.token.scopes, "query"):
            if on_failure is not None:
                await run_in_threadpool(on_failure, "insufficient_scope", name, remote,
                                        "/ui/login")
            return form(f"The token {name!r} lacks the query scope this page needs.", nxt, 403)
        logger.info("page: signed in with token %r from %s", name, remote or "?")
        if auditor is not None:
            auditor.user_session(name or "", remote)
        return RedirectResponse(_next(nxt), 303,
                                headers={"Set-Cookie": sessions.set_cookie(cookie)})

    @router.post("/logout")
    def logout(request: Request) -> Response:
        verdict = sessions.check(cookie_value(request.headers.get("cookie", "")))
        remote = request.client.host if request.client else ""
        if verdict.token is not None:
            logger.info("page: signed out (token %r) from %s", verdict.token.name, remote or "?")
            if auditor is not None:
                auditor.user_session(verdict.token.name, remote, logout=True)
        return RedirectResponse("/ui/login", 303, headers={"Set-Cookie": sessions.clear_cookie()})


__all__ = ["add_signin_routes"]
