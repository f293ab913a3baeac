"""What every command shares: the configuration (with its --config option) and logging."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sidecar.config import CONFIG_ENV, Config, load_config
from sidecar.dicom.logs import log_identifiers
from sidecar.errors import ConfigError
from sidecar.logsetup import configure_logging

logger = logging.getLogger("sidecar")

DEFAULT_CONFIG = Path("config/sidecar.yaml")
CONFIG_HELP = f"YAML configuration (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG} if present)."

FC = TypeVar("FC", bound=Callable[..., Any] | click.Command)


def _set_config_path(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:  # a subcommand's --config wins over the group's
        ctx.ensure_object(dict)["config_path"] = value


def config_option(help_text: str = CONFIG_HELP) -> Callable[[FC], FC]:
    """``--config PATH``, accepted before the subcommand and after it."""
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
        default=None, expose_value=False, callback=_set_config_path, help=help_text,
    )


def load(ctx: click.Context) -> Config:
    """The configuration (loaded once per invocation); logging is configured with it."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "config" not in obj:
        path = obj.get("config_path")
        if path is None and not os.environ.get(CONFIG_ENV) and DEFAULT_CONFIG.exists():
            path = DEFAULT_CONFIG
        try:
            obj["config"] = load_config(path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        level = obj.get("log_level") or obj["config"].logging.level
        configure_logging(level)
        log_identifiers(level)
    cfg: Config = obj["config"]
    return cfg


def human(n: float) -> str:
    """A byte count in B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover
