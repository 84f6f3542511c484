from __future__ import annotations

import asyncio
import base64
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubefly.gossip import hlc, wire

KEYS = wire.Keys.from_secret(b"a-cluster-key-of-enough-length")
OTHER = wire.Keys.from_secret(b"another-cluster-key-entirely!!")


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_hlc_is_monotonic_when_the_wall_clock_goes_back():
    clock = FakeClock(1000.0)
    c = hlc.HLC(clock=clock)
    a = c.now()
    clock.t = 990.0
    b = c.now()
    assert b > a and hlc.wall_ms(b) == 1_000_000


def test_hlc_moves_past_observed_timestamps_and_refuses_drift():
    clock = FakeClock(1000.0)
    c = hlc.HLC(clock=clock)
    remote = hlc.pack(1_000_500, 7)
    c.observe(remote)
    assert c.now() > remote
    with pytest.raises(hlc.ClockDrift):
        c.observe(hlc.pack(1_000_000 + hlc.MAX_DRIFT_MS + 1000))


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=50))
def test_hlc_never_repeats(times):
    clock = FakeClock(0.0)
    c = hlc.HLC(clock=clock)
    seen = []
    for t in times:
        clock.t = t
        seen.append(c.now())
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_keys_need_a_real_secret():
    with pytest.raises(ValueError):
        wire.Keys.from_secret(b"short")


def test_datagram_roundtrip_and_tamper():
    data = wire.encode_dgram(KEYS, {"t": "ping", "f": "h1", "seq": 3})
    assert wire.decode_dgram(KEYS, data)["seq"] == 3
    with pytest.raises(wire.WireError) as e:
        wire.decode_dgram(OTHER, data)
    assert e.value.reason == "bad_mac"
    flipped = data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]
    with pytest.raises(wire.WireError):
        wire.decode_dgram(KEYS, flipped)
    with pytest.raises(wire.WireError) as e:
        wire.decode_dgram(KEYS, data, now=time.time() + 3600)
    assert e.value.reason == "stale"


@given(st.binary(max_size=300))
def test_random_bytes_never_decode(data):
    with pytest.raises(wire.WireError):
        wire.decode_dgram(KEYS, data)


def test_record_sign_verify_and_tamper():
    rec = wire.sign_record(KEYS, "h1", 42, ("acme", "m1"), {"x": 1})
    got = wire.verify_record(KEYS, rec.wire)
    assert (got.origin, got.hlc, got.key, got.row) == ("h1", 42, ("acme", "m1"), {"x": 1})
    with pytest.raises(wire.WireError):
        wire.verify_record(KEYS, [rec.body.replace('"h1"', '"h2"'), rec.mac])
    with pytest.raises(wire.WireError):
        wire.verify_record(OTHER, rec.wire)
    # a record is not a datagram: per-purpose keys keep one from passing as the other
    with pytest.raises(wire.WireError):
        wire.decode_dgram(KEYS, b"KF1" + __import__("base64").b64decode(rec.mac) + rec.body.encode())


@pytest.mark.parametrize("bad", [None, [], ["a"], ["{}", "!!"], [1, 2], ["{\"o\":1}", "AAAA"]])
def test_malformed_records(bad):
    with pytest.raises(wire.WireError):
        wire.verify_record(KEYS, bad)


def test_pair_hash_depends_on_key_and_version():
    assert wire.pair_hash(("o", "m1"), 1) != wire.pair_hash(("o", "m1"), 2)
    assert wire.pair_hash(("o", "m1"), 1) != wire.pair_hash(("o1", "m"), 1)


async def test_frames_roundtrip_and_reject_bad_mac():
    reader = asyncio.StreamReader()

    class Sink:
        def __init__(self):
            self.buf = b""

        def write(self, d):
            self.buf += d

        async def drain(self):
            pass

    sink = Sink()
    await wire.write_frame(KEYS, sink, {"t": "sync", "f": "h1"})
    reader.feed_data(sink.buf)
    msg, n = await wire.read_frame(KEYS, reader)
    assert msg["f"] == "h1" and n == len(sink.buf)
    reader2 = asyncio.StreamReader()
    reader2.feed_data(sink.buf)
    with pytest.raises(wire.WireError):
        await wire.read_frame(OTHER, reader2)


async def test_a_deeply_nested_document_is_malformed_not_a_recursion_error():
    """A key holder's frame, datagram or record nested past Python's recursion limit is refused
    like any malformed input (it used to raise RecursionError out of the sync loop, ending it)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    reader = asyncio.StreamReader()
    reader.feed_data(wire._LEN.pack(len(deep)) + wire._mac(KEYS.frame, deep) + deep)
    with pytest.raises(wire.WireError) as frame:
        await wire.read_frame(KEYS, reader)
    assert frame.value.reason == "malformed"
    with pytest.raises(wire.WireError) as dgram:
        wire.decode_dgram(KEYS, wire.MAGIC + wire._mac(KEYS.dgram, deep) + deep)
    assert dgram.value.reason == "malformed"
    body = deep.decode()
    with pytest.raises(wire.WireError) as record:
        wire.verify_record(KEYS, [body, base64.b64encode(wire._mac(KEYS.record, deep)).decode()])
    assert record.value.reason == "malformed"


async def test_a_frame_over_the_limit_is_refused_before_its_body_is_read():
    """A sync server reads a caller's first frame with the small hello limit: a 16 MiB length from
    someone without the key costs the length prefix, not 16 MiB of buffer."""
    reader = asyncio.StreamReader()
    reader.feed_data(wire._LEN.pack(wire.HELLO_FRAME + 1) + b"\0" * wire.MAC_LEN)  # and no body at all
    with pytest.raises(wire.WireError) as refused:
        await asyncio.wait_for(wire.read_frame(KEYS, reader, wire.HELLO_FRAME), 2)
    assert refused.value.reason == "too_large"
