"""Who may open an association: loopback by default, listed peers otherwise."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from sidecar.config import PeerConfig


def _as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AccessPolicy:
    """Decide whether a calling AE title from a host may associate.

    Parameters
    ----------
    peers
        Allowed ``(ae_title, host)`` pairs; ``*`` is a wildcard on either side,
        ``host`` may be a CIDR network.
    allow_loopback
        Accept any calling AE title from 127.0.0.0/8 or ::1.
    """

    def __init__(self, peers: Sequence[PeerConfig], allow_loopback: bool = True) -> None:
        self._allow_loopback = allow_loopback
        self._rules = [
            (
                p.ae_title,
                None if p.host == "*" else ipaddress.ip_network(p.host, strict=False),
            )
            for p in peers
        ]

    def allows(self, calling_ae_title: str, host: str) -> bool:
        """True when the peer may open an association."""
        ip = _as_ip(host)
        if ip is None:
            return False
        if self._allow_loopback and ip.is_loopback:
            return True
        title = calling_ae_title.strip()
        for rule_title, network in self._rules:
            if rule_title != "*" and rule_title != title:
                continue
            if network is None or (ip.version == network.version and ip in network):
                return True
        return False
