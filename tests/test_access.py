"""AccessPolicy: who may open an association."""

from __future__ import annotations

import pytest

from sidecar.config import PeerConfig
from sidecar.dicom.access import AccessPolicy, assumed_permissions

LOOPBACKS = ["127.0.0.1", "127.5.5.5", "127.255.255.254", "::1", "::ffff:127.0.0.1"]


def policy(*rules: tuple[str, str], allow_loopback: bool = True) -> AccessPolicy:
    return AccessPolicy(
        [PeerConfig(ae_title=ae, host=host) for ae, host in rules],
        allow_loopback=allow_loopback,
    )


@pytest.mark.parametrize("host", LOOPBACKS)
@pytest.mark.parametrize("ae", ["ANY", "STORESCU", ""])
def test_loopback_is_allowed_by_default(host: str, ae: str) -> None:
    assert policy().allows(ae, host)


@pytest.mark.parametrize("host", LOOPBACKS)
def test_loopback_refused_when_disabled(host: str) -> None:
    assert not policy(allow_loopback=False).allows("STORESCU", host)
    assert not policy(("PACS", "10.0.0.5"), allow_loopback=False).allows("PACS", host)


def test_loopback_can_still_be_listed_explicitly() -> None:
    p = policy(("LOCAL", "127.0.0.1"), allow_loopback=False)
    assert p.allows("LOCAL", "127.0.0.1")
    assert not p.allows("OTHER", "127.0.0.1")
    assert not p.allows("LOCAL", "127.0.0.2")


@pytest.mark.parametrize(
    "host", ["10.0.0.5", "192.168.1.1", "0.0.0.0", "2001:db8::1", "fe80::1", "::ffff:10.0.0.5"]
)
def test_unknown_hosts_are_refused_by_default(host: str) -> None:
    assert not policy().allows("PACS", host)


@pytest.mark.parametrize("host", ["localhost", "", "pacs.example.org", "10.0.0", "not an ip"])
def test_hosts_that_are_not_addresses_are_refused(host: str) -> None:
    p = policy(("*", "*"))  # even with a rule that matches everything
    assert not p.allows("PACS", host)


def test_ae_and_host_must_both_match() -> None:
    p = policy(("PACS", "10.0.0.5"))
    assert p.allows("PACS", "10.0.0.5")
    assert p.allows("PACS  ", "10.0.0.5")  # AE titles are space padded on the wire
    assert not p.allows("OTHER", "10.0.0.5")
    assert not p.allows("pacs", "10.0.0.5")  # AE titles are case sensitive
    assert not p.allows("PACS", "10.0.0.6")
    assert not p.allows("PACS", "10.0.0.50")


def test_several_rules() -> None:
    p = policy(("PACS", "10.0.0.5"), ("MODALITY", "10.0.0.6"))
    assert p.allows("PACS", "10.0.0.5")
    assert p.allows("MODALITY", "10.0.0.6")
    assert not p.allows("PACS", "10.0.0.6")
    assert not p.allows("MODALITY", "10.0.0.5")


def test_cidr_network() -> None:
    p = policy(("*", "10.0.0.0/24"), allow_loopback=False)
    assert p.allows("A", "10.0.0.0")
    assert p.allows("B", "10.0.0.77")
    assert p.allows("C", "10.0.0.255")
    assert not p.allows("A", "10.0.1.1")
    assert not p.allows("A", "9.255.255.255")


def test_cidr_with_host_bits_is_normalised() -> None:
    p = policy(("PACS", "192.168.7.42/16"))
    assert p.allows("PACS", "192.168.200.1")
    assert not p.allows("PACS", "192.169.0.1")


def test_wildcard_host_with_fixed_ae() -> None:
    p = policy(("PACS", "*"))
    assert p.allows("PACS", "10.1.2.3")
    assert p.allows("PACS", "2001:db8::7")
    assert not p.allows("OTHER", "10.1.2.3")


def test_wildcard_ae_with_fixed_host() -> None:
    p = policy(("*", "10.0.0.5"))
    assert p.allows("WHATEVER", "10.0.0.5")
    assert p.allows("", "10.0.0.5")
    assert not p.allows("WHATEVER", "10.0.0.4")


def test_ipv6_rules() -> None:
    p = policy(("V6", "2001:db8::/32"), ("ONE", "2001:db8:ffff::10"))
    assert p.allows("V6", "2001:db8::1")
    assert p.allows("V6", "2001:db8:1234::abcd")
    assert not p.allows("V6", "2001:db9::1")
    assert p.allows("ONE", "2001:db8:ffff::10")
    assert not p.allows("ONE", "2001:db8:ffff::11")
    # An IPv4 host never matches an IPv6 network (and the reverse).
    assert not p.allows("V6", "10.0.0.1")
    assert not policy(("V4", "0.0.0.0/0")).allows("V4", "2001:db8::1")


def test_ipv6_link_local_with_zone_id() -> None:
    p = policy(("LL", "fe80::/10"))
    assert p.allows("LL", "fe80::1%eth0")
    assert p.allows("LL", "febf::1%2")
    assert not p.allows("LL", "fec0::1%eth0")


def test_ipv4_mapped_peer_matches_ipv4_rule() -> None:
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    p = policy(("PACS", "10.0.0.5"), allow_loopback=False)
    assert p.allows("PACS", "::ffff:10.0.0.5")
    assert not p.allows("PACS", "::ffff:10.0.0.6")


def test_permissions_per_peer_and_unlisted_means_all() -> None:
    p = AccessPolicy([
        PeerConfig(ae_title="PACS", host="10.0.0.5", permissions=["store"]),
        PeerConfig(ae_title="VIEWER", host="10.0.0.0/24", permissions=["find", "similarity"]),
        PeerConfig(ae_title="OLD", host="10.0.0.7"),  # written before permissions existed
        PeerConfig(ae_title="MUTED", host="10.0.0.8", permissions=[]),
    ])
    assert p.permissions("PACS", "10.0.0.5") == {"store"}
    assert p.permits("PACS", "10.0.0.5", "store")
    assert not p.permits("PACS", "10.0.0.5", "find")
    assert p.permissions("VIEWER", "10.0.0.9") == {"find", "similarity"}
    assert not p.permits("VIEWER", "10.0.0.9", "example")
    assert p.permissions("OLD", "10.0.0.7") == {"store", "find", "similarity", "example"}
    assert not p.allows("MUTED", "10.0.0.8")  # nothing permitted: the association is refused
    assert p.permissions("PACS", "10.0.0.6") == frozenset()
    assert p.permissions("ANY", "127.0.0.1") == {"store", "find", "similarity", "example"}
    assert assumed_permissions([
        PeerConfig(ae_title="OLD", host="10.0.0.7"),
        PeerConfig(ae_title="PACS", host="10.0.0.5", permissions=["store"]),
    ]) == ["OLD@10.0.0.7/32"]


def test_matching_entries_add_their_permissions() -> None:
    p = AccessPolicy([
        PeerConfig(ae_title="*", host="10.0.0.0/24", permissions=["find"]),
        PeerConfig(ae_title="WS1", host="10.0.0.9", permissions=["similarity"]),
    ])
    assert p.permissions("WS1", "10.0.0.9") == {"find", "similarity"}
    assert p.permissions("WS2", "10.0.0.9") == {"find"}


def test_unknown_permission_is_refused_by_the_schema() -> None:
    with pytest.raises(ValueError, match="permissions"):
        PeerConfig(ae_title="PACS", host="10.0.0.5", permissions=["delete"])  # type: ignore[list-item]
