"""Who may use the service: the token, the Host a request names, and the Origin of a browser page.

* Token. With `--token`, every request must carry `?token=...` (compared in constant time).
* Host, against DNS rebinding. A page on evil.example whose DNS name is then pointed at 127.0.0.1
  reaches this server with `Host: evil.example`, and the browser treats it as evil.example's own.
  Without a token a request must name this server by an IP address, `localhost` (or a name under
  .localhost, which browsers resolve to loopback themselves), or the host of an allowed origin.
  With a token the name is not checked: a rebinding page cannot know the token.
* Origin, against cross-site WebSocket hijacking. Any page open in a browser may try to open a
  WebSocket to this server; the browser says which page with `Origin`. A WebSocket is accepted
  from this server's own page (Origin matches the Host the request names) or from an origin given
  with `--allow-origin` ("*": any). Programs that are not browsers send no Origin and are not
  checked here: they are not steered by someone else's page.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.http11 import Request

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def parse_origin(text: str) -> str:
    """An origin as `--allow-origin` takes it ("*", or scheme://host[:port]), normalised; else ValueError."""
    if text == "*":
        return text
    parts = _split(text)
    if parts is None or parts[0] not in ("http", "https") or urlsplit(text).path not in ("", "/"):
        raise ValueError(f"{text!r} is not an origin: give scheme://host[:port], e.g. http://stream.example:8000")
    return _origin(parts)


def _split(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or URL, None if it has no host or a bad port."""
    try:
        url = urlsplit(origin.strip().lower())
        port = url.port
    except ValueError:
        return None
    if not url.hostname or url.scheme not in DEFAULT_PORTS:
        return None
    return url.scheme, url.hostname, port if port is not None else DEFAULT_PORTS[url.scheme]


def _origin(parts: tuple[str, str, int]) -> str:
    scheme, host, port = parts
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def _host_header(value: str | None, scheme: str = "http") -> tuple[str, int] | None:
    """(host, port) of a Host header, None if missing or malformed."""
    parts = _split(f"{scheme}://{value}") if value else None
    return parts[1:] if parts else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AccessPolicy:
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    """Normalised by `parse_origin`."""

    def refusal(self, request: Request, websocket: bool) -> tuple[HTTPStatus, str] | None:
        """Why `request` is refused (status, one line), or None if it may go on."""
        if self.token and not self._token_given(request):
            return HTTPStatus.UNAUTHORIZED, "a valid ?token= is required"
        host = request.headers.get("Host")
        if not self.token and not self._known_host(host):
            return HTTPStatus.FORBIDDEN, (
                f"this server does not answer to the name {host!r}; use its IP address or localhost, "
                "or start it with --allow-origin for the origin viewers use"
            )
        origin = request.headers.get("Origin")
        if websocket and origin is not None and not self._allowed_origin(origin, host):
            return HTTPStatus.FORBIDDEN, f"pages from {origin[:100]!r} may not connect (see --allow-origin)"
        return None

    def _token_given(self, request: Request) -> bool:
        given = parse_qs(urlsplit(request.path).query).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _known_host(self, value: str | None) -> bool:
        parsed = _host_header(value)
        if parsed is None:
            return False
        name = parsed[0]
        if _is_ip(name) or name == "localhost" or name.endswith(".localhost"):
            return True
        return any(_split(origin) and _split(origin)[1] == name for origin in self.allowed_origins)

    def _allowed_origin(self, origin: str, host: str | None) -> bool:
        if "*" in self.allowed_origins:
            return True
        parts = _split(origin)
        if parts is None or parts[0] not in ("http", "https"):
            return False  # "null" (a sandboxed or file:// page), or not a web origin
        if _origin(parts) in self.allowed_origins:
            return True
        return _host_header(host, parts[0]) == parts[1:]  # the page this server served
