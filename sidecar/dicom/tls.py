"""DICOM over TLS for the receivers (``dicom.tls``): the context and the handshake.

The server context follows BCP 195 as DICOM PS3.15 Annex B asks: TLS 1.2 or
later, the ``ssl`` module's default cipher selection (forward secrecy, no
export, RC4 or NULL suites) and, by default, peers authenticated by a
certificate signed by ``dicom.tls.ca_certificates`` (mutual TLS).

pynetdicom's association server wraps each accepted socket and completes the
handshake in its one accepting thread, so a client that connects and sends
nothing holds up every other connection (indefinitely: the accepted socket
has no timeout; ``tests/test_tls.py`` hangs that way without this class).
:class:`TlsHandshakeInThread` wraps without handshaking and does the handshake
in the connection's own thread, bounded by ``dicom.tls.handshake_timeout``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from sidecar.config import TlsConfig
from sidecar.errors import ConfigError

logger = logging.getLogger(__name__)

EXPIRY_WARNING_DAYS: Final = 30
"""A node certificate that expires within this many days is warned about."""


@dataclass(frozen=True)
class NodeCertificate:
    """The node's own certificate (the first one of ``dicom.tls.certificate``)."""

    subject: str
    not_before: dt.datetime
    not_after: dt.datetime

    def days_left(self, now: dt.datetime | None = None) -> float:
        """Days until it expires (negative: expired)."""
        now = dt.datetime.now(dt.UTC) if now is None else now
        return (self.not_after - now).total_seconds() / 86400.0

    def expires_soon(self, now: dt.datetime | None = None) -> bool:
        """Within :data:`EXPIRY_WARNING_DAYS` of its end (or past it)."""
        return self.days_left(now) < EXPIRY_WARNING_DAYS

    def describe(self, now: dt.datetime | None = None) -> str:
        """``"CN=sidecar, valid until 2027-01-31 12:00 UTC (67 days)"``."""
        return (f"{self.subject or '(no subject)'}, valid until "
                f"{self.not_after:%Y-%m-%d %H:%M} UTC ({self.days_left(now):.0f} days)")


def node_certificate(path: Path, now: dt.datetime | None = None) -> NodeCertificate:
    """Read and date-check the node's certificate; a :class:`ConfigError` names the problem.

    Not yet valid or expired: every TLS client would refuse the handshake,
    so the node must not start with it.
    """
    try:
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (ValueError, OSError) as exc:
        raise ConfigError([f"dicom.tls.certificate: {path} holds no PEM certificate ({exc})"]) \
            from exc
    info = NodeCertificate(cert.subject.rfc4514_string(), cert.not_valid_before_utc,
                           cert.not_valid_after_utc)
    now = dt.datetime.now(dt.UTC) if now is None else now
    if now >= info.not_after:
        raise ConfigError([f"dicom.tls.certificate: {path} expired on "
                           f"{info.not_after:%Y-%m-%d %H:%M} UTC ({info.subject})"])
    if now < info.not_before:
        raise ConfigError([f"dicom.tls.certificate: {path} is not valid before "
                           f"{info.not_before:%Y-%m-%d %H:%M} UTC ({info.subject})"])
    return info


def checked_certificate(cfg: TlsConfig) -> NodeCertificate:
    """Check every TLS file as :func:`server_context` does; the node's certificate.

    Raises
    ------
    ConfigError
        A file is missing, unreadable or unusable, or the certificate is
        expired or not yet valid.
    """
    return _context(cfg)[1]


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The TLS context of the DICOM port; a :class:`ConfigError` names a bad file."""
    return _context(cfg)[0]


def _context(cfg: TlsConfig) -> tuple[ssl.SSLContext, NodeCertificate]:
    if cfg.certificate is None or cfg.private_key is None:
        raise ConfigError(["dicom.tls: certificate and private_key are needed for TLS"])
    for name in ("certificate", "private_key", "ca_certificates"):
        path: Path | None = getattr(cfg, name)
        if path is not None and not path.is_file():
            raise ConfigError([f"dicom.tls.{name}: {path} does not exist or is not a file"])
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError([f"dicom.tls.{name}: {path} cannot be read (permissions)"])
    cert = node_certificate(cfg.certificate)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.certificate, cfg.private_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError([
            f"dicom.tls: cannot use certificate {cfg.certificate} with private key "
            f"{cfg.private_key} ({getattr(exc, 'reason', None) or exc}): both must be PEM, "
            "the key unencrypted and matching the certificate"
        ]) from exc
    if cfg.ca_certificates is not None:
        try:
            context.load_verify_locations(cafile=cfg.ca_certificates)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError([
                f"dicom.tls.ca_certificates: {cfg.ca_certificates} holds no PEM certificate "
                f"({getattr(exc, 'reason', None) or exc})"
            ]) from exc
    if cfg.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif cfg.ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL  # a certificate that is presented must be valid
    else:
        context.verify_mode = ssl.CERT_NONE
    return context, cert


_NAME_KEYS = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
}


def peer_summary(sock: object) -> str | None:
    """How a connection is protected, for the association log line.

    ``"TLSv1.3, client certificate CN=pacs, O=Hospital"`` (the subject of a
    certificate the peer presented and the CA vouched for), ``"TLSv1.3, no
    client certificate"``, or ``None`` for plain TCP.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
        version = sock.version() or "TLS"
    except (ValueError, OSError):  # closed meanwhile
        return None
    subject: Any = cert.get("subject", ()) if cert else ()
    names = ", ".join(f"{_NAME_KEYS.get(str(key), str(key))}={value}"
                      for rdn in subject for key, value in rdn)
    return f"{version}, client certificate {names}" if names else \
        f"{version}, no client certificate"


class TlsHandshakeInThread:
    """Mixin for a pynetdicom ``AssociationServer``: TLS with the handshake per connection.

    Set ``tls_context`` and ``tls_handshake_timeout`` on the instance. A failed
    handshake closes that connection only: logged at WARNING with the reason
    (a certificate not trusted, no certificate, a plain DICOM client), or at
    DEBUG when the peer closed without a word (a port check).
    """

    tls_context: ssl.SSLContext
    tls_handshake_timeout: float
    #: Called with (peer address, reason) when a handshake fails (for the audit trail).
    tls_handshake_failed: Callable[[str, str], None] | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock: Any = getattr(self, "socket")  # noqa: B009 - set by socketserver
        client, address = sock.accept()
        wrapped = self.tls_context.wrap_socket(
            client, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address

    def _report(self, host: str, reason: str) -> None:
        if self.tls_handshake_failed is not None:
            self.tls_handshake_failed(host, reason)

    def finish_request(self, request: Any, client_address: Any) -> None:
        previous = request.gettimeout()
        request.settimeout(self.tls_handshake_timeout)
        host = client_address[0] if isinstance(client_address, tuple) else client_address
        try:
            request.do_handshake()
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
            logger.debug("TLS connection from %s closed during the handshake: %s", host, exc)
        except TimeoutError:
            logger.warning("TLS handshake with %s timed out after %g s", host,
                           self.tls_handshake_timeout)
            self._report(str(host), "TLS handshake timed out")
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            detail = getattr(exc, "verify_message", None)  # why a certificate was not trusted
            reason = f"{reason} ({detail})" if detail else reason
            logger.warning("TLS handshake with %s failed: %s", host, reason)
            self._report(str(host), f"TLS handshake failed: {reason}")
        else:
            request.settimeout(previous)
            logger.debug("TLS connection from %s: %s, %s", host, request.version(),
                         (request.cipher() or ("?",))[0])
            super().finish_request(request, client_address)  # type: ignore[misc]
            return
        try:
            request.close()
        except OSError:
            pass
