"""`kubefly agent`: the per-host gossip agent (a DaemonSet in the chart)."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import click

from kubefly import logs


def _hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host.strip("[]") or default_host, int(port))


def _default_advertise(bind_ip: str) -> str:
    if bind_ip not in ("0.0.0.0", "::"):
        return bind_ip
    try:  # in a pod, the hostname resolves to the pod IP
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _node_region(node: str, give_up_after: float = 300.0) -> str:
    """The Node's region label. A host that boots reaches the API only once its kube-proxy
    is up: retried a few times a second rather than exiting, which would put the agent in
    the kubelet's crash-loop backoff (10 s, 20 s, ...) and keep the host's rows away."""
    import random
    import time

    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from kubefly import labels

    log = logs.get("kubefly.gossip.cli")
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    deadline = time.monotonic() + give_up_after
    while True:
        try:
            found = client.CoreV1Api().read_node(node, _request_timeout=10)
            break
        except ApiException as exc:
            if exc.status in (401, 403, 404):
                raise click.UsageError(f"cannot read node {node} ({exc.status} {exc.reason}): pass --region") from exc
            error = f"{exc.status} {exc.reason}"
        except Exception as exc:  # the API is not reachable (yet)
            error = str(exc)[:200]
        if time.monotonic() > deadline:
            raise click.UsageError(f"cannot read node {node} for its region ({error}): pass --region")
        log.warning("node not readable yet; retrying", node=node, error=error)
        time.sleep(random.uniform(0.1, 0.3))  # one small GET: a booting host's agent waits on nothing else
    region = (found.metadata.labels or {}).get(labels.NODE_REGION)
    if not region:
        raise click.UsageError(f"node {node} has no {labels.NODE_REGION} label: pass --region")
    return region


@click.command("agent")
@click.option("--host", "host", required=True, envvar="KUBEFLY_HOST", help="This host's name (the node name).")
@click.option("--region", default="", envvar="KUBEFLY_REGION",
              help="This host's region; default: the Node's topology.kubernetes.io/region label.")
@click.option("--gossip", "gossip", default="0.0.0.0:7946", show_default=True, help="UDP+TCP bind address:port.")
@click.option("--advertise", default="", envvar="KUBEFLY_ADVERTISE_IP", help="IP peers reach us on (default: bind IP).")
@click.option("--api", "api", default="127.0.0.1:7947", show_default=True, help="Local API address:port.")
@click.option("--members-api", default="", help="address:port serving GET /v1/members alone (the operator's view of host health); default: off.")
@click.option("--seed", "seeds", multiple=True,
              help="host:port of a peer to join through (repeatable; a name resolving to many agents works).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="SQLite state; none = memory only.")
@click.option("--key-file", default=None, envvar="KUBEFLY_GOSSIP_KEY_FILE", help="Cluster key (a mounted Secret).")
@click.option("--source", type=click.Choice(["pods", "dir"]), default="pods", show_default=True)
@click.option("--machines-dir", type=click.Path(path_type=Path), default=None, help="For --source dir.")
@click.option("--source-poll", default=0.5, show_default=True, help="Seconds between scans of --machines-dir.")
@click.option("--tombstone-ttl", default=3600.0, show_default=True, help="Seconds a tombstone (and an unrefreshed row) lives.")
@click.option("--probe-interval", default=1.0, show_default=True)
@click.option("--probe-timeout", default=0.5, show_default=True)
@click.option("--suspicion-mult", default=4.0, show_default=True)
@click.option("--origin-fanout", default=100, show_default=True, help="Peers an origin pushes its own rows to directly.")
@click.option("--fanout", default=3, show_default=True, help="Peers per relay round.")
@click.option("--rounds", default=2, show_default=True, help="Push rounds per new record at each agent.")
@click.option("--gossip-interval", default=0.05, show_default=True, help="Minimum seconds between push rounds.")
@click.option("--sync-interval", default=2.0, show_default=True)
@click.option("--origin-rate", default=100.0, show_default=True, help="New record versions/s accepted per origin.")
@click.option("--sender-rate", default=500.0, show_default=True, help="Datagrams/s accepted per sender.")
@click.option("--admin-api", is_flag=True, help="Serve POST /v1/admin/partition (fault injection: tests, benches); off in the chart.")
@click.option("--load-token-file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="POST /v1/load needs `Authorization: Bearer <this token>` (the chart mounts the proxies' hop token).")
@click.option("--emulate-latency", default="", help="SAME_MS,CROSS_MS one-way delay on sends (benchmarks).")
@click.option("--log-level", default="INFO", show_default=True)
def agent_command(host, region, gossip, advertise, api, members_api, seeds, data_dir, key_file, source, machines_dir,
                  source_poll, tombstone_ttl, probe_interval, probe_timeout, suspicion_mult, origin_fanout, fanout, rounds,
                  gossip_interval, sync_interval, origin_rate, sender_rate, admin_api, load_token_file, emulate_latency,
                  log_level):
    """Gossip this host's instances; serve the cluster's replica to the proxy and DNS."""
    logs.configure(log_level, component="agent")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from kubefly.gossip.agent import AgentConfig
    from kubefly.gossip.wire import Keys

    if source == "dir" and machines_dir is None:
        raise click.UsageError("--source dir needs --machines-dir")
    bind_ip, gport = _hostport(gossip, "0.0.0.0")
    if not region:
        region = _node_region(host)
    latency = (0.0, 0.0)
    if emulate_latency:
        same, cross = (float(x) / 1000 for x in emulate_latency.split(","))
        latency = (same, cross)
    cfg = AgentConfig(
        host=host, region=region, bind_ip=bind_ip, advertise_ip=advertise or _default_advertise(bind_ip),
        gossip_port=gport, seeds=[_hostport(s) for s in seeds], data_dir=data_dir, tombstone_ttl=tombstone_ttl,
        probe_interval=probe_interval, probe_timeout=probe_timeout, suspicion_mult=suspicion_mult, origin_fanout=origin_fanout, fanout=fanout,
        rounds=rounds, gossip_interval=gossip_interval, sync_interval=sync_interval, origin_rate=origin_rate,
        origin_burst=origin_rate * 5, sender_rate=sender_rate, sender_burst=sender_rate * 2, emulate_latency=latency,
    )
    try:
        keys = Keys.load(key_file)
    except (OSError, ValueError) as exc:
        raise click.UsageError(str(exc))
    load_token = load_token_file.read_text().strip() if load_token_file is not None else None
    if load_token == "":
        raise click.BadParameter(f"{load_token_file} is empty", param_hint="--load-token-file")
    asyncio.run(_run(cfg, keys, _hostport(api), source, machines_dir, source_poll,
                     _hostport(members_api) if members_api else None, admin_api, load_token))


async def _run(cfg, keys, api_addr, source, machines_dir, source_poll, members_addr=None, admin_api=False,
               load_token=None) -> None:
    from aiohttp import web

    from kubefly.gossip.agent import Agent
    from kubefly.gossip.api import make_app, make_members_app
    from kubefly.gossip.sources import DirSource, PodSource

    log = logs.get("kubefly.gossip.cli")
    agent = Agent(cfg, keys)
    await agent.start()
    if source == "dir":
        src = DirSource(machines_dir, cfg.host, cfg.region, agent.set_local, poll=source_poll)
    else:
        src = PodSource(cfg.host, cfg.region, agent.set_local)
        agent.on_checks = src.report_checks  # the machines' readiness gates
        agent.on_published = src.report_published
    src.start()
    runner = web.AppRunner(make_app(agent, admin=admin_api, load_token=load_token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, api_addr[0], api_addr[1]).start()
    log.info("local api ready", api=f"http://{api_addr[0]}:{api_addr[1]}")
    runners = [runner]
    if members_addr is not None:
        members = web.AppRunner(make_members_app(agent), access_log=None)
        await members.setup()
        await web.TCPSite(members, members_addr[0], members_addr[1]).start()
        runners.append(members)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    src.stop()
    await agent.stop()  # ends watch streams first, so the API shuts down at once
    for r in runners:
        await r.cleanup()
    log.info("agent stopped")
