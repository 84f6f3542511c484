"""Rendering of the member's configuration files and repmgr command lines."""

from pathlib import Path

import pytest

from kubefly.postgres import repmgr as rm
from kubefly.postgres.repmgr import Layout, MemberSpec, Peer


def spec(**kw):
    args = dict(
        name="b", node_id=2, region="ams", host="10.0.0.2", pg_port=5433, health_port=5500,
        layout=Layout(Path("/data")),
        peers=(Peer("a", "10.0.0.1", 5432, 5500), Peer("c", "10.0.0.3", 5432, 5500)),
    )
    args.update(kw)
    return MemberSpec(**args)


def conf_map(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def test_peer_parse():
    assert Peer.parse("a=10.0.0.1:5432:5500") == Peer("a", "10.0.0.1", 5432, 5500)
    assert Peer.parse("a=[fd00::1]:5432:5500") == Peer("a", "fd00::1", 5432, 5500)
    with pytest.raises(ValueError):
        Peer.parse("10.0.0.1:5432:5500")


def test_repmgr_conf_fast_automatic_failover_with_consensus():
    c = conf_map(rm.render_repmgr_conf(spec(), "http://127.0.0.1:5500"))
    assert c["node_id"] == "2" and c["node_name"] == "'b'"
    assert c["location"] == "'ams'"
    assert c["failover"] == "'automatic'"
    assert c["primary_visibility_consensus"] == "true"
    assert c["monitor_interval_secs"] == "1"
    assert int(c["reconnect_attempts"]) * int(c["reconnect_interval"]) <= 3
    # A standby's election starts only once every sibling's last sight of a dead primary is
    # outside repmgr's visibility window (2 x monitor interval): else it cancels for good.
    assert (int(c["reconnect_attempts"]) - 1) * int(c["reconnect_interval"]) >= 2 * int(c["monitor_interval_secs"])
    assert "standby promote" in c["promote_command"]
    assert "--upstream-node-id=%n" in c["follow_command"]
    assert c["service_start_command"] == "'curl -fsS -X POST --max-time 120 http://127.0.0.1:5500/ctl/start'"
    assert c["conninfo"] == "'host=10.0.0.2 port=5433 user=repmgr dbname=repmgr connect_timeout=2'"


def test_no_password_in_rendered_config():
    text = rm.render_repmgr_conf(spec(), "http://x") + rm.render_postgresql_conf(spec())
    assert "password" not in text.replace("password_encryption", "")


def test_postgresql_conf_synchronous_any_one():
    c = conf_map(rm.render_postgresql_conf(spec(synchronous=True)))
    assert c["synchronous_standby_names"] == """'ANY 1 ("a", "b", "c")'"""
    assert c["synchronous_commit"] == "on"
    assert c["wal_log_hints"] == "on"
    assert c["port"] == "5433"
    async_conf = conf_map(rm.render_postgresql_conf(spec()))
    assert async_conf["synchronous_standby_names"] == "''"


def test_quoting_in_conf_values():
    c = conf_map(rm.render_repmgr_conf(spec(region="it's"), "http://x"))
    assert c["location"] == "'it''s'"


def test_pgpass_escapes_separators():
    text = rm.render_pgpass("p:w\\d", "s")
    assert text.splitlines()[0] == "*:*:*:repmgr:p\\:w\\\\d"


def test_rejoin_keeps_member_config_and_rewinds():
    argv = rm.rejoin_argv(spec(), Peer("a", "10.0.0.1", 5432, 5500))
    assert argv[:3] == ["/usr/lib/postgresql/15/bin/repmgr", "-f", "/data/repmgr.conf"]
    assert "--force-rewind" in argv
    assert "--config-files=postgresql.conf,pg_hba.conf" in argv
    assert "host=10.0.0.1 port=5432 user=repmgr dbname=repmgr connect_timeout=2" in argv


def test_clone_from_source():
    argv = rm.clone_argv(spec(), Peer("a", "10.0.0.1", 5432, 5500))
    assert argv[argv.index("-h") + 1] == "10.0.0.1"
    assert argv[-3:] == ["clone", "--fast-checkpoint", "--force"]
