"""Page sessions: a browser signs in once with a bearer token and gets a cookie.

A browser cannot send ``Authorization: Bearer`` when a radiologist follows a
link, so when tokens are required the page (``/ui``) asks for a token once
(``/ui/login``) and answers with a session cookie: ``v1.<token digest>.<expiry>.<mac>``,
an HMAC-SHA256 under a random key kept in the catalogue (one per site, shared by
every node on the same database). The cookie is ``HttpOnly``, ``SameSite=Strict``,
``Path=/ui``, ``Secure`` under ``http.tls``, and lives ``ui.session_hours``. It
holds no token: each request checks the token behind it again, so revoking or
expiring the token ends the session at once. It is honoured under ``/ui`` only
(never for the JSON API), and a POST carried by it must come from the page's own
origin (``Origin`` header), against cross-site request forgery.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from hashlib import sha256
from typing import Final

from sidecar.db.tokens import session_key
from sidecar.db.types import Engine
from sidecar.http.tokens import TokenStore, Verdict, digest

COOKIE: Final = "sidecar_session"
PATH: Final = "/ui"
_VERSION: Final = "v1"


class Sessions:
    """Issues and checks page session cookies (see the module).

    Parameters
    ----------
    tokens
        The catalogue's tokens.
    engine
        Where the HMAC key is kept.
    lifetime
        Seconds a session lasts (``ui.session_hours``).
    secure
        Whether the cookie is ``Secure`` (HTTPS: ``http.tls``).
    clock
        ``time.time`` (tests).
    """

    def __init__(self, tokens: TokenStore, engine: Engine, *, lifetime: float,
                 secure: bool, clock: Callable[[], float] = time.time) -> None:
        self._tokens = tokens
        self._key = bytes.fromhex(session_key(engine, secrets.token_hex(32)))
        self.lifetime = lifetime
        self.secure = secure
        self._clock = clock

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode("ascii"), sha256).hexdigest()

    def issue(self, token: str) -> tuple[Verdict, str]:
        """Check ``token``; when good, also the cookie value of a new session."""
        verdict = self._tokens.authenticate(token)
        if verdict.outcome != "ok":
            return verdict, ""
        expiry = int(self._clock() + self.lifetime)
        body = f"{_VERSION}.{digest(token)}.{expiry}"
        return verdict, f"{body}.{self._mac(body)}"

    def check(self, value: str) -> Verdict:
        """The token behind a session cookie, checked now (``invalid`` for a bad or old one)."""
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[2].isdigit():
            return Verdict("invalid")
        body = ".".join(parts[:3])
        if not hmac.compare_digest(self._mac(body), parts[3]):
            return Verdict("invalid")
        if int(parts[2]) <= self._clock():
            return Verdict("expired")
        return self._tokens.authenticate_digest(parts[1])

    def set_cookie(self, value: str) -> str:
        """The ``Set-Cookie`` header value of a new session."""
        secure = "; Secure" if self.secure else ""
        return (f"{COOKIE}={value}; Path={PATH}; Max-Age={int(self.lifetime)}; HttpOnly; "
                f"SameSite=Strict{secure}")

    def clear_cookie(self) -> str:
        """The ``Set-Cookie`` header value that ends the session in the browser."""
        secure = "; Secure" if self.secure else ""
        return f"{COOKIE}=; Path={PATH}; Max-Age=0; HttpOnly; SameSite=Strict{secure}"


def cookie_value(header: str) -> str:
    """The session cookie's value in a ``Cookie`` header ("" when absent)."""
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value.strip()
    return ""


__all__ = ["COOKIE", "Sessions", "cookie_value"]
