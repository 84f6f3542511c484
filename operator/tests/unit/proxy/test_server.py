"""The client-facing HTTP/1.1 connection, fed raw bytes over loopback."""

from __future__ import annotations

import asyncio
import re

import pytest

from kubefly.proxy import http1, server


@pytest.fixture
async def echo():
    """A server whose handler answers `METHOD TARGET BODY`."""

    async def handler(req: server.Request):
        parts = []
        while piece := await req.body.read():
            parts.append(piece)
        body = b"%s %s %s" % (req.method, req.target, b"".join(parts))
        req.conn.write(http1.simple_response(200, body, keep_alive=req.keep_alive))

    registry: set = set()
    srv = await server.serve(
        handler, "127.0.0.1", 0, limits=http1.Limits(max_url=256, max_header_bytes=1024, max_headers=10),
        timeouts=server.Timeouts(header=0.5, idle=2), registry=registry,
    )
    yield srv.sockets[0].getsockname()[1]
    srv.close()
    for conn in list(registry):
        conn.close()


async def exchange(port: int, raw: bytes, timeout: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        async with asyncio.timeout(timeout):
            return await reader.read(-1)  # until the server closes
    finally:
        writer.close()


def statuses(data: bytes) -> list[int]:
    # Bodies here have no line end, so a status line may follow one directly.
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


async def test_pipelined_requests_answered_in_order(echo):
    raw = (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
           b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
           b"GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = await exchange(echo, raw)
    assert statuses(out) == [200, 200, 200, 200]
    assert out.index(b"GET /a ") < out.index(b"POST /b abc") < out.index(b"POST /c hi") < out.index(b"GET /d ")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: app.org.kubefly.localhost:abc\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: app.org.kubefly.localhost:99999\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: app.org.kubefly.localhost:80:80\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: app/../org\r\n\r\n", 400),
    ],
)
async def test_malformed_requests_refused_and_closed(echo, raw, status):
    out = await exchange(echo, raw)
    assert statuses(out) == [status]
    assert b"connection: close" in out


async def test_an_endless_header_value_is_refused_while_it_arrives_not_buffered_whole(echo):
    """httptools holds a header value until its line ends: a client that never ends it (or sends
    16 MiB of it) is refused once the head's raw bytes pass the limits, in whatever pieces they come."""
    reader, writer = await asyncio.open_connection("127.0.0.1", echo)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        async with asyncio.timeout(5):
            while not reader.at_eof() and sent < 1 << 20:
                writer.write(b"a" * 512)
                await writer.drain()
                sent += 512
                await asyncio.sleep(0.001)
                if reader._buffer:  # the answer came
                    break
            out = await reader.read(-1)
    except (ConnectionResetError, BrokenPipeError):
        out = bytes(reader._buffer)
    finally:
        writer.close()
    assert statuses(out) == [431] and sent < 8 * 1024, (sent, out[:80])


async def test_pipelined_body_in_the_same_chunk_as_the_next_head_is_not_counted_as_head(echo):
    body = b"b" * 4000  # longer than the fixture's head limits
    raw = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body +
           b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(await exchange(echo, raw)) == [200, 200]


async def test_slow_headers_time_out_with_408(echo):
    out = await exchange(echo, b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert statuses(out) == [408]


async def test_idle_keepalive_connection_is_closed(echo):
    reader, writer = await asyncio.open_connection("127.0.0.1", echo)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        data = await reader.read(-1)  # the idle timeout (2 s) closes it
    writer.close()
    assert statuses(data) == [200]
