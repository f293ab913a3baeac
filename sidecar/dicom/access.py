"""Who may open an association and what each peer may do (loopback, listed peers)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from sidecar.config import PERMISSIONS, PeerConfig

ALL: frozenset[str] = frozenset(PERMISSIONS)
NONE: frozenset[str] = frozenset()


def _as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AccessPolicy:
    """Decide whether a calling AE title from a host may associate, and what it may do.

    Parameters
    ----------
    peers
        Allowed ``(ae_title, host)`` pairs with their permissions; ``*`` is a
        wildcard on either side, ``host`` may be a CIDR network. A peer matching
        several entries has the permissions of all of them.
    allow_loopback
        Accept any calling AE title from 127.0.0.0/8 or ::1, with every permission.
    """

    def __init__(self, peers: Sequence[PeerConfig], allow_loopback: bool = True) -> None:
        self._allow_loopback = allow_loopback
        self._rules = [
            (
                p.ae_title,
                None if p.host == "*" else ipaddress.ip_network(p.host, strict=False),
                ALL if p.permissions is None else frozenset(p.permissions),
            )
            for p in peers
        ]

    def permissions(self, calling_ae_title: str, host: str) -> frozenset[str]:
        """What the peer may do (empty: it may not associate)."""
        ip = _as_ip(host)
        if ip is None:
            return NONE
        if self._allow_loopback and ip.is_loopback:
            return ALL
        title = calling_ae_title.strip()
        granted: set[str] = set()
        for rule_title, network, allowed in self._rules:
            if rule_title != "*" and rule_title != title:
                continue
            if network is None or (ip.version == network.version and ip in network):
                granted |= allowed
        return frozenset(granted)

    def allows(self, calling_ae_title: str, host: str) -> bool:
        """True when the peer may open an association (it may do at least one thing)."""
        return bool(self.permissions(calling_ae_title, host))

    def permits(self, calling_ae_title: str, host: str, operation: str) -> bool:
        """True when the peer may use ``operation`` (one of ``config.PERMISSIONS``)."""
        return operation in self.permissions(calling_ae_title, host)


def assumed_permissions(peers: Sequence[PeerConfig]) -> list[str]:
    """The peers given every permission because they list none (``ae_title@host``)."""
    return [f"{p.ae_title}@{p.host}" for p in peers if p.permissions is None]
