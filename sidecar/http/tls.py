"""HTTPS for the HTTP API (``http.tls``): the server's TLS context, its files checked.

TLS 1.2 or later; with ``require_client_certificate`` (default) a client
must present a certificate that chains to ``ca_certificates`` (mutual TLS),
otherwise the handshake fails before any HTTP is read. Bearer tokens apply
on top (``http.auth``). Errors name the setting and the file.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from sidecar.config import HttpTlsConfig
from sidecar.errors import ConfigError


def server_context(cfg: HttpTlsConfig) -> ssl.SSLContext:
    """The TLS context of the HTTP API.

    Raises
    ------
    ConfigError
        A file is not set, missing, unreadable or unusable (named by its setting).
    """
    if cfg.certificate is None or cfg.private_key is None:
        raise ConfigError(["http.tls: certificate and private_key are needed for HTTPS"])
    for name in ("certificate", "private_key", "ca_certificates"):
        path: Path | None = getattr(cfg, name)
        if path is not None and not path.is_file():
            raise ConfigError([f"http.tls.{name}: {path} does not exist or is not a file"])
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError([f"http.tls.{name}: {path} cannot be read (permissions)"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.certificate, cfg.private_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError([
            f"http.tls: cannot use certificate {cfg.certificate} with private key "
            f"{cfg.private_key} ({getattr(exc, 'reason', None) or exc}): both must be PEM, "
            "the key unencrypted and matching the certificate"
        ]) from exc
    if cfg.ca_certificates is not None:
        try:
            context.load_verify_locations(cafile=cfg.ca_certificates)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError([
                f"http.tls.ca_certificates: {cfg.ca_certificates} holds no PEM certificate "
                f"({getattr(exc, 'reason', None) or exc})"
            ]) from exc
    if cfg.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif cfg.ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL  # a certificate that is presented must be valid
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


__all__ = ["server_context"]
