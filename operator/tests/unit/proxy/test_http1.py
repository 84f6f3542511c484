"""Header rules: framing, hop-by-hop, Host -> app, replay directives."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kubefly.proxy import http1
from kubefly.proxy.proxy import parse_replay, resolve_app


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], (None, False)),
        ([(b"content-length", b"12")], (12, False)),
        ([(b"transfer-encoding", b"chunked")], (None, True)),
        ([(b"transfer-encoding", b" Chunked ")], (None, True)),
    ],
)
def test_framing_accepted(headers, expected):
    assert http1.check_framing(headers) == expected


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], 400),
        ([(b"transfer-encoding", b"chunked"), (b"content-length", b"3")], 400),
        ([(b"content-length", b"3"), (b"content-length", b"3")], 400),
        ([(b"content-length", b"-1")], 400),
        ([(b"content-length", b"1e3")], 400),
        ([(b"transfer-encoding", b"gzip, chunked")], 501),
        ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], 501),
        ([(b"transfer-encoding", b"identity")], 501),
    ],
)
def test_smuggling_shapes_refused(headers, status):
    with pytest.raises(http1.BadRequest) as err:
        http1.check_framing(headers)
    assert err.value.status == status


def test_hop_by_hop_and_internal_headers_dropped():
    headers = [
        (b"connection", b"keep-alive, x-secret"),
        (b"x-secret", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"basic x"),
        (b"kubefly-instance", b"o/m"),
        (b"kubefly-full", b"1"),
        (b"content-length", b"4"),
        (b"accept", b"*/*"),
        (b"x-app", b"kept"),
    ]
    assert http1.end_to_end(headers) == [(b"accept", b"*/*"), (b"x-app", b"kept")]


APPS = {"web": {"acme"}, "shared": {"acme", "globex"}}


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"web.fly.test", ("acme", "web")),
        (b"WEB.Fly.Test:8080", ("acme", "web")),
        (b"web.acme.fly.test", ("acme", "web")),
        (b"shared.globex.fly.test", ("globex", "shared")),
        (b"shared.fly.test", None),  # two orgs: ambiguous, never guessed
        (b"web.globex.fly.test", None),  # that org has no such app
        (b"nope.fly.test", None),
        (b"web.example.com", None),  # not under the platform domain: never an open proxy
        (b"fly.test", None),
        (b"[::1]:8080", None),
        (None, None),
    ],
)
def test_host_to_app(host, expected):
    got, reason = resolve_app(host, "fly.test", APPS)
    assert got == expected
    assert (reason == "") == (expected is not None)


def test_ambiguous_reason_names_the_way_out():
    _, reason = resolve_app(b"shared.fly.test", "fly.test", APPS)
    assert "shared.<org>.fly.test" in reason


def test_replay_directives():
    r = parse_replay(b"region=syd,iad;elsewhere=true")
    assert (r.region, r.instance, r.elsewhere) == ("syd", None, True)
    r = parse_replay(b"instance=m42")
    assert (r.region, r.instance, r.elsewhere) == (None, "m42", False)
    assert parse_replay(b"state=foo") is None
    assert parse_replay(b"") is None


def test_simple_response_is_well_framed():
    raw = http1.simple_response(503, b"full\n", keep_alive=False, extra=[(b"kubefly-full", b"1")])
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"content-length: 5" in head and b"connection: close" in head and b"kubefly-full: 1" in head
    assert body == b"full\n"


@pytest.mark.parametrize("host", [b"app.org.kubefly.localhost", b"app.org.kubefly.localhost:8080", b"x:1", b"x:65535",
                                  b"x:", b"10.0.0.1:80", b"[::1]:8080", b"[fe80::1]", b""])
def test_host_header_accepted(host):
    http1.check_host(host)


@pytest.mark.parametrize("host", [b"app.org.kubefly.localhost:abc", b"x:0", b"x:65536", b"x:000080000", b"x:8080:1",
                                  b"[::1]:x", b"[::1", b"a b", b"a/b", b"a@b", b"::1"])
def test_host_header_with_a_bad_port_or_name_is_refused(host):
    with pytest.raises(http1.BadRequest) as err:
        http1.check_host(host)
    assert err.value.status == 400


@given(st.binary(max_size=40))
@example(b"a:" + b"9" * 30)
def test_check_host_accepts_only_a_name_and_a_port_in_range(host):
    try:
        http1.check_host(host)
    except http1.BadRequest as exc:
        assert exc.status == 400
    else:
        name, colon, port = host.strip(b" \t").rpartition(b":") if b"]" not in host else (b"", b"", b"")
        if colon and port and b"[" not in name:
            assert port.isdigit() and 1 <= int(port) <= 65535
