"""HTTP/1.1 wire details shared by both sides of the proxy: limits, header rules, framing."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus the
# pre-standard ones still seen in the wild.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Internal headers of the edge -> host hop; a client may not set them.
H_INSTANCE = b"kubefly-instance"
H_HOP_TOKEN = b"kubefly-hop-token"
H_FULL = b"kubefly-full"
INTERNAL = frozenset({H_INSTANCE, H_HOP_TOKEN, H_FULL})

REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@dataclass(frozen=True)
class Limits:
    max_url: int = 8 * 1024
    max_header_bytes: int = 32 * 1024  # request line excluded
    max_headers: int = 100


class BadRequest(Exception):
    """A request the proxy refuses before routing; carries the status to answer."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_framing(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """Return (content_length, chunked) or refuse ambiguous framing.

    Every shape that two HTTP implementations could read differently is
    refused: both Content-Length and Transfer-Encoding, repeated
    Content-Length, any transfer coding other than a lone `chunked`.
    """
    length: int | None = None
    te: list[bytes] = []
    seen_cl = False
    for name, value in headers:
        if name == b"content-length":
            if seen_cl:
                raise BadRequest(400, "repeated Content-Length")
            seen_cl = True
            v = value.strip()
            if not v.isdigit() or len(v) > 18:
                raise BadRequest(400, "invalid Content-Length")
            length = int(v)
        elif name == b"transfer-encoding":
            te.append(value)
    if te:
        if seen_cl:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if len(te) != 1 or te[0].strip().lower() != b"chunked":
            raise BadRequest(501, "unsupported Transfer-Encoding")
        return None, True
    return length, False


# Host = uri-host [":" port] (RFC 9110 §7.2, RFC 3986 §3.2.2): a bracketed IP literal or a
# reg-name (which covers IPv4), then an optional port of digits.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(?::([0-9]*))?")


def check_host(value: bytes) -> None:
    """Refuse a Host header that is not a host and an optional port in 1..65535.

    `app.org.domain:abc` must not be read as the app's name by one reader and
    as something else by another (a cache, the app behind the proxy).
    """
    m = _HOST.fullmatch(value.strip(b" \t"))
    if m is None:
        raise BadRequest(400, "invalid Host header")
    port = m.group(2)
    if port and not (len(port) <= 5 and 1 <= int(port) <= 65535):
        raise BadRequest(400, "invalid port in the Host header")


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


# What end_to_end drops from every message; bodies are re-framed, so Content-Length goes too.
DROP = HOP_BY_HOP | INTERNAL | {b"content-length"}
# Connection tokens that name no header.
_PLAIN_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade"})


def end_to_end(headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = DROP) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers, those the Connection header names, internal ones and `drop`."""
    out = [h for h in headers if h[0] not in drop]
    if len(out) < len(headers) and any(h[0] == b"connection" for h in headers):
        named = connection_tokens(headers) - _PLAIN_TOKENS
        if named:  # rare: the Connection header names further hop-by-hop headers
            out = [h for h in out if h[0] not in named]
    return out


def response_headers(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> tuple[bytes, bytes | None, bytes | None]:
    """A response's end-to-end headers serialized, its Content-Length and its
    fly-replay header, in one pass (this runs for every response the proxy relays)."""
    out = []
    length = replay = None
    named: set[bytes] | None = None
    for name, value in headers:
        if name == b"fly-replay":
            replay = value
        if name in drop:
            if name == b"content-length":
                length = value
            elif name == b"connection" and value.lower() not in _PLAIN_TOKENS:
                named = connection_tokens(headers) - _PLAIN_TOKENS
            continue
        out.append(name + b": " + value + b"\r\n")
    if named:  # rare: the Connection header names further hop-by-hop headers
        out = [name + b": " + value + b"\r\n" for name, value in headers if name not in drop and name not in named]
    return b"".join(out), length, replay


def get(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def serialize_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([n + b": " + v + b"\r\n" for n, v in headers])


_STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in REASONS.items()}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Status\r\n" % status


def simple_response(
    status: int,
    body: bytes,
    *,
    keep_alive: bool,
    content_type: bytes = b"text/plain; charset=utf-8",
    extra: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> bytes:
    head = status_line(status)
    hdrs = [
        (b"content-type", content_type),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"keep-alive" if keep_alive else b"close"),
        *extra,
    ]
    return head + serialize_headers(hdrs) + b"\r\n" + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def status_has_no_body(status: int, method: bytes) -> bool:
    return method == b"HEAD" or status in (204, 304) or 100 <= status < 200
