"""Catalogue queries of the HTTP API's bearer tokens (table ``api_token``).

Only SHA-256 digests are stored and looked up; the tokens themselves never
reach this module. Times are naive UTC in the database and aware UTC here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Row, insert, select, update
from sqlalchemy.exc import IntegrityError

from sidecar.db.models import API_TOKEN, SETTING


@dataclass(frozen=True)
class TokenRow:
    """One token as the catalogue holds it (its digest only in :func:`find_by_digest`)."""

    name: str
    scopes: tuple[str, ...]
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    token_sha256: str = ""


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else value.replace(tzinfo=dt.UTC)


def _naive(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else value.astimezone(dt.UTC).replace(tzinfo=None)


def _row(r: Row[Any], *, with_digest: bool = False) -> TokenRow:
    m = r._mapping
    created = _aware(m["created_at"])
    assert created is not None
    return TokenRow(
        name=str(m["name"]), scopes=tuple(str(m["scopes"]).split()), created_at=created,
        last_used_at=_aware(m["last_used_at"]), expires_at=_aware(m["expires_at"]),
        revoked_at=_aware(m["revoked_at"]),
        token_sha256=str(m["token_sha256"]) if with_digest else "",
    )


def insert_token(engine: Engine, name: str, digest: str, scopes: tuple[str, ...],
                 now: dt.datetime, expires_at: dt.datetime | None) -> bool:
    """Add a token; ``False`` (nothing added) when a token not revoked has that name."""
    with engine.begin() as conn:
        taken = conn.execute(
            select(API_TOKEN.c.id).where(API_TOKEN.c.name == name,
                                         API_TOKEN.c.revoked_at.is_(None))
        ).first()
        if taken is not None:
            return False
        conn.execute(API_TOKEN.insert().values(
            name=name, token_sha256=digest, scopes=" ".join(scopes), created_at=_naive(now),
            expires_at=_naive(expires_at),
        ))
    return True


def find_by_digest(engine: Engine, digest: str) -> TokenRow | None:
    """The token whose SHA-256 digest is ``digest`` (revoked or not), with its digest."""
    with engine.connect() as conn:
        r = conn.execute(select(API_TOKEN).where(API_TOKEN.c.token_sha256 == digest)).first()
    return None if r is None else _row(r, with_digest=True)


def touch(engine: Engine, digest: str, now: dt.datetime, older_than: dt.datetime) -> None:
    """Set ``last_used_at`` to ``now`` unless it is already later than ``older_than``."""
    with engine.begin() as conn:
        conn.execute(
            update(API_TOKEN)
            .where(API_TOKEN.c.token_sha256 == digest,
                   API_TOKEN.c.last_used_at.is_(None)
                   | (API_TOKEN.c.last_used_at < _naive(older_than)))
            .values(last_used_at=_naive(now))
        )


def list_tokens(engine: Engine, *, include_revoked: bool = False) -> list[TokenRow]:
    """Every token (not revoked unless asked), by name then creation; no digests."""
    stmt = select(API_TOKEN).order_by(API_TOKEN.c.name, API_TOKEN.c.created_at)
    if not include_revoked:
        stmt = stmt.where(API_TOKEN.c.revoked_at.is_(None))
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(stmt)]


def revoke_token(engine: Engine, name: str, now: dt.datetime) -> int:
    """Mark the token of that name revoked; the number of tokens revoked (0 or 1)."""
    with engine.begin() as conn:
        result = conn.execute(
            update(API_TOKEN)
            .where(API_TOKEN.c.name == name, API_TOKEN.c.revoked_at.is_(None))
            .values(revoked_at=_naive(now))
        )
    return int(result.rowcount or 0)


SESSION_KEY = "ui_session_key"
"""The setting holding the page sessions' HMAC key (hex), made once per catalogue."""


def session_key(engine: Engine, new: str) -> str:
    """The page sessions' key: the stored one, else ``new`` stored now (first caller wins)."""
    with engine.connect() as conn:
        value = conn.execute(select(SETTING.c.value).where(SETTING.c.key == SESSION_KEY)).scalar()
    if value:
        return str(value)
    try:
        with engine.begin() as conn:
            conn.execute(insert(SETTING).values(key=SESSION_KEY, value=new,
                                                updated_at=dt.datetime.now(dt.UTC)
                                                .replace(tzinfo=None)))
    except IntegrityError:
        pass  # another process stored one first
    with engine.connect() as conn:
        return str(conn.execute(select(SETTING.c.value)
                                .where(SETTING.c.key == SESSION_KEY)).scalar())
