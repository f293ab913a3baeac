"""Bearer tokens of the HTTP API: made, checked, listed and revoked (no web framework here).

A token is ``sct_`` followed by 32 random bytes (``secrets.token_urlsafe``).
The catalogue keeps its SHA-256 digest only; the token is shown once, by
``sidecar token create``. Scopes: ``query`` (searches), ``metrics``
(``GET /metrics``), ``admin`` (every scope). Design and the choice of
SHA-256 over a password hash: docs/design/http-access.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

from sidecar.db.tokens import (
    TokenRow,
    find_by_digest,
    insert_token,
    list_tokens,
    revoke_token,
    touch,
)
from sidecar.db.types import Engine

PREFIX: Final = "sct_"
#: Every scope a token may have; ``admin`` includes the others.
SCOPES: Final = ("query", "metrics", "admin")
ADMIN: Final = "admin"
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
# sct_ + 43 characters of URL-safe base64 (32 bytes); a little slack either way.
_TOKEN_RE: Final = re.compile(r"^sct_[A-Za-z0-9_-]{40,64}$")
#: ``last_used_at`` is written at most this often per token (seconds), not on every request.
TOUCH_INTERVAL: Final = 60.0

Outcome = Literal["ok", "invalid", "expired", "revoked"]


class TokenError(ValueError):
    """A token cannot be created or revoked as asked (bad name, scope, taken name)."""


def utcnow() -> dt.datetime:
    """Now, aware, in UTC."""
    return dt.datetime.now(dt.UTC)


def digest(token: str) -> str:
    """The SHA-256 of a token, in hex (what the catalogue keeps)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def grants(scopes: Iterable[str], needed: str) -> bool:
    """Whether a token with ``scopes`` may use a route that needs ``needed``."""
    held = set(scopes)
    return needed in held or ADMIN in held


@dataclass(frozen=True)
class Verdict:
    """What :meth:`TokenStore.authenticate` found: the outcome and, unless invalid, the token."""

    outcome: Outcome
    token: TokenRow | None = None


class TokenStore:
    """The tokens in the catalogue.

    Parameters
    ----------
    engine
        The catalogue.
    touch_interval
        Seconds between two writes of a token's ``last_used_at``.
    clock
        Aware UTC now (tests).
    """

    def __init__(self, engine: Engine, *, touch_interval: float = TOUCH_INTERVAL,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self._engine = engine
        self._touch = dt.timedelta(seconds=touch_interval)
        self._clock = clock

    def create(self, name: str, scopes: Iterable[str],
               expires_days: float | None = None) -> tuple[str, TokenRow]:
        """A new token named ``name``: the token (to show once) and its row.

        Raises
        ------
        TokenError
            The name is not 1-64 of ``A-Z a-z 0-9 . _ @ -``, a scope is unknown,
            there is no scope, or a token not revoked has this name.
        """
        if not _NAME_RE.match(name):
            raise TokenError(f"token name {name!r}: use 1-64 letters, digits, '.', '_', '@' "
                             "or '-', starting with a letter or digit")
        wanted = tuple(dict.fromkeys(scopes))
        unknown = [s for s in wanted if s not in SCOPES]
        if unknown or not wanted:
            raise TokenError(f"scopes must be among {', '.join(SCOPES)} (at least one); "
                             f"got {', '.join(wanted) or 'none'}")
        if expires_days is not None and expires_days <= 0:
            raise TokenError("--expires-days must be a positive number of days")
        now = self._clock()
        expires = now + dt.timedelta(days=expires_days) if expires_days is not None else None
        token = PREFIX + secrets.token_urlsafe(32)
        if not insert_token(self._engine, name, digest(token), wanted, now, expires):
            raise TokenError(f"a token named {name!r} exists: revoke it first "
                             "(sidecar token revoke) or choose another name")
        return token, TokenRow(name, wanted, now, None, expires, None)

    def authenticate(self, token: str) -> Verdict:
        """Check a presented token; a good one has its ``last_used_at`` brought up to date."""
        if not _TOKEN_RE.match(token):
            return Verdict("invalid")
        return self.authenticate_digest(digest(token))

    def authenticate_digest(self, wanted: str) -> Verdict:
        """:meth:`authenticate` of the token whose SHA-256 is ``wanted`` (a page session)."""
        row = find_by_digest(self._engine, wanted)
        # The lookup is by digest; the digest comparison itself is in constant time.
        if row is None or not hmac.compare_digest(row.token_sha256, wanted):
            return Verdict("invalid")
        now = self._clock()
        if row.revoked_at is not None:
            return Verdict("revoked", row)
        if row.expires_at is not None and row.expires_at <= now:
            return Verdict("expired", row)
        stale = now - self._touch
        if row.last_used_at is None or row.last_used_at < stale:  # else no write at all
            touch(self._engine, wanted, now, stale)
        return Verdict("ok", row)

    def list(self, *, include_revoked: bool = False) -> list[TokenRow]:
        """The tokens (never their digests): not revoked ones unless asked."""
        return list_tokens(self._engine, include_revoked=include_revoked)

    def revoke(self, name: str) -> None:
        """Revoke the token named ``name`` (refused from the next request on).

        Raises
        ------
        TokenError
            No token not revoked has this name.
        """
        if revoke_token(self._engine, name, self._clock()) == 0:
            raise TokenError(f"no token named {name!r} (sidecar token list shows them)")


__all__ = ["PREFIX", "SCOPES", "TokenError", "TokenStore", "Verdict", "digest", "grants"]
