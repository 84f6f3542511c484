"""The upstream side: pooled HTTP/1.1 keep-alive connections to instances and peer proxies.

A response body is not buffered: the parser's body callback hands each piece
to a sink that writes straight to the client, and reading from the instance
pauses while the client's socket buffer is full.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httptools

from kubefly.proxy import http1


class UpstreamError(Exception):
    """The exchange failed; `sent` tells whether the instance may have seen the request."""

    def __init__(self, reason: str, *, sent: bool):
        super().__init__(reason)
        self.sent = sent


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamConn(asyncio.Protocol):
    def __init__(self, pool: Pool, key: tuple[str, int]):
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()  # held: looking it up costs a getpid() on Python 3.11
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.reusable = True
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future | None = None
        self._done: asyncio.Future | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_only = False
        self._skip = False  # an informational (1xx) response the proxy does not forward
        self._until_close = False
        self._got_bytes = False
        self.sink: Callable[[bytes], None] | None = None
        self.tunnel: Callable[[bytes], None] | None = None
        self.tunnel_eof: Callable[[], None] | None = None
        self.tunnel_head = b""
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle = 0.0
        self._idle_after_head = 0.0
        self._last = 0.0
        self._writable: asyncio.Future | None = None
        self._early: list[bytes] = []

    # -- transport ------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def pause_writing(self):
        self._writable = self.loop.create_future()

    def resume_writing(self):
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    async def drain(self) -> None:
        """Wait while the instance is not reading the request body fast enough."""
        if self._writable is not None:
            await self._writable
        if self.closed:
            raise UpstreamError("connection closed while sending the body", sent=True)

    def connection_lost(self, exc):
        self.closed = True
        self._stop_idle()
        self.resume_writing()
        self.pool.forget(self)
        if self.tunnel_eof is not None:
            self.tunnel_eof()
            return
        # The exchange may have been abandoned (its client went away), so nobody awaits
        # these futures: exception() marks them retrieved, keeping asyncio quiet.
        if self._head is not None and not self._head.done():
            self._head.set_exception(UpstreamError("connection closed before response", sent=self._got_bytes or not self.reused))
            self._head.exception()
        elif self._done is not None and not self._done.done():
            if self._until_close:
                self._done.set_result(None)
            else:
                self._done.set_exception(UpstreamError("connection closed mid-response", sent=True))
                self._done.exception()

    def data_received(self, data: bytes):
        self._last = time.monotonic()
        if self.tunnel is not None:
            self.tunnel(data)
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.tunnel_head = data[exc.args[0]:]
            self.transport.pause_reading()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"invalid response: {exc}", sent=True))

    def eof_received(self):
        if self.tunnel_eof is not None:
            self.tunnel_eof()
            return True
        return False

    # -- parser callbacks -------------------------------------------------------
    def on_message_begin(self):
        self._headers = []

    def on_header(self, name: bytes, value: bytes):
        self._headers.append((name.lower(), value))

    def on_headers_complete(self):
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._skip = True
            return
        self._idle = self._idle_after_head
        length, chunked = _response_framing(self._headers)
        self._until_close = not chunked and length is None and not http1.status_has_no_body(
            status, b"HEAD" if self._head_only else b"GET"
        )
        if not self._parser.should_keep_alive() or self._until_close:
            self.reusable = False
        if self._head is not None and not self._head.done():
            self._head.set_result((status, self._headers))
        if self._head_only and self._done is not None and not self._done.done():
            # httptools cannot be told that a HEAD response has no body, so the
            # exchange ends here and the connection is not reused.
            self.reusable = False
            self._done.set_result(None)

    def on_body(self, body: bytes):
        if self._head_only:
            return
        if self.sink is not None:
            self.sink(body)
        else:
            # Body bytes that came in the same read as the head, before the
            # proxy had a look at the head and set the sink.
            self._early.append(body)

    def set_sink(self, sink: Callable[[bytes], None]) -> None:
        early, self._early = self._early, []
        for piece in early:
            sink(piece)
        self.sink = sink

    def on_message_complete(self):
        if self._skip:
            self._skip = False
            return
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # -- exchange ---------------------------------------------------------------
    def begin(self, head_only: bool, idle: float, response_timeout: float) -> None:
        """Start an exchange: the head must come within response_timeout, then no silence longer than idle."""
        loop = self.loop
        self._head = loop.create_future()
        self._done = loop.create_future()
        self._head_only = head_only
        self._got_bytes = False
        self._until_close = False
        self.sink = None
        self._early = []
        self._idle = response_timeout
        self._idle_after_head = idle
        self._last = time.monotonic()
        if self._idle_timer is None:
            self._idle_timer = loop.call_later(response_timeout, self._check_idle)

    def write(self, data: bytes) -> None:
        if self.closed:
            raise UpstreamError("connection closed", sent=not self.reused)
        self.transport.write(data)

    def write_raw(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        return await self._head

    async def done(self) -> None:
        await self._done

    def early_body(self) -> bytes:
        """Body bytes already read with the head (often the whole body): sent with the head in one write."""
        early, self._early = self._early, []
        return b"".join(early)

    @property
    def finished(self) -> bool:
        return self._done is not None and self._done.done() and self._done.exception() is None

    def _check_idle(self):
        self._idle_timer = None
        if self._done is None or self._done.done() or self.tunnel is not None:
            return  # between exchanges; the pool's own idle limit applies
        remaining = self._last + self._idle - time.monotonic()
        if remaining > 0:
            self._idle_timer = self.loop.call_later(remaining, self._check_idle)
            return
        self._fail(UpstreamTimeout("instance timed out", sent=True))

    def _stop_idle(self):
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _fail(self, exc: UpstreamError) -> None:
        self.reusable = False
        for fut in (self._head, self._done):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                # The other future may never be awaited; keep asyncio quiet about it.
                fut.exception()
        self.close()

    def pause(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def start_tunnel(self, sink: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        self._stop_idle()
        self.tunnel = sink
        self.tunnel_eof = on_eof
        self.reusable = False
        if self.tunnel_head:
            sink(self.tunnel_head)
            self.tunnel_head = b""
        self.transport.resume_reading()


def _response_framing(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    length = None
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
    return (None if chunked else length), chunked


class Pool:
    """Idle keep-alive connections per (address, port); newest reused first."""

    def __init__(self, *, connect_timeout: float = 3.0, idle_timeout: float = 4.0, max_idle: int = 256):
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[UpstreamConn]] = {}
        self._stamps: dict[UpstreamConn, float] = {}
        self._reaper: asyncio.Task | None = None

    def idle_conn(self, key: tuple[str, int]) -> UpstreamConn | None:
        """A pooled connection to key, newest first; None if there is none."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            self._stamps.pop(conn, None)
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def connect(self, host: str, port: int) -> UpstreamConn:
        key = (host, port)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: UpstreamConn(self, key), host, port)
        except TimeoutError:
            raise UpstreamError(f"connect to {host}:{port} timed out", sent=False) from None
        except OSError as exc:
            raise UpstreamError(f"connect to {host}:{port}: {exc.strerror or exc}", sent=False) from None
        return conn

    def release(self, conn: UpstreamConn) -> None:
        if conn.closed or not conn.reusable:
            conn.close()
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.sink = None
        idle.append(conn)
        self._stamps[conn] = time.monotonic()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def forget(self, conn: UpstreamConn) -> None:
        if self._stamps.pop(conn, None) is not None:
            idle = self._idle.get(conn.key)
            if idle and conn in idle:
                idle.remove(conn)

    async def _reap(self) -> None:
        # Close connections idle longer than the pool's timeout: instances may
        # scale down, and an instance's own keep-alive timeout may be shorter.
        while self._stamps:
            await asyncio.sleep(self.idle_timeout / 2)
            cutoff = time.monotonic() - self.idle_timeout
            for conn, stamp in list(self._stamps.items()):
                if stamp < cutoff:
                    self.forget(conn)
                    conn.close()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._stamps.clear()
        if self._reaper is not None:
            self._reaper.cancel()
