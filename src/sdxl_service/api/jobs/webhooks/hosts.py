"""Which addresses a webhook may reach: SDXL_WEBHOOK_HOSTS, checked before any connection.

A caller names the URL, so without a rule the server would POST wherever it is
told, its own network included (SSRF). The rule: with SDXL_WEBHOOK_HOSTS
empty, public addresses only; otherwise the hosts, addresses and networks it
lists, and any public address where it lists `public`. Loopback, private,
link-local and other special ranges are refused unless listed.

A name is resolved here and every address it has is checked; the delivery
then connects to an address checked here (not to the name again), so a DNS
answer that changes between the check and the connection (rebinding) cannot
lead it elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

PUBLIC = "public"
MAX_URL_CHARS = 2048


class WebhookRefused(ValueError):
    """The URL is not one a webhook may be sent to; the message says why (for a 400)."""


@dataclass(frozen=True)
class CheckedTarget:
    """A webhook URL whose host was resolved and allowed, and the address to connect to."""

    url: str
    scheme: str
    host: str  # the name, for the Host header and TLS (SNI, certificate)
    port: int
    address: Address
    path: str  # path and query

    @property
    def connect_url(self) -> str:
        """The URL with the checked address in place of the name."""
        literal = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


async def _system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


class WebhookHosts:
    def __init__(self, entries: Iterable[str] = (), resolver: Resolver | None = None) -> None:
        listed = [entry.strip().lower() for entry in entries if entry.strip()]
        self.any_public = not listed or PUBLIC in listed
        self.networks: list[Network] = []
        self.names: set[str] = set()
        for entry in listed:
            if entry == PUBLIC:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry.rstrip("."))
        self._resolve = resolver or _system_resolver

    def allows(self, host: str, address: Address) -> bool:
        if host.lower().rstrip(".") in self.names:
            return True
        if any(address in network for network in self.networks):
            return True
        return self.any_public and address.is_global

    async def check(self, url: str) -> CheckedTarget:
        """The target of `url` once its host and every address of it are allowed."""
        if len(url) > MAX_URL_CHARS:
            raise WebhookRefused(f"webhook_url is longer than {MAX_URL_CHARS} characters.")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise WebhookRefused(f"webhook_url is not a URL: {exc}.") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookRefused("webhook_url must be an absolute http:// or https:// URL.")
        if parts.username is not None or parts.password is not None:
            raise WebhookRefused("webhook_url must not carry credentials.")
        host = parts.hostname
        port = port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = [_unmapped(ipaddress.ip_address(host))]
        except ValueError:
            try:
                found = await self._resolve(host, port)
            except OSError as exc:
                raise WebhookRefused(
                    f"webhook_url's host {host!r} does not resolve: {exc}."
                ) from None
            addresses = sorted(
                {_unmapped(ipaddress.ip_address(a.split("%")[0])) for a in found}, key=str
            )
        if not addresses:
            raise WebhookRefused(f"webhook_url's host {host!r} has no address.")
        refused = [a for a in addresses if not self.allows(host, a)]
        if refused:
            raise WebhookRefused(
                f"webhook_url's host {host!r} is {refused[0]}, which webhooks may not reach "
                "(not a public address, and not listed in SDXL_WEBHOOK_HOSTS)."
            )
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return CheckedTarget(url, parts.scheme, host, port, addresses[0], path)


def _unmapped(address: Address) -> Address:
    # ::ffff:10.0.0.1 is 10.0.0.1: judged as the IPv4 address it is.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
