"""`sidecar token create|list|revoke`: the bearer tokens of the HTTP API.

The token is printed once, on standard output, by ``create`` (so that
``TOKEN=$(sidecar token create ...)`` works); it is never stored or logged.
"""

from __future__ import annotations

import datetime as dt
import json

import click

from sidecar.cli.options import config_option, load, logger
from sidecar.db.connect import catalogue
from sidecar.db.tokens import TokenRow
from sidecar.http.tokens import SCOPES, TokenError, TokenStore, utcnow


def _when(value: dt.datetime | None, never: str = "-") -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else never


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _state(row: TokenRow, now: dt.datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


@click.group()
def token() -> None:
    """Bearer tokens of the HTTP API (stored hashed in the catalogue)."""


@token.command()
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(SCOPES), help="query (searches), metrics (GET /metrics) or "
              "admin (every scope); repeat for several.")
@click.option("--expires-days", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Refused after this many days (default: never expires).")
@config_option()
@click.pass_context
def create(ctx: click.Context, name: str, scopes: tuple[str, ...],
           expires_days: float | None) -> None:
    """Create a token NAME and print it, once, on standard output."""
    cfg = load(ctx)
    with catalogue(cfg) as (engine, _):
        try:
            secret, row = TokenStore(engine).create(name, scopes, expires_days)
        except TokenError as exc:
            raise click.ClickException(str(exc)) from exc
    logger.info("HTTP token %r created: scopes %s, expires %s", row.name, " ".join(row.scopes),
                _when(row.expires_at, "never"))
    click.echo(f"token {row.name!r} created (scopes {', '.join(row.scopes)}; expires "
               f"{_when(row.expires_at, 'never')}). It is shown only now: keep it in a "
               "secrets store; clients send it as 'Authorization: Bearer <token>'.", err=True)
    click.echo(secret)


@token.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
@config_option()
@click.pass_context
def list_(ctx: click.Context, include_revoked: bool, as_json: bool) -> None:
    """Names, scopes, creation, last use and expiry of the tokens (never the tokens)."""
    cfg = load(ctx)
    with catalogue(cfg) as (engine, _):
        rows = TokenStore(engine).list(include_revoked=include_revoked)
    now = utcnow()
    if as_json:
        click.echo(json.dumps([
            {"name": r.name, "scopes": list(r.scopes), "state": _state(r, now),
             "created_at": _iso(r.created_at), "last_used_at": _iso(r.last_used_at),
             "expires_at": _iso(r.expires_at), "revoked_at": _iso(r.revoked_at)}
            for r in rows], indent=2))
        return
    if not rows:
        click.echo("no tokens (sidecar token create NAME --scope query)")
        return
    header = ("NAME", "SCOPES", "STATE", "CREATED", "LAST USED", "EXPIRES")
    table = [header] + [
        (r.name, ",".join(r.scopes), _state(r, now), _when(r.created_at),
         _when(r.last_used_at, "never"), _when(r.expires_at, "never"))
        for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


@token.command()
@click.argument("name")
@config_option()
@click.pass_context
def revoke(ctx: click.Context, name: str) -> None:
    """Revoke the token NAME: refused from the next request on."""
    cfg = load(ctx)
    with catalogue(cfg) as (engine, _):
        try:
            TokenStore(engine).revoke(name)
        except TokenError as exc:
            raise click.ClickException(str(exc)) from exc
    logger.info("HTTP token %r revoked", name)
    click.echo(f"token {name!r} revoked")
