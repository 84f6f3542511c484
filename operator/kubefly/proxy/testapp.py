"""A small app to route to in tests and benchmarks: `python -m kubefly.proxy.testapp`.

It says which machine answered and can be made slow, crash, or answer "full".
`--workers N --service-ms S` model an app with N workers that each need S ms
per request (its real capacity); requests beyond N wait for a worker, as in a
thread-pool server. It uses the proxy's own HTTP/1.1 connection code so it is
fast enough not to be the bottleneck of a benchmark.

Paths: /            machine id
       /headers     the request headers as JSON
       /echo        the request body back
       /slow?ms=N   answer after N ms
       /stream?n=N  N chunks of a chunked response
       /full        503 + kubefly-full (an app shedding load itself); ?except=ID: not on ID
       /replay?to=D answer `fly-replay: D` unless this is already a replay
       /crash       exit at once
       /ws          WebSocket echo

A stop signal (SIGINT, SIGTERM, SIGQUIT, SIGUSR1, SIGUSR2) ends it at once,
saying which one on stdout and in its termination message (/dev/termination-log),
so a test can tell which signal a machine's stop sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import struct
from urllib.parse import parse_qs, urlsplit

from kubefly.proxy import http1, server

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class App:
    def __init__(self, machine_id: str, workers: int, service_ms: float):
        self.machine_id = machine_id.encode()
        self.workers = asyncio.Semaphore(workers) if workers > 0 else None
        self.service = service_ms / 1000
        self.inflight = 0
        self.peak = 0

    async def handle(self, req: server.Request) -> None:
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            if self.workers is not None:
                async with self.workers:
                    if self.service:
                        await asyncio.sleep(self.service)
                    await self._route(req)
            else:
                if self.service:
                    await asyncio.sleep(self.service)
                await self._route(req)
        finally:
            self.inflight -= 1

    async def _route(self, req: server.Request) -> None:
        url = urlsplit(req.target.decode("latin-1"))
        query = parse_qs(url.query)
        path = url.path
        extra = [(b"x-machine-id", self.machine_id)]
        if path == "/ws" and req.upgrade:
            return self._websocket(req)
        if path == "/crash":
            os._exit(3)
        if path == "/full" and query.get("except", [""])[0].encode() != self.machine_id:
            req.conn.write(http1.simple_response(503, b"full\n", keep_alive=True, extra=[(http1.H_FULL, b"1"), *extra]))
            return
        if path == "/replay" and req.header(b"fly-replay-src") is None:
            to = query.get("to", ["elsewhere=true"])[0].encode()
            req.conn.write(http1.simple_response(200, b"replay\n", keep_alive=req.keep_alive, extra=[(b"fly-replay", to), *extra]))
            return
        if path == "/slow":
            await asyncio.sleep(int(query.get("ms", ["100"])[0]) / 1000)
        if path == "/headers":
            body = json.dumps([[n.decode(), v.decode("latin-1")] for n, v in req.headers]).encode()
            req.conn.write(http1.simple_response(200, body, keep_alive=req.keep_alive, content_type=b"application/json", extra=extra))
            return
        if path == "/echo":
            parts = []
            while piece := await req.body.read():
                parts.append(piece)
            req.conn.write(http1.simple_response(200, b"".join(parts), keep_alive=req.keep_alive, extra=extra))
            return
        if path == "/stream":
            n = int(query.get("n", ["3"])[0])
            req.conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-machine-id: %s\r\n\r\n" % self.machine_id)
            for i in range(n):
                req.conn.write(http1.chunk(b"chunk %d\n" % i))
                await req.conn.drain()
                await asyncio.sleep(0.01)
            req.conn.write(http1.LAST_CHUNK)
            return
        req.conn.write(http1.simple_response(200, self.machine_id + b"\n", keep_alive=req.keep_alive, extra=extra))

    def _websocket(self, req: server.Request) -> None:
        key = req.header(b"sec-websocket-key") or b""
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        req.conn.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: %s\r\n\r\n" % accept
        )
        conn = req.conn
        buf = bytearray()

        def on_data(data: bytes) -> None:
            buf.extend(data)
            while (frame := _take_frame(buf)) is not None:
                opcode, payload = frame
                conn.write(_frame(opcode, payload))
                if opcode == 8:
                    conn.close()
                    return

        conn.start_tunnel(on_data, conn.close)


def _take_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """One complete client frame (masked, as RFC 6455 requires) off the front of buf."""
    if len(buf) < 2:
        return None
    opcode = buf[0] & 0x0F
    masked = buf[1] & 0x80
    length = buf[1] & 0x7F
    pos = 2
    if length == 126:
        if len(buf) < 4:
            return None
        length = struct.unpack_from("!H", buf, 2)[0]
        pos = 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length = struct.unpack_from("!Q", buf, 2)[0]
        pos = 10
    mask = b""
    if masked:
        mask = bytes(buf[pos : pos + 4])
        pos += 4
    if len(buf) < pos + length:
        return None
    payload = bytes(buf[pos : pos + length])
    if masked:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    del buf[: pos + length]
    return opcode, payload


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
TERMINATION_LOG = "/dev/termination-log"  # the kubelet's default terminationMessagePath


def _stopped_by(sig: signal.Signals) -> None:
    line = f"testapp: received {sig.name}, exiting"
    print(line, flush=True)
    # Only into the file the kubelet mounted: outside a pod, creating it in /dev would litter the host.
    try:
        with open(TERMINATION_LOG, "r+") as f:
            f.truncate()
            f.write(line)
    except OSError:
        pass  # not in a pod
    # At once, without draining: a server closing waits for idle keep-alive connections.
    os._exit(0)


async def _main(args) -> None:
    app = App(args.machine_id, args.workers, args.service_ms)
    srv = await server.serve(
        app.handle, args.host, args.port, limits=http1.Limits(), timeouts=server.Timeouts(), registry=set()
    )
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, _stopped_by, sig)
    async with srv:
        await srv.serve_forever()


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--machine-id", default=os.environ.get("FLY_MACHINE_ID", "testapp"))
    parser.add_argument("--workers", type=int, default=0, help="concurrent requests served (0: unlimited)")
    parser.add_argument("--service-ms", type=float, default=0.0, help="time a request holds a worker")
    uvloop.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
