"""Which network endpoints a remote base classifier may live at (smoothcert.remote,
docs/bundles.md "Remote models"): the operator's allow-list, and addresses that are never
allowed. Standard library only: the API checks an uploaded bundle with it without torch.

Guarantees of `resolve`: the endpoint lies under an allow-list entry; its host is resolved
once and every address it resolves to is a unicast host address that is neither link-local
nor a cloud metadata service (those answer with credentials), whatever the list says; the
first address is pinned, so a later DNS answer cannot move the connections.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from smoothcert.manifest import BundleError

# Addresses no remote model may live at, whatever the allow-list says: cloud metadata
# services answer there with credentials.
METADATA_ADDRESSES = frozenset(map(ipaddress.ip_address, (
    "169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")))


class RemoteUnavailable(RuntimeError):
    """The remote server could not be reached (or did not answer after the retries); no
    sample was dropped or redrawn."""


@dataclass(frozen=True)
class RemoteOptions:
    """What the operator allows (the worker's settings; the CLI's flags).

    `allow`: endpoint prefixes a bundle may name ("https://triton.internal:8000", or
    "https://triton.internal:8000/prefix"); "*" allows any endpoint (a local CLI run, never a
    service default); empty allows none. `tokens`: endpoint origin → bearer token.
    `ca_file`: a CA bundle for TLS (default: the system's)."""

    allow: tuple[str, ...] = ()
    tokens: Mapping[str, str] = field(default_factory=dict)
    ca_file: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """A checked endpoint: where to connect (the pinned address) and what to call it."""

    scheme: str
    host: str
    port: int
    prefix: str  # path before /v2, no trailing slash
    address: str  # the resolved IP every connection goes to

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_endpoint(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, prefix) of an endpoint URL, or BundleError: http or https, a host,
    no credentials, query or fragment."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BundleError(f"remote endpoint {url!r} must be an http:// or https:// URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise BundleError(f"remote endpoint {url!r} may not carry credentials, a query or a fragment "
                          "(tokens come from the operator's settings)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname.lower(), port, parts.path.rstrip("/")


def allowed(url: str, allow: tuple[str, ...] | list[str]) -> bool:
    """Whether `url` lies under one of the allow-list's endpoint prefixes ("*": any)."""
    if "*" in allow:
        return True
    scheme, host, port, prefix = parse_endpoint(url)
    for entry in allow:
        try:
            s, h, p, pre = parse_endpoint(entry)
        except BundleError:
            continue
        if (s, h, p) == (scheme, host, port) and (prefix == pre or prefix.startswith(pre + "/") or not pre):
            return True
    return False


def refused_address(address: str) -> str | None:
    """Why a resolved address may never be connected to, or None."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast or ip.is_unspecified:
        return "not a unicast host address"
    return None


def resolve(url: str, options: RemoteOptions) -> Endpoint:
    """Check `url` against the allow-list, resolve its host once and pin the first address
    that may be used (every address the name resolves to must be allowed)."""
    if not allowed(url, options.allow):
        raise BundleError(f"remote endpoint {url!r} is not in this service's allow-list "
                          "(SMOOTHCERT_REMOTE_ENDPOINTS); an operator adds it there")
    scheme, host, port, prefix = parse_endpoint(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RemoteUnavailable(f"remote endpoint {url!r}: cannot resolve {host!r} ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        if reason := refused_address(address):
            raise BundleError(f"remote endpoint {url!r} resolves to {address}, {reason}: refused")
    return Endpoint(scheme, host, port, prefix, addresses[0])
