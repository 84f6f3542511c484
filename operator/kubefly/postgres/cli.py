"""`kubefly postgres member|endpoint|switchover`."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path

import click

from kubefly import logs, metrics


def _secret(value: str | None, file: Path | None, what: str) -> str:
    if file is not None:
        return file.read_text().strip()
    if value:
        return value
    raise click.UsageError(f"{what}: set the environment variable or pass the file option")


@click.group("postgres")
def postgres_group() -> None:
    """Postgres members (postgres + repmgr) and the primary endpoint."""


@postgres_group.command("member")
@click.option("--name", envvar="KUBEFLY_PG_NAME", required=True, help="Member name (repmgr node_name).")
@click.option("--node-id", envvar="KUBEFLY_PG_NODE_ID", type=int, required=True, help="repmgr node_id, > 0, unique.")
@click.option("--region", envvar="KUBEFLY_PG_REGION", default="default", show_default=True, help="repmgr location.")
@click.option("--data-dir", envvar="KUBEFLY_PG_DATA_DIR", type=click.Path(path_type=Path), required=True)
@click.option("--host", envvar="KUBEFLY_PG_HOST", required=True, help="Address the peers reach this member at.")
@click.option("--pg-port", envvar="KUBEFLY_PG_PORT", type=int, default=5432, show_default=True)
@click.option("--health-port", envvar="KUBEFLY_PG_HEALTH_PORT", type=int, default=5500, show_default=True)
@click.option("--peer", "peers", envvar="KUBEFLY_PG_PEERS", multiple=True,
              help="name=host:pgport:healthport, once per other member (env: space-separated).")
@click.option("--synchronous/--no-synchronous", envvar="KUBEFLY_PG_SYNCHRONOUS", default=False, show_default=True)
@click.option("--priority", envvar="KUBEFLY_PG_PRIORITY", type=int, default=100, show_default=True,
              help="repmgr priority; 0 = never promoted.")
@click.option("--bootstrap/--no-bootstrap", envvar="KUBEFLY_PG_BOOTSTRAP", default=False,
              help="This member may initialise a brand-new cluster (when every member is empty).")
@click.option("--fence-after", envvar="KUBEFLY_PG_FENCE_AFTER", type=float, default=3.0, show_default=True,
              help="Seconds a primary may go without seeing a majority before it stops itself.")
@click.option("--handover-timeout", envvar="KUBEFLY_PG_HANDOVER_TIMEOUT", type=float, default=30.0, show_default=True,
              help="On SIGTERM, seconds a primary may spend handing over to a standby before it just stops "
                   "(keep it below the pod's grace period).")
@click.option("--archive-endpoint", envvar="KUBEFLY_PG_ARCHIVE_ENDPOINT", default="",
              help="https:// S3 endpoint to archive WAL to with pgBackRest (off when empty).")
@click.option("--archive-bucket", envvar="KUBEFLY_PG_ARCHIVE_BUCKET", default="kubefly", show_default=True)
@click.option("--archive-region", envvar="KUBEFLY_PG_ARCHIVE_REGION", default="us-east-1", show_default=True)
@click.option("--archive-path", envvar="KUBEFLY_PG_ARCHIVE_PATH", default="/postgres", show_default=True,
              help="Key prefix; the archive is <path>/<cluster>/<system identifier>.")
@click.option("--cluster", envvar="KUBEFLY_PG_CLUSTER", default="",
              help="The cluster's name (the pgBackRest stanza); needed with --archive-endpoint.")
@click.option("--archive-access-key-id", envvar="KUBEFLY_PG_ARCHIVE_ACCESS_KEY_ID", default="",
              help="S3 access key id; the secret key is read from KUBEFLY_PG_ARCHIVE_SECRET_KEY.")
@click.option("--archive-ca-file", envvar="KUBEFLY_PG_ARCHIVE_CA_FILE", type=click.Path(path_type=Path, exists=True),
              help="PEM CA the store's certificate is checked against (or the PEM in KUBEFLY_PG_ARCHIVE_CA).")
@click.option("--restore-from", envvar="KUBEFLY_PG_RESTORE_FROM", default="",
              help="Start a new cluster from this cluster's archive (same path prefix) instead of initdb.")
@click.option("--restore-system-id", envvar="KUBEFLY_PG_RESTORE_SYSTEM_ID", default="",
              help="The source lineage's system identifier (its archive <path>/<cluster>/<id>).")
@click.option("--restore-type", envvar="KUBEFLY_PG_RESTORE_TYPE", default="default", show_default=True,
              type=click.Choice(["time", "lsn", "name", "immediate", "default"]),
              help="Where recovery stops: a time, an LSN, a restore point name, the backup's end, or the archive's end.")
@click.option("--restore-target", envvar="KUBEFLY_PG_RESTORE_TARGET", default="")
@click.option("--restore-set", envvar="KUBEFLY_PG_RESTORE_SET", default="", help="The backup label to start from.")
@click.option("--superuser-password-file", type=click.Path(path_type=Path, exists=True))
@click.option("--repmgr-password-file", type=click.Path(path_type=Path, exists=True))
@click.option("--log-level", default="INFO", show_default=True)
def member_command(name, node_id, region, data_dir, host, pg_port, health_port, peers, synchronous, priority,
                   bootstrap, fence_after, handover_timeout, archive_endpoint, archive_bucket, archive_region,
                   archive_path, cluster, archive_access_key_id, archive_ca_file, restore_from, restore_system_id,
                   restore_type, restore_target, restore_set, superuser_password_file,
                   repmgr_password_file, log_level):
    """Run one Postgres member: postgres and repmgrd as children, fencing, /health and /metrics."""
    # Configure logging before importing the modules whose loggers bind at import time.
    logs.configure(log_level, component="postgres-member")
    from kubefly.postgres.archiver import Settings
    from kubefly.postgres.member import Credentials, Member
    from kubefly.postgres.pgbackrest import RestoreFrom
    from kubefly.postgres.repmgr import Layout, MemberSpec, Peer

    creds = Credentials(
        superuser_password=_secret(os.environ.get("KUBEFLY_PG_SUPERUSER_PASSWORD"), superuser_password_file,
                                   "superuser password (KUBEFLY_PG_SUPERUSER_PASSWORD)"),
        repmgr_password=_secret(os.environ.get("KUBEFLY_PG_REPMGR_PASSWORD"), repmgr_password_file,
                                "repmgr password (KUBEFLY_PG_REPMGR_PASSWORD)"),
    )
    spec = MemberSpec(
        name=name, node_id=node_id, region=region, host=host, pg_port=pg_port, health_port=health_port,
        layout=Layout(data_dir.resolve()), peers=tuple(Peer.parse(p) for p in peers),
        synchronous=synchronous, priority=priority,
    )
    archive = None
    if archive_endpoint:
        if not cluster or not archive_access_key_id:
            raise click.UsageError("--archive-endpoint needs --cluster and --archive-access-key-id")
        ca = archive_ca_file.read_text() if archive_ca_file else os.environ.get("KUBEFLY_PG_ARCHIVE_CA") or None
        archive = Settings(endpoint=archive_endpoint, bucket=archive_bucket, path_prefix=archive_path, cluster=cluster,
                           access_key_id=archive_access_key_id, region=archive_region, ca_pem=ca)
    # The admin endpoints (switchover, demote, follow, backup) change who is primary or load the
    # database: a member never runs them unauthenticated.
    admin_token = _secret(os.environ.get("KUBEFLY_PG_ADMIN_TOKEN"), None, "admin token (KUBEFLY_PG_ADMIN_TOKEN)")
    restore = None
    if restore_from:
        if archive is None or not restore_system_id:
            raise click.UsageError("--restore-from needs --archive-endpoint and --restore-system-id")
        restore = RestoreFrom(cluster=restore_from, system_id=restore_system_id, type=restore_type,
                              target=restore_target or None, backup_set=restore_set or None)
    member = Member(spec, creds, bootstrap=bootstrap, fence_after_s=fence_after, handover_timeout_s=handover_timeout,
                    admin_token=admin_token, archive=archive, restore_from=restore)
    asyncio.run(member.serve())


@postgres_group.command("endpoint")
@click.option("--listen", default="0.0.0.0:5432", show_default=True, help="Where clients connect.")
@click.option("--member", "members", multiple=True, required=True, help="name=host:pgport:healthport, once per member.")
@click.option("--metrics-listen", default=None, help="host:port for Prometheus /metrics (off when unset).")
@click.option("--fence-deadline", type=float, default=5.0, show_default=True,
              help="Seconds a silent primary is assumed writable (its --fence-after plus one health check).")
@click.option("--connect-wait", type=float, default=30.0, show_default=True,
              help="Seconds a new client waits for a primary before it is closed.")
@click.option("--log-level", default="INFO", show_default=True)
def endpoint_command(listen, members, metrics_listen, fence_deadline, connect_wait, log_level):
    """Forward Postgres clients to the one writable primary."""
    logs.configure(log_level, component="postgres-endpoint")
    from kubefly.postgres.endpoint import Endpoint, Target

    if metrics_listen:
        host, _, port = metrics_listen.rpartition(":")
        metrics.serve(int(port), host or "0.0.0.0")
    endpoint = Endpoint([Target.parse(m) for m in members], fence_deadline_s=fence_deadline,
                        connect_wait_s=connect_wait)
    host, _, port = listen.rpartition(":")

    async def run() -> None:
        server = await asyncio.start_server(endpoint.handle, host.strip("[]") or "0.0.0.0", int(port))
        logs.get("kubefly.postgres.endpoint").info("endpoint listening", listen=listen)
        async with server:
            await endpoint.poll_forever()

    asyncio.run(run())


@postgres_group.command("switchover")
@click.argument("health_url")
@click.option("--timeout", type=float, default=180.0, show_default=True)
def switchover_command(health_url, timeout):
    """Make the standby whose health endpoint is HEALTH_URL (http://host:port) the primary."""
    req = urllib.request.Request(health_url.rstrip("/") + "/switchover", method="POST", data=b"{}")
    token = os.environ.get("KUBEFLY_PG_ADMIN_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        click.echo(json.dumps(json.load(resp)))
