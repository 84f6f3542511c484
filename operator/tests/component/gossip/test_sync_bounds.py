"""The anti-entropy port under a caller without the key: bounded connections, bounded first frame."""

from __future__ import annotations

import asyncio

import pytest

from kubefly.gossip import agent as agentmod
from kubefly.gossip import wire
from kubefly.gossip.harness import free_port
from test_restart_without_state import agent

pytestmark = pytest.mark.component


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except ConnectionResetError:  # closed with our bytes unread
        return True
    except asyncio.TimeoutError:
        return False


async def test_connections_past_the_cap_are_closed_at_once_and_a_huge_frame_is_never_buffered():
    port = free_port()
    a = agent("solo", port, [])
    await a.start()
    conns = []
    try:
        for _ in range(agentmod.MAX_SYNC_CONNS + 8):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.2)
        closed = await asyncio.gather(*(_closed_within(r, 1.0) for r, _ in conns))
        # The first MAX_SYNC_CONNS wait for a frame (5 s); the rest were turned away.
        assert sum(closed) == 8, closed
        for _, w in conns:
            w.close()
        await asyncio.sleep(0.5)  # the served ones see EOF and end
        # A frame announcing 16 MiB from someone without the key: refused on its length alone.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(wire._LEN.pack(wire.MAX_FRAME) + b"\0" * wire.MAC_LEN)
        await w.drain()
        assert await _closed_within(r, 2.0)
        w.close()
        assert agentmod.REJECTED.labels("too_large")._value.get() >= 1
        assert agentmod.REJECTED.labels("sync_conns")._value.get() >= 8
    finally:
        for _, w in conns:
            w.close()
        await a.stop()
