"""Command-line interface: the click group; the commands live in the topic modules.

The only place that configures logging; domain errors become a clean message
and a non-zero exit code here.
"""

from __future__ import annotations

import click

from sidecar.cli import catalogue, lab, models, query, serve, tokens
from sidecar.cli.options import config_option


@click.group()
@config_option()
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=None,
    help="Override logging.level.",
)
@click.version_option(package_name="pacs-sidecar")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """pacs-sidecar: DICOM similarity search beside a PACS."""
    ctx.ensure_object(dict)
    ctx.obj["log_level"] = log_level.upper() if log_level else None


for _command in (
    serve.check_config, serve.serve,
    catalogue.status, catalogue.ingest, catalogue.verify, catalogue.delete_study,
    models.embed, models.reindex, models.model, models.adapt, models.train,
    query.search, lab.evaluate, tokens.token,
):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
