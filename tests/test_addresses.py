"""The labels of names that carry their address ({ip})."""

from __future__ import annotations

import ipaddress

import pytest

from csrproxy.addresses import (
    DEFAULT_RANGES,
    address_label,
    address_of_label,
    parse_ranges,
    within,
)


@pytest.mark.parametrize(
    ("label", "address"),
    [
        ("10-0-0-5", "10.0.0.5"),
        ("192-168-001-1", None),  # leading zeros: not a canonical part
        ("256-0-0-1", None),
        ("10-0-0", None),
        ("fd00-0-0-0-0-0-0-1", "fd00::1"),
        ("FD00--1", "fd00::1"),
        ("0--1", "::1"),
        ("fe80--1", "fe80::1"),
        ("-1-2-3-4", None),
        ("fd00--1-", None),
        ("www", None),
        ("deadbeef", None),
        ("1-2--3", "1:2::3"),
        ("x" * 64, None),
    ],
)
def test_labels(label: str, address: str | None) -> None:
    found = address_of_label(label)
    assert (str(found) if found is not None else None) == address


def test_canonical_labels_round_trip_and_are_ldh() -> None:
    for text in ("10.0.0.5", "fd00::1", "::1", "2001:db8::ab:1", "fe80::1"):
        address = ipaddress.ip_address(text)
        label = address_label(address)
        assert "--" not in label and not label.startswith("-") and len(label) <= 63
        assert address_of_label(label) == address
    assert address_label(ipaddress.ip_address("::1")) == "0-0-0-0-0-0-0-1"


def test_ranges() -> None:
    assert within(ipaddress.ip_address("192.168.1.2"), DEFAULT_RANGES)
    assert within(ipaddress.ip_address("fd12::3"), DEFAULT_RANGES)
    assert not within(ipaddress.ip_address("8.8.8.8"), DEFAULT_RANGES)
    assert not within(ipaddress.ip_address("2001:db8::1"), DEFAULT_RANGES)
    assert parse_ranges(["198.51.100.0/24", " 2001:db8::/32 "]) == (
        ipaddress.ip_network("198.51.100.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    with pytest.raises(ValueError, match="not an IP network"):
        parse_ranges(["nope"])
