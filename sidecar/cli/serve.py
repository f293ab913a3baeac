"""`sidecar check-config` and `sidecar serve`."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click
import yaml

from sidecar.cli.options import config_option, load, logger
from sidecar.dicom.tls import checked_certificate
from sidecar.errors import ConfigError, SidecarError
from sidecar.http.tls import server_context
from sidecar.sdnotify import notify
from sidecar.service.app import Sidecar


@click.command("check-config")
@config_option(help_text="Configuration file to check.")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Validate the configuration and print the effective settings.

    With dicom.tls.enabled, also loads the certificate, key and CA files and
    prints until when the certificate is valid (a warning within 30 days; an
    expired one is an error); with http.tls.enabled, loads its files too. With
    embedding.model_path set, also loads that model as the service would (an ONNX
    file and its JSON contract, or TorchScript) and prints its model id; a model
    that does not load is an error.
    """
    cfg = load(ctx)
    if cfg.http.tls.enabled:
        try:
            server_context(cfg.http.tls)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    model_line = None
    if cfg.embedding.model_path is not None:
        # loads torch (and onnxruntime for an ONNX model): only when a model file is named
        from sidecar.embeddings.model import load_embedder  # noqa: PLC0415

        try:
            emb = load_embedder(cfg.embedding)
        except SidecarError as exc:  # ModelError
            raise click.ClickException(f"cannot load the embedding model: {exc}") from exc
        model_line = (f"# embedding model {emb.model_id} from {cfg.embedding.model_path}: "
                      f"input {emb.channels} x {emb.input_size} x {emb.input_size}, "
                      f"dim {emb.dim}")
    cert_line = None
    if cfg.dicom.tls.enabled:
        try:
            cert = checked_certificate(cfg.dicom.tls)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        soon = cert.expires_soon()
        cert_line = (f"# {'WARNING: ' if soon else ''}DICOM TLS certificate {cert.describe()}"
                     + (": renew it soon" if soon else ""))
    click.echo(yaml.safe_dump(cfg.effective(), sort_keys=False).rstrip("\n"))
    if cert_line is not None:
        click.echo(cert_line, err=True)
    if model_line is not None:
        click.echo(model_line, err=True)
    click.echo("# configuration OK", err=True)


@click.command()
@config_option()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the DICOM node and the scheduled jobs in the foreground until stopped."""
    cfg = load(ctx)
    stop = threading.Event()

    def _signal(signum: int, _frame: Any) -> None:
        logger.info("received signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, _signal)
    signal.signal(signal.SIGTERM, _signal)
    try:
        app = Sidecar(
            cfg,
            receiver_processes=None,
            log_level=ctx.obj.get("log_level") or cfg.logging.level,
        )
    except Exception as exc:
        raise click.ClickException(f"cannot start: {exc}") from exc
    try:
        host, port = app.start()
    except OSError as exc:
        app.stop()
        raise click.ClickException(
            f"cannot listen on {cfg.dicom.bind_address}:{cfg.dicom.port}: {exc.strerror}"
        ) from exc
    except SidecarError as exc:  # the index is busy, say
        app.stop()
        raise click.ClickException(f"cannot start: {exc}") from exc
    click.echo(f"sidecar ready: AE {cfg.dicom.ae_title} on {host}:{port}, data in {cfg.data_dir}",
               err=True)
    notify(f"READY=1\nSTATUS=AE {cfg.dicom.ae_title} on {host}:{port}")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        notify("STOPPING=1")
        app.stop()
