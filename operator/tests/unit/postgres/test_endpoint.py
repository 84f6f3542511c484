"""The primary endpoint's health polling: a refused health port marks the member gone, a timeout does not."""

import socket
import time

import aiohttp

from kubefly.postgres import decide
from kubefly.postgres.endpoint import Endpoint, Target
from kubefly.ports import free_port


def writable_view(seen_at: float) -> decide.View:
    return decide.View(decide.Report("a", decide.PRIMARY, writable=True, timeline=1), seen_at)


async def test_a_refused_health_port_marks_the_silent_primary_gone():
    target = Target.parse(f"a=127.0.0.1:5432:{free_port()}")  # nothing listens there
    ep = Endpoint([target])
    ep.views["a"] = writable_view(time.monotonic())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        await ep._poll(http, target)
    assert ep.views["a"].gone and ep.views["a"].report.writable


async def test_a_health_port_that_does_not_answer_proves_nothing():
    # A listening socket that never accepts into HTTP: the poll times out, like a partition.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        target = Target.parse(f"a=127.0.0.1:5432:{sock.getsockname()[1]}")
        ep = Endpoint([target])
        ep.views["a"] = writable_view(time.monotonic())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as http:
            await ep._poll(http, target)
    assert not ep.views["a"].gone
