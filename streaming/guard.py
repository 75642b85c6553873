"""HTTP guards that need no routing: the client's address, Host, Origin and CORS, quotas.

Plain values in, plain values out (no asgineer), so each rule is unit-testable.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from django.http.request import split_domain_port, validate_host

from streaming import conf

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(specs: Iterable[str]) -> tuple[_Network, ...]:
    """CIDR specs (``10.0.0.0/8``, ``::1``) as networks; ValueError names a bad one."""
    out = []
    for spec in specs:
        try:
            out.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"not an address or network: {spec!r}") from exc
    return tuple(out)


def in_networks(address: str, nets: tuple[_Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in nets)


def client_address(peer: str, headers: Mapping[str, str], settings: conf.StreamingSettings) -> str:
    """The client's address: the peer's, or the proxy header's when the peer is trusted.

    The header's last address not itself a trusted proxy is the client (``X-Forwarded-For``
    is appended to hop by hop, so what comes before it may be forged by the client).
    """
    if settings.PROXY_HEADER is None:
        return peer
    trusted = networks(settings.PROXY_TRUSTED)
    if not in_networks(peer, trusted):
        return peer
    hops = [h.strip() for h in headers.get(settings.PROXY_HEADER.lower(), "").split(",")]
    for hop in reversed([h for h in hops if h]):
        if not in_networks(hop, trusted):
            return hop if _is_address(hop) else peer
    return peer


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_allowed(host_header: str | None, allowed_hosts: list[str], debug: bool) -> bool:
    """The Host header against ALLOWED_HOSTS, as Django checks it."""
    if not host_header:
        return False
    domain, _port = split_domain_port(host_header)
    if debug and not allowed_hosts:
        allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]
    return bool(domain) and validate_host(domain, allowed_hosts)


def same_origin(origin: str, host_header: str | None) -> bool:
    """Whether ``Origin`` names the host the request was sent to (any scheme)."""
    if not host_header or "://" not in origin:
        return False
    return origin.split("://", 1)[1].rstrip("/").lower() == host_header.lower()


def origin_may_post(
    origin: str | None, host_header: str | None, settings: conf.StreamingSettings
) -> bool:
    """A POST from a page: same origin, or one the settings allow. No Origin: not a browser
    page (curl, a server), which CSRF cannot forge."""
    if origin is None:
        return True
    allowed = set(settings.ALLOWED_ORIGINS) | set(settings.CORS_ALLOWED_ORIGINS)
    return origin in allowed or same_origin(origin, host_header)


def cors_headers(origin: str | None, settings: conf.StreamingSettings) -> dict[str, str]:
    """The CORS answer for ``origin``: the exact origin echoed, never ``*``."""
    if not settings.CORS_ALLOWED_ORIGINS:
        return {}
    # Vary on every answer once CORS is on: a shared cache must not hand one origin's
    # answer (with or without the allow header) to another.
    if origin is None or origin not in settings.CORS_ALLOWED_ORIGINS:
        return {"vary": "Origin"}
    out = {"access-control-allow-origin": origin, "vary": "Origin"}
    if settings.CORS_ALLOW_CREDENTIALS:
        out["access-control-allow-credentials"] = "true"
    return out


PREFLIGHT = {
    "access-control-allow-methods": "GET, POST",
    "access-control-allow-headers": "content-type, last-event-id, authorization",
    "access-control-max-age": "600",
}


def metrics_allowed(
    address: str, authorization: str | None, settings: conf.StreamingSettings
) -> bool:
    if settings.METRICS_TOKEN and authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), settings.METRICS_TOKEN.encode()
        ):
            return True
    return in_networks(address, networks(settings.METRICS_ALLOWED_ADDRESSES))


@dataclass
class Quotas:
    """Per-address counters of one process: open streams and recent creations."""

    max_streams: int
    creates_per_minute: int
    streams: dict[str, int] = field(default_factory=dict)
    _creations: dict[str, deque[float]] = field(default_factory=dict)

    def open_stream(self, address: str) -> bool:
        """Count a stream for ``address``; False (and nothing counted) past the cap."""
        count = self.streams.get(address, 0)
        if count >= self.max_streams:
            return False
        self.streams[address] = count + 1
        return True

    def close_stream(self, address: str) -> None:
        count = self.streams.get(address, 0) - 1
        if count > 0:
            self.streams[address] = count
        else:
            self.streams.pop(address, None)

    def create(self, address: str, now: float | None = None) -> bool:
        """Count a creation for ``address``; False past ``creates_per_minute`` in 60 s."""
        now = time.monotonic() if now is None else now
        recent = self._creations.setdefault(address, deque())
        while recent and recent[0] <= now - 60:
            recent.popleft()
        if len(recent) >= self.creates_per_minute:
            return False
        recent.append(now)
        if len(self._creations) > 10_000:  # forget idle addresses, so this stays small
            for addr in [a for a, q in self._creations.items() if not q or q[-1] <= now - 60]:
                del self._creations[addr]
        return True
