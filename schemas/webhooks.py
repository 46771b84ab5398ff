"""Where alerts may be delivered (docs/alerts.md): webhook URLs guarded against request forgery.

A rule's ``webhook_url`` is a server-side request waiting to happen: pointed at
``http://169.254.169.254/`` (a cloud's metadata service), at ``localhost`` or at a
private network, it would make StreamLens fetch what its users must not reach. So
a URL is accepted only when its host resolves, and **every** address it resolves to
is public: not loopback, link-local (the metadata services live there), private,
shared (100.64/10), unique-local, multicast, reserved or unspecified, in IPv4 or
IPv6 (IPv4-mapped and 6to4/NAT64 forms judged by the IPv4 address inside).
``ALERT_WEBHOOK_ALLOW`` (comma-separated hosts or CIDRs, such as
``127.0.0.0/8,hooks.internal``) lists exceptions. The check runs when a rule is
saved and again before every delivery, on the addresses the delivery then connects
to, so a name that later resolves elsewhere (DNS rebinding) is caught at delivery.

The rules (:func:`parse_allow`, :func:`refusal`) are pure; :func:`resolve` asks
the system's resolver.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

URL_MAX_CHARS = 2048
# Beyond is_global's verdict: the metadata addresses of the clouds that do not use
# 169.254.169.254 (link-local, refused anyway) - Alibaba's 100.100.100.200 is in
# 100.64/10, AWS's IPv6 fd00:ec2::254 is unique-local: both refused as not global.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class AllowList(NamedTuple):
    """Hosts (lower-case names) and networks a webhook may reach though not public."""

    hosts: frozenset[str]
    networks: tuple[Network, ...]

    def allows(self, host: str, address: Address) -> bool:
        return host.lower().rstrip(".") in self.hosts or any(address in network for network in self.networks)


NOTHING_ALLOWED = AllowList(frozenset(), ())


def parse_allow(text: str) -> AllowList:
    """``ALERT_WEBHOOK_ALLOW``: comma-separated host names, addresses or CIDRs; ValueError
    naming the first bad item."""
    hosts: set[str] = set()
    networks: list[Network] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
            continue
        except ValueError:
            pass
        if "/" in item or not _valid_host(item):
            raise ValueError(f"{item!r} is neither a host name nor an address or CIDR")
        hosts.add(item.lower().rstrip("."))
    return AllowList(frozenset(hosts), tuple(networks))


def _valid_host(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return 0 < len(name) <= 253 and all(
        0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum() and label.isascii()
        for label in labels
    )


class Target(NamedTuple):
    """A webhook URL taken apart: where a delivery connects."""

    scheme: str
    host: str
    port: int


def target(url: str) -> Target:
    """The URL's scheme, host and port; ValueError saying what is wrong with it."""
    if len(url) > URL_MAX_CHARS:
        raise ValueError(f"longer than {URL_MAX_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"not a URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("expected an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not accepted: sign with webhook_secret instead")
    host = parts.hostname
    if not host:
        raise ValueError("the URL names no host")
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in url):
        raise ValueError("the URL holds a space or a control character")
    return Target(parts.scheme, host, port or (443 if parts.scheme == "https" else 80))


def _judged(address: Address) -> Address:
    """The address whose reach decides: the IPv4 one inside an IPv4-mapped, 6to4 or NAT64
    IPv6 address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def refusal(host: str, addresses: Iterable[Address], allow: AllowList = NOTHING_ALLOWED) -> str | None:
    """Why a webhook to ``host`` at ``addresses`` may not be delivered, or None when it may:
    every address must be public or allowed."""
    found = list(addresses)
    if not found:
        return f"{host!r} resolves to no address"
    for address in found:
        if allow.allows(host, address):
            continue
        judged = _judged(address)
        if not judged.is_global or judged.is_multicast:
            return (
                f"{host!r} resolves to {address}, a {_kind(judged)} address: webhooks go to public "
                f"addresses only (ALERT_WEBHOOK_ALLOW lists exceptions)"
            )
    return None


def _kind(address: Address) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (metadata service)"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_private:
        return "private"
    return "non-public"


def resolve(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to (an address literal: itself); OSError when it
    does not resolve."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    unique: dict[Address, None] = {}
    for _family, _type, _proto, _name, sockaddr in found:
        unique[ipaddress.ip_address(sockaddr[0].split("%", 1)[0])] = None
    return list(unique)


def check_url(url: str, allow: AllowList = NOTHING_ALLOWED) -> tuple[Target, list[Address]]:
    """The URL's target and the addresses a delivery may connect to; ValueError saying why
    the URL is refused (malformed, unresolvable, or reaching a non-public address)."""
    where = target(url)
    try:
        addresses = resolve(where.host, where.port)
    except OSError as error:
        raise ValueError(f"{where.host!r} does not resolve: {error}") from None
    why = refusal(where.host, addresses, allow)
    if why is not None:
        raise ValueError(why)
    return where, addresses
