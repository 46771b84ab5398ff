"""Where alert webhooks may go (docs/alerts.md): the address rules and the allow list, directly."""

from __future__ import annotations

import ipaddress

import pytest

from schemas.webhooks import NOTHING_ALLOWED, parse_allow, refusal, target


def addresses(*texts: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(text) for text in texts]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.100.100.200",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:10.0.0.1",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "2002:a00:1::",  # 6to4 of 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    why = refusal("hooks.example.com", addresses(address))
    assert why is not None and str(ipaddress.ip_address(address)) in why


def test_every_address_a_name_resolves_to_must_be_public() -> None:
    assert (
        refusal("hooks.example.com", addresses("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"))
        is None
    )
    assert refusal("hooks.example.com", addresses("64:ff9b::5db8:d70e")) is None  # NAT64 of a public one
    why = refusal("hooks.example.com", addresses("93.184.215.14", "10.0.0.7"))
    assert why is not None and "10.0.0.7" in why and "private" in why
    assert refusal("hooks.example.com", []) == "'hooks.example.com' resolves to no address"


def test_the_allow_list_admits_its_hosts_and_networks_only() -> None:
    allow = parse_allow(" 127.0.0.0/8, hooks.internal. ,::1,, 10.1.0.0/16 ")
    assert refusal("localhost", addresses("127.0.0.1", "::1"), allow) is None
    assert refusal("HOOKS.internal", addresses("10.9.9.9"), allow) is None
    assert refusal("other.internal", addresses("10.1.2.3"), allow) is None
    assert refusal("other.internal", addresses("10.2.0.1"), allow) is not None
    assert refusal("localhost", addresses("127.0.0.1"), NOTHING_ALLOWED) is not None
    for bad in ("10.0.0.0/33", "a b", "host/path", "-"):
        with pytest.raises(ValueError, match="neither a host name"):
            parse_allow(bad)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("https:///path", "no host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://example.com:99999/", "not a URL"),
        ("https://exa mple.com/", "space or a control character"),
        ("https://example.com/" + "x" * 2048, "longer than"),
    ],
)
def test_malformed_urls_are_refused_saying_why(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        target(url)


def test_a_url_gives_where_a_delivery_connects() -> None:
    assert target("https://Hooks.Example.com/a?b=1") == ("https", "hooks.example.com", 443)
    assert target("http://[::1]:8080/x") == ("http", "::1", 8080)
