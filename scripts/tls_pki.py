"""A throw-away PKI for DICOM TLS tests and benchmarks, made with the ``openssl`` command.

A CA standing for the PACS's, a server certificate for 127.0.0.1/localhost
signed by it, a client certificate signed by it, and a client certificate
signed by another CA (to be refused). RSA 2048, valid two days, keys
unencrypted. Never for production use.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Pki:
    """PEM files of :func:`make_pki`."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    """Signed by another CA."""
    rogue_key: Path


def _openssl(*args: str | Path) -> None:
    if OPENSSL is None:
        raise RuntimeError("the openssl command is not installed (apt-get install openssl)")
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN={name}")
    return cert, key


def _signed(d: Path, name: str, ca: tuple[Path, Path], san: str | None = None) -> tuple[Path, Path]:
    key, csr, cert = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={name}")
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Create the files in ``directory`` (made if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "pacs-ca")
    server = _signed(directory, "sidecar", ca, san="IP:127.0.0.1,DNS:localhost")
    client = _signed(directory, "pacs", ca)
    rogue = _signed(directory, "rogue", _ca(directory, "other-ca"))
    return Pki(ca[0], server[0], server[1], client[0], client[1], rogue[0], rogue[1])
