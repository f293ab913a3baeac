"""RFC 5424 syslog messages and their transports: UDP (RFC 5426), TCP (RFC 6587), TLS (RFC 5425).

Framing follows PS3.15 A.6 / IHE ITI-20: PRI 85 (facility 10 security/
authorization, severity 5 notice), MSGID ``IHE+RFC-3881``, no structured
data, the XML as MSG in UTF-8 after a byte order mark (RFC 5424 6.4).
Over TCP and TLS every message is preceded by its length in octets and a
space (octet counting); over UDP it is one datagram.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

PRI = 10 * 8 + 5
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
#: The largest UDP payload over IPv4; larger messages cannot be sent over UDP.
MAX_UDP = 65507

Protocol = Literal["udp", "tcp", "tls"]


def _header_field(value: str, limit: int) -> str:
    """``value`` as an RFC 5424 header field: printable US-ASCII, at most ``limit``, or ``-``."""
    cleaned = "".join(ch for ch in value if "\x21" <= ch <= "\x7e")[:limit]
    return cleaned or "-"


def frame(xml: bytes, *, hostname: str, app_name: str, procid: str,
          when: datetime | None = None) -> bytes:
    """One RFC 5424 message carrying ``xml`` (no trailing newline)."""
    ts = (when or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")
    header = (f"<{PRI}>1 {ts.replace('+00:00', 'Z')} {_header_field(hostname, 255)} "
              f"{_header_field(app_name, 48)} {_header_field(procid, 128)} {MSGID} -")
    return header.encode("ascii") + b" " + BOM + xml


def client_context(ca_certificates: Path | None, certificate: Path | None,
                   private_key: Path | None) -> ssl.SSLContext:
    """A TLS 1.2+ client context verifying the collector (and presenting ours when given)."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_certificates) if ca_certificates else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate is not None and private_key is not None:
        ctx.load_cert_chain(str(certificate), str(private_key))
    return ctx


class SyslogSender:
    """Sends messages to one collector; connects lazily and again after a failure.

    :meth:`send` raises :class:`OSError` when the message could not be handed
    to the network (connection refused or reset, TLS failure, timeout). A TCP
    or TLS message counts as sent once written to the socket; a UDP one once
    the datagram left (nothing confirms that it arrived).
    """

    def __init__(self, protocol: Protocol, host: str, port: int, *, timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None) -> None:
        if protocol == "tls" and tls is None:
            raise ValueError("syslog over TLS needs a TLS context")
        self.protocol = protocol
        self.host = host
        self.port = port
        self.timeout = timeout
        self._tls = tls
        self._sock: socket.socket | None = None

    @property
    def target(self) -> str:
        """``protocol://host:port`` (for logs)."""
        return f"{self.protocol}://{self.host}:{self.port}"

    def _connect(self) -> socket.socket:
        if self.protocol == "udp":
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(self.timeout)
            sock.connect(addr)
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        if self._tls is not None and self.protocol == "tls":
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        sock.settimeout(self.timeout)
        return sock

    def _peer_closed(self, sock: socket.socket) -> bool:
        """True when a stream collector closed the connection (we never expect data)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            if isinstance(sock, ssl.SSLSocket):
                # Readable may mean TLS records that carry no data (TLS 1.3 session
                # tickets after the handshake): read without blocking, so those are
                # consumed and do not cost a timeout and a new connection.
                sock.settimeout(0.0)
                try:
                    return not sock.recv(1)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return False
                finally:
                    sock.settimeout(self.timeout)
            return not sock.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def send(self, message: bytes) -> None:
        """Send one message (raises :class:`OSError` on failure)."""
        if self.protocol == "udp" and len(message) > MAX_UDP:
            raise OSError(f"message of {len(message)} bytes is too large for UDP")
        sock = self._sock
        if sock is not None and self.protocol != "udp" and self._peer_closed(sock):
            self.close()
            sock = None
        if sock is None:
            sock = self._sock = self._connect()
        try:
            if self.protocol == "udp":
                sock.send(message)
            else:
                sock.sendall(str(len(message)).encode("ascii") + b" " + message)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection (the next :meth:`send` opens a new one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
