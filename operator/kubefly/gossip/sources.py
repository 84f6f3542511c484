"""Where an agent learns about the machines on its own host.

Both sources produce `LocalMachine`s and hand the complete set to the agent,
which alone turns them (plus the checks it runs and the loads its proxy
reports) into instance rows:

- `PodSource`: the pods on this node (fieldSelector spec.nodeName), through
  the Kubernetes API. When the API is unreachable the last set stays.
- `DirSource`: a directory of JSON files, one per machine (or a Pod object),
  for the component tier and development without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kubefly import labels, logs
from kubefly.gossip.checks import CheckSpec
from kubefly.instances import InstanceState, Service

log = logs.get("kubefly.gossip.sources")

Key = tuple[str, str]
OnMachines = Callable[[dict[Key, "LocalMachine"]], None]


@dataclass(frozen=True)
class LocalMachine:
    org: str
    app: str
    machine_id: str
    instance_id: str
    region: str
    address: str
    state: str
    services: tuple[dict, ...] = ()
    checks: tuple[CheckSpec, ...] = field(default=())

    @property
    def key(self) -> Key:
        return (self.org, self.machine_id)

    @classmethod
    def from_json(cls, d: dict, default_region: str) -> "LocalMachine":
        state = InstanceState(d.get("state", "started")).value
        services = tuple(Service.model_validate(s).model_dump(mode="json") for s in d.get("services") or [])
        checks = tuple(CheckSpec.from_json(c) for c in d.get("checks") or [])
        for k in ("org", "app", "machine_id"):
            if not isinstance(d.get(k), str) or not d[k]:
                raise ValueError(f"machine needs a non-empty {k}")
        return cls(d["org"], d["app"], d["machine_id"], str(d.get("instance_id") or d["machine_id"]),
                   str(d.get("region") or default_region), str(d.get("address") or ""), state, services, checks)

    def to_json(self) -> dict:
        return {
            "org": self.org, "app": self.app, "machine_id": self.machine_id, "instance_id": self.instance_id,
            "region": self.region, "address": self.address, "state": self.state, "services": list(self.services),
            "checks": [{"name": c.name, "type": c.type, "port": c.port, "path": c.path, "method": c.method,
                        "interval": c.interval, "timeout": c.timeout, "grace_period": c.grace,
                        "headers": dict(c.headers)} for c in self.checks],
        }


def pod_state(pod: dict) -> str:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return InstanceState.stopping.value
    phase = status.get("phase") or "Pending"
    if phase == "Running":
        ready = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        return (InstanceState.started if ready.get("ContainersReady") == "True" else InstanceState.starting).value
    if phase == "Pending":
        return (InstanceState.starting if (pod.get("spec") or {}).get("nodeName") else InstanceState.created).value
    if phase == "Succeeded":
        return InstanceState.stopped.value
    return InstanceState.failed.value  # Failed, Unknown


def pod_to_machine(pod: dict, default_region: str) -> LocalMachine | None:
    """A kubefly pod (API JSON, camelCase) as a LocalMachine; None for pods that are not machines."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    lbl, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    if not lbl.get(labels.APP):
        return None
    ips = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
    return LocalMachine.from_json(
        {
            "org": meta.get("namespace") or "default",
            "app": lbl[labels.APP],
            "machine_id": lbl.get(labels.MACHINE) or meta.get("name"),
            "instance_id": ann.get(labels.INSTANCE_ID) or meta.get("uid") or meta.get("name"),
            "region": lbl.get(labels.REGION) or default_region,
            "address": status.get("podIP") or (ips[0] if ips else ""),
            "state": pod_state(pod),
            "services": json.loads(ann.get(labels.SERVICES) or "[]"),
            "checks": json.loads(ann.get(labels.CHECKS) or "[]"),
        },
        default_region,
    )


def parse_file(doc: dict, default_region: str) -> LocalMachine | None:
    if doc.get("kind") == "Pod":
        return pod_to_machine(doc, default_region)
    return LocalMachine.from_json(doc, default_region)


class DirSource:
    """Polls a directory of *.json files (mtime-based, so unchanged files cost a stat)."""

    def __init__(self, path: Path, host: str, region: str, on_machines: OnMachines, poll: float = 0.5):
        self.path, self.host, self.region = path, host, region
        self._on = on_machines
        self._poll = poll
        self._seen: dict[str, tuple[float, LocalMachine | None]] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def scan(self) -> bool:
        changed = False
        now: dict[str, tuple[float, LocalMachine | None]] = {}
        for f in self.path.glob("*.json"):
            try:
                mtime = f.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            prev = self._seen.get(f.name)
            if prev is not None and prev[0] == mtime:
                now[f.name] = prev
                continue
            changed = True
            try:
                doc = json.loads(f.read_text())
                if doc.get("host") not in (None, self.host):
                    raise ValueError(f"file names host {doc.get('host')!r}, this agent is {self.host!r}")
                now[f.name] = (mtime, parse_file(doc, self.region))
            except (OSError, ValueError, TypeError) as exc:
                # A half-written or invalid file is skipped, never half-applied.
                log.warning("machine file rejected", file=f.name, error=str(exc)[:300])
                now[f.name] = (mtime, prev[1] if prev else None)
        changed = changed or set(now) != set(self._seen)
        self._seen = now
        return changed

    def machines(self) -> dict[Key, LocalMachine]:
        return {m.key: m for _, m in self._seen.values() if m is not None}

    async def _run(self) -> None:
        first = True
        while True:
            if self.scan() or first:
                self._on(self.machines())
                first = False
            await asyncio.sleep(self._poll)


def checks_condition(passing: bool, failing: list[str], now: str) -> dict:
    """The pod condition behind the machine's readiness gate (type = the checks annotation's name)."""
    return {"type": labels.CHECKS, "status": "True" if passing else "False",
            "reason": "ChecksPassing" if passing else "ChecksFailing",
            "message": "all checks pass" if passing else f"failing: {', '.join(failing) or 'a check'}",
            "lastTransitionTime": now}


class PodSource:
    """List+watch the pods of this node in a thread (the kubernetes client is blocking).

    It also writes each machine's check verdict to its pod (the readiness gate),
    one write at a time in a thread of its own."""

    def __init__(self, host: str, region: str, on_machines: OnMachines):
        self.host, self.region = host, region
        self._on = on_machines
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="checks-gate")

    def report_checks(self, m: LocalMachine, passing: bool, failing: list[str]) -> None:
        self._writer.submit(self._write_checks, m.org, m.machine_id, m.instance_id, passing, failing)

    def _write_checks(self, namespace: str, pod: str, instance: str, passing: bool, failing: list[str]) -> None:
        from datetime import datetime, timezone

        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = client.CoreV1Api()
        for _ in range(3):
            try:
                live = api.read_namespaced_pod(pod, namespace)
                if (live.metadata.annotations or {}).get(labels.INSTANCE_ID, instance) != instance:
                    return  # replaced meanwhile: the new instance gets its own verdict
                now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                # resourceVersion: the pod must still be the one just read.
                body = {"metadata": {"resourceVersion": live.metadata.resource_version},
                        "status": {"conditions": [checks_condition(passing, failing, now)]}}
                api.patch_namespaced_pod_status(pod, namespace, body,
                                                _content_type="application/strategic-merge-patch+json")
                log.info("checks gate written", pod=f"{namespace}/{pod}", passing=passing, failing=failing)
                return
            except ApiException as exc:
                if exc.status == 409:
                    continue  # the kubelet wrote status in between: read again
                log.warning("checks gate not written", pod=f"{namespace}/{pod}", status=exc.status, reason=exc.reason)
                return

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, name="pod-source", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._writer.shutdown(wait=False, cancel_futures=True)

    def _emit(self, pods: dict[str, dict]) -> None:
        out: dict[Key, LocalMachine] = {}
        for pod in pods.values():
            try:
                m = pod_to_machine(pod, self.region)
            except (ValueError, TypeError) as exc:
                log.warning("pod rejected", pod=(pod.get("metadata") or {}).get("name"), error=str(exc)[:300])
                continue
            if m is not None:
                out[m.key] = m
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on, out)

    def _run(self) -> None:
        from kubernetes import client, config, watch

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CoreV1Api()
        ser = api.api_client.sanitize_for_serialization
        selector = dict(field_selector=f"spec.nodeName={self.host}",
                        label_selector=f"{labels.MANAGED_BY}={labels.MANAGED_BY_VALUE}")
        backoff = 1.0
        while not self._stop.is_set():
            try:
                listed = api.list_pod_for_all_namespaces(**selector)
                pods = {f"{p.metadata.namespace}/{p.metadata.name}": ser(p) for p in listed.items}
                self._emit(pods)
                backoff = 1.0
                w = watch.Watch()
                for ev in w.stream(api.list_pod_for_all_namespaces, resource_version=listed.metadata.resource_version,
                                   timeout_seconds=300, **selector):
                    if self._stop.is_set():
                        w.stop()
                        return
                    pod = ser(ev["object"])
                    name = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
                    if ev["type"] == "DELETED":
                        pods.pop(name, None)
                    else:
                        pods[name] = pod
                    self._emit(pods)
            except Exception as exc:  # API unreachable: keep serving the last set, retry
                log.warning("pod watch failed; keeping last known machines", error=str(exc)[:300])
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
