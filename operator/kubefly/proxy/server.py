"""The downstream side: an asyncio protocol per client connection, parsed by httptools.

Parser callbacks only collect; one handler task per connection serves the
parsed requests in order (pipelining keeps its order), so a slow request
never blocks other connections. Bodies stream through a small buffer with
flow control: the socket stops being read when the buffer is full.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from kubefly.proxy import http1

BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024
MAX_PIPELINED = 16
# A head's raw bytes beyond its URL and header limits: line ends, the method, the version.
HEAD_SLACK = 1024


class Body:
    """The request body as it arrives; read() yields b"" at its end."""

    __slots__ = ("_conn", "_chunks", "_buffered", "_waiter", "done", "length", "chunked", "received")

    def __init__(self, conn: Connection | None, length: int | None, chunked: bool):
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self.done = conn is None or (not chunked and not length)
        self.length = length
        self.chunked = chunked
        self.received = 0

    @property
    def empty(self) -> bool:
        return not self.chunked and not self.length

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.received += len(data)
        if self._buffered > BODY_HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        while not self._chunks:
            if self.done:
                return b""
            if self._conn is not None and self._conn.closed:
                raise ConnectionError("client went away mid-body")
            self._waiter = (self._conn.loop if self._conn is not None else asyncio.get_running_loop()).create_future()
            await self._waiter
            self._waiter = None
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._buffered < BODY_LOW_WATER and self._conn is not None:
            self._conn.resume_reading()
        return data

    async def read_upto(self, limit: int) -> tuple[bytes, bool]:
        """Read up to `limit` bytes; True if that was the whole body (it can be replayed)."""
        parts = []
        size = 0
        while size <= limit:
            data = await self.read()
            if not data:
                return b"".join(parts), True
            parts.append(data)
            size += len(data)
        # Too large to replay: put what was read back in front, the rest streams.
        self._chunks.extendleft(reversed(parts))
        self._buffered += size
        return b"", False

    def abort(self) -> None:
        self._wake()


# Most requests have no body: they share this one (already done, never fed).
EMPTY_BODY = Body(None, None, False)


class Request:
    __slots__ = ("method", "target", "version", "headers", "keep_alive", "upgrade", "body", "conn")

    def __init__(self, method, target, version, headers, keep_alive, upgrade, body, conn):
        self.method: bytes = method
        self.target: bytes = target
        self.version: str = version
        self.headers: list[tuple[bytes, bytes]] = headers  # names lower-cased
        self.keep_alive: bool = keep_alive
        self.upgrade: bool = upgrade
        self.body: Body = body
        self.conn: Connection = conn

    def header(self, name: bytes) -> bytes | None:
        return http1.get(self.headers, name)


Handler = Callable[[Request], Awaitable[None]]


class Timeouts:
    __slots__ = ("header", "idle")

    def __init__(self, header: float = 10.0, idle: float = 60.0):
        self.header = header
        self.idle = idle


class Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, handler: Handler, limits: http1.Limits, timeouts: Timeouts, registry: set):
        self.handler = handler
        self.limits = limits
        self.timeouts = timeouts
        self.registry = registry
        # Held, not looked up: asyncio.get_running_loop() costs a getpid() syscall on Python 3.11.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: str = ""
        self.closed = False
        self.draining = False
        self.busy = False
        self.busy_writing = False  # a response head went out: errors can no longer be answered
        self.local_port = b""
        self.tunnel: Callable[[bytes], None] | None = None
        self.tunnel_head = b""
        self.tunnel_eof: Callable[[], None] | None = None
        # Called once when a full write buffer drains (resumes a paused upstream).
        self.on_writable: Callable[[], None] | None = None
        # Instance slots this connection holds while it is open (concurrency type
        # "connections"): instance key -> what releases the slot.
        self.bindings: dict = {}
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task | None = None
        self._next: asyncio.Future | None = None
        self._current: Request | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        # Raw bytes of a head still being read: httptools holds a header value until its line
        # ends, so a client sending one endless value is stopped by this count, not on_header.
        self._head_raw = 0
        self._in_head = False
        self._heads_begun = 0
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._reading = True
        self._read_paused_by: set[str] = set()
        self._write_ok: asyncio.Event = asyncio.Event()
        self._write_ok.set()
        self._error: http1.BadRequest | None = None

    # -- transport callbacks ------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        sock = transport.get_extra_info("sockname")
        self.local_port = str(sock[1]).encode() if sock else b""
        self.registry.add(self)
        self._arm(self.timeouts.idle)

    def connection_lost(self, exc):
        self.closed = True
        self.registry.discard(self)
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
        self._write_ok.set()
        if self._current is not None:
            self._current.body.abort()
        if self.tunnel_eof is not None:
            self.tunnel_eof()
        while self.bindings:
            _, binding = self.bindings.popitem()
            binding.release()
        # A request still in progress is abandoned: nobody can read its answer, and
        # the instance's slot (and, at a host, the edge's hop) must not wait for it.
        if self._task is not None and not self._task.done() and self.tunnel is None:
            self._task.cancel()

    def pause_writing(self):
        self._write_ok.clear()

    def resume_writing(self):
        self._write_ok.set()
        if self.on_writable is not None:
            hook, self.on_writable = self.on_writable, None
            hook()

    def data_received(self, data: bytes):
        if self.tunnel is not None:
            self.tunnel(data)
            return
        begun = self._heads_begun
        try:
            self._parser.feed_data(data)
            if self._in_head:
                # A head that began in this chunk counts from the next one: where in the chunk it
                # began is unknown, and counting all of it could refuse a pipelined request.
                self._head_raw = self._head_raw + len(data) if begun == self._heads_begun else 0
                if self._head_raw > self.limits.max_url + self.limits.max_header_bytes + HEAD_SLACK:
                    raise http1.BadRequest(431, "request headers too large")
        except httptools.HttpParserUpgrade as exc:
            # Bytes after the upgrade request belong to the new protocol.
            self.tunnel_head = data[exc.args[0]:]
            self._pause("upgrade")
        except httptools.HttpParserError:
            self._refuse(self._error or http1.BadRequest(400, "malformed request"))
        except http1.BadRequest as exc:
            self._refuse(exc)

    def eof_received(self):
        if self.tunnel_eof is not None:
            self.tunnel_eof()
            return True  # half-close: the tunnel's other side finishes
        return False

    # -- parser callbacks ---------------------------------------------------
    def on_message_begin(self):
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._head_raw, self._in_head = 0, True
        self._heads_begun += 1
        self._arm(self.timeouts.header)

    def on_url(self, url: bytes):
        self._url += url
        if len(self._url) > self.limits.max_url:
            self._error = http1.BadRequest(414, "request target too long")
            raise self._error

    def on_header(self, name: bytes, value: bytes):
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.limits.max_header_bytes or len(self._headers) >= self.limits.max_headers:
            self._error = http1.BadRequest(431, "request headers too large")
            raise self._error
        self._headers.append((name.lower(), value))

    def on_headers_complete(self):
        self._in_head = False
        self._disarm()
        p = self._parser
        try:
            length, chunked = http1.check_framing(self._headers)
            hosts = [v for n, v in self._headers if n == b"host"]
            version = p.get_http_version()
            if len(hosts) > 1 or (version == "1.1" and not hosts):
                raise http1.BadRequest(400, "exactly one Host header is required")
            if hosts:
                http1.check_host(hosts[0])
        except http1.BadRequest as exc:
            self._error = exc
            raise
        body = Body(self, length, chunked) if chunked or length else EMPTY_BODY
        req = Request(
            p.get_method(), self._url, version, self._headers, p.should_keep_alive(), p.should_upgrade(), body, self
        )
        self._current = req
        self._url = b""
        self._header_bytes = 0
        self._queue.append(req)
        if len(self._queue) > MAX_PIPELINED:
            self._pause("pipeline")
        if self._next is not None:
            if not self._next.done():
                self._next.set_result(None)
        elif self._task is None or self._task.done():
            self._task = self.loop.create_task(self._serve())

    def on_body(self, body: bytes):
        if self._current is not None:
            self._current.body.feed(body)

    def on_message_complete(self):
        if self._current is not None:
            self._current.body.finish()
            self._current = None

    # -- serving -------------------------------------------------------------
    async def _serve(self):
        while self._queue and not self.closed:
            req = self._queue.popleft()
            if self._read_paused_by:
                self._resume("pipeline")
            self.busy = True
            self.busy_writing = False
            try:
                await self.handler(req)
            except Exception:
                # The handler logs its own failures; a broken request ends its connection.
                self.close()
                return
            finally:
                self.busy = False
            # The client may have gone away as the response finished: waiting for
            # its next request would leak this task.
            if self.tunnel is not None or self.closed:
                return
            if not req.keep_alive or self.draining or not req.body.done:
                self.close()
                return
            if not self._queue:
                self._arm(self.timeouts.idle)
                # Keep this task for the next request on the connection: cheaper than a new task each time.
                self._next = self.loop.create_future()
                try:
                    await self._next
                finally:
                    self._next = None

    def _refuse(self, exc: http1.BadRequest):
        if self.closed:
            return
        # Answer only if nothing is being answered on this connection already.
        if not self.busy and not self._queue:
            self.write(http1.simple_response(exc.status, (exc.reason + "\n").encode(), keep_alive=False))
        self.close()

    # -- helpers for handlers -------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if not self._write_ok.is_set():
            await self._write_ok.wait()
        if self.closed:
            raise ConnectionError("client went away")

    @property
    def write_paused(self) -> bool:
        return not self._write_ok.is_set()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def pause_reading(self) -> None:
        self._pause("body")

    def resume_reading(self) -> None:
        self._resume("body")

    def _pause(self, why: str) -> None:
        self._read_paused_by.add(why)
        if self._reading and self.transport is not None and not self.closed:
            self._reading = False
            self.transport.pause_reading()

    def _resume(self, why: str) -> None:
        self._read_paused_by.discard(why)
        if not self._read_paused_by and not self._reading and not self.closed:
            self._reading = True
            self.transport.resume_reading()

    def start_tunnel(self, sink: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        """Switch to raw bytes (after a 101): everything read goes to `sink`."""
        self.tunnel = sink
        self.tunnel_eof = on_eof
        self._disarm()
        if self.tunnel_head:
            sink(self.tunnel_head)
            self.tunnel_head = b""
        self._resume("upgrade")

    def drain_idle(self) -> None:
        """Graceful shutdown: idle connections close now, busy ones after their response."""
        self.draining = True
        if not self.busy and not self._queue and self.tunnel is None:
            self.close()

    # One timer per connection, re-armed lazily: moving a deadline costs a
    # float store, not a new timer handle per request.
    def _arm(self, delay: float) -> None:
        loop = self.loop
        self._deadline = loop.time() + delay
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._expire)

    def _disarm(self) -> None:
        self._deadline = None

    def _expire(self) -> None:
        self._timer = None
        if self._deadline is None or self.closed:
            return
        loop = self.loop
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._expire)
            return
        if self.busy or self.tunnel is not None:
            return
        if self._header_bytes or self._url:
            self._refuse(http1.BadRequest(408, "request headers not received in time"))
        else:
            self.close()


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: http1.Limits,
    timeouts: Timeouts,
    registry: set,
    backlog: int = 2048,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    # reuse_port lets a new proxy process bind while the old one drains (graceful restart).
    return await loop.create_server(
        lambda: Connection(handler, limits, timeouts, registry),
        host,
        port,
        reuse_port=True,
        backlog=backlog,
    )
