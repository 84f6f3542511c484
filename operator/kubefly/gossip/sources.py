"""Where an agent learns about the machines on its own host.

Both sources produce `LocalMachine`s and hand the complete set to the agent,
which alone turns them (plus the checks it runs and the loads its proxy
reports) into instance rows:

- `PodSource`: the pods on this node (fieldSelector spec.nodeName) and the
  Machines placed on it (status.host), through the Kubernetes API. A pod
  makes the row; a Machine without a pod (created, stopped, being started)
  makes a row too, never routable, so the proxy knows the app and can
  autostart it. When the API is unreachable the last set stays.
- `DirSource`: a directory of JSON files, one per machine (the LocalMachine
  shape, a Pod or a Machine object), for the component tier and development
  without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kubefly import GROUP, VERSION, labels, logs
from kubefly.gossip.checks import CheckSpec
from kubefly.instances import InstanceState, Service
from kubefly.machines.pod import readiness_gates, routed_condition, services_annotation

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


# The Machine's Ready reasons that mean it exited for good under its spec
# (kubefly.machines.lifecycle.EXIT_REASONS): setting spec.state started again
# would change nothing, so it is no autostart candidate.
EXITED = ("Exited", "RestartLimitExceeded")


def machine_state(machine: dict) -> str | None:
    """The row state of a Machine that has no pod; None for one that is going away."""
    meta, spec, status = machine.get("metadata") or {}, machine.get("spec") or {}, machine.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("state") in ("destroying", "destroyed"):
        return None
    if spec.get("state", "started") == "stopped":
        # Fly's words: created = placed and never booted, stopped = booted before.
        return (InstanceState.created if status.get("state") in (None, "created") else InstanceState.stopped).value
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    if status.get("state") == "failed" or (
        ready.get("reason") in EXITED and ready.get("observedGeneration") == meta.get("generation")
    ):
        return InstanceState.failed.value
    # Desired started, no pod yet: being started (a request waits for it, nothing routes to it).
    return InstanceState.starting.value


def machine_to_local(machine: dict, host: str, default_region: str) -> LocalMachine | None:
    """A Machine placed on `host` as a LocalMachine without an address; None when it is
    placed elsewhere (or nowhere yet), or going away."""
    meta, spec, status = machine.get("metadata") or {}, machine.get("spec") or {}, machine.get("status") or {}
    if status.get("host") != host or not spec.get("app"):
        return None
    state = machine_state(machine)
    if state is None:
        return None
    return LocalMachine.from_json(
        {
            "org": meta.get("namespace") or "default",
            "app": spec["app"],
            "machine_id": meta.get("name"),
            "instance_id": status.get("instanceId") or meta.get("uid") or meta.get("name"),
            "region": status.get("region") or spec.get("region") or default_region,
            "address": "",
            "state": state,
            "services": json.loads(services_annotation(spec.get("services") or [])),
            "checks": spec.get("checks") or [],
        },
        default_region,
    )


def merge(pods: list[dict], machines: list[dict], host: str, default_region: str) -> dict[Key, LocalMachine]:
    """This host's machines: one per pod, and one per Machine placed here that has no pod.
    A pod or Machine that does not parse is logged and skipped, never half-applied."""
    out: dict[Key, LocalMachine] = {}
    for pod in pods:
        try:
            m = pod_to_machine(pod, default_region)
        except (ValueError, TypeError) as exc:
            log.warning("pod rejected", pod=(pod.get("metadata") or {}).get("name"), error=str(exc)[:300])
            continue
        if m is not None:
            out[m.key] = m
    for machine in machines:
        try:
            m = machine_to_local(machine, host, default_region)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("machine rejected", machine=(machine.get("metadata") or {}).get("name"), error=str(exc)[:300])
            continue
        if m is not None and m.key not in out:  # the pod, when there is one, is the truth
            out[m.key] = m
    return out


def parse_file(doc: dict, host: str, default_region: str) -> LocalMachine | None:
    if doc.get("kind") == "Pod":
        return pod_to_machine(doc, default_region)
    if doc.get("kind") == "Machine":
        return machine_to_local(doc, host, default_region)
    return LocalMachine.from_json(doc, default_region)


class DirSource:
    """Polls a directory of *.json files (mtime-based, so unchanged files cost a stat)."""

    def __init__(self, path: Path, host: str, region: str, on_machines: OnMachines, poll: float = 0.5):
        self.path, self.host, self.region = path, host, region
        self._on = on_machines
        self._poll = poll
        self._seen: dict[str, tuple[float, dict | None]] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def scan(self) -> bool:
        changed = False
        now: dict[str, tuple[float, dict | None]] = {}
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
                parse_file(doc, self.host, self.region)  # refused here, whole, or kept
                now[f.name] = (mtime, doc)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                # A half-written or invalid file is skipped, never half-applied.
                log.warning("machine file rejected", file=f.name, error=str(exc)[:300])
                now[f.name] = (mtime, prev[1] if prev else None)
        changed = changed or set(now) != set(self._seen)
        self._seen = now
        return changed

    def machines(self) -> dict[Key, LocalMachine]:
        docs = [d for _, d in self._seen.values() if d is not None]
        plain = [LocalMachine.from_json(d, self.region) for d in docs if d.get("kind") not in ("Pod", "Machine")]
        out = merge([d for d in docs if d.get("kind") == "Pod"], [d for d in docs if d.get("kind") == "Machine"],
                    self.host, self.region)
        return out | {m.key: m for m in plain}

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


# Retry pace when the API cannot be reached: 0.1 s, doubling to at most 1 s,
# jittered. Short on purpose: a host that boots (a worker started again)
# reaches the API only once kube-proxy has written its rules, and every second
# the agent then sleeps is a second its Ready machines are not routable (a
# doubling backoff to 30 s made it ~28 s). One request a second per watch
# while the API is down costs the API server nothing.
RETRY_S = (0.1, 1.0)
# A watch the server ends after this (then resumed), and a read timeout a bit
# longer, so a connection to an API server that went silent (paused, gone) is
# noticed instead of blocking the thread for the kernel's TCP timeout.
WATCH_S = 50
READ_TIMEOUT_S = WATCH_S + 15


class PodSource:
    """List+watch, in two threads (the kubernetes client is blocking), the pods of
    this node and the Machines; a Machine placed on this node with no pod becomes
    a row too (created, stopped, starting).

    It also writes each machine's readiness gate to its pod, one write at a time in
    a thread of its own: the check verdict, or (a machine without checks) that its
    row is published."""

    def __init__(self, host: str, region: str, on_machines: OnMachines):
        self.host, self.region = host, region
        self._on = on_machines
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="checks-gate")
        self._lock = threading.Lock()
        self._pods: dict[str, dict] = {}
        self._machines: dict[str, dict] = {}
        self._publishing: set[tuple[str, str, str]] = set()  # routed gates being written: (ns, pod, instance)
        # Kinds listed at least once (or refused for good): the set is complete only with both,
        # and the agent takes it as the whole truth about this host.
        self._listed: set[str] = set()

    def report_checks(self, m: LocalMachine, passing: bool, failing: list[str]) -> None:
        self._writer.submit(self._write_condition, m.org, m.machine_id, m.instance_id,
                            lambda now: checks_condition(passing, failing, now))

    def report_published(self, m: LocalMachine) -> None:
        """Its row is published: pass the routed gate, if its pod has one not yet passed (and no write
        of it is under way; a failed write is retried at the agent's next reconcile)."""
        job = (m.org, m.machine_id, m.instance_id)
        with self._lock:
            pod = self._pods.get(f"{m.org}/{m.machine_id}") or {}
            conds = {c.get("type"): c.get("status") for c in (pod.get("status") or {}).get("conditions") or []}
            if labels.ROUTED not in readiness_gates(pod) or conds.get(labels.ROUTED) == "True" or job in self._publishing:
                return
            self._publishing.add(job)

        def write() -> None:
            try:
                self._write_condition(*job, lambda now: routed_condition(True, now))
            finally:
                with self._lock:
                    self._publishing.discard(job)
        self._writer.submit(write)

    def _write_condition(self, namespace: str, pod: str, instance: str, condition: Callable[[str], dict]) -> None:
        from datetime import datetime, timezone

        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = client.CoreV1Api()
        for _ in range(3):
            try:
                live = api.read_namespaced_pod(pod, namespace, _request_timeout=10)
                if (live.metadata.annotations or {}).get(labels.INSTANCE_ID, instance) != instance:
                    return  # replaced meanwhile: the new instance gets its own verdict
                cond = condition(datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                # resourceVersion: the pod must still be the one just read.
                body = {"metadata": {"resourceVersion": live.metadata.resource_version},
                        "status": {"conditions": [cond]}}
                api.patch_namespaced_pod_status(pod, namespace, body, _request_timeout=10,
                                                _content_type="application/strategic-merge-patch+json")
                log.info("readiness gate written", pod=f"{namespace}/{pod}", gate=cond["type"], status=cond["status"],
                         reason=cond["reason"])
                return
            except ApiException as exc:
                if exc.status == 409:
                    continue  # the kubelet wrote status in between: read again
                log.warning("readiness gate not written", pod=f"{namespace}/{pod}", status=exc.status, reason=exc.reason)
                return

    def start(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._loop = asyncio.get_running_loop()
        core, custom = client.CoreV1Api(), client.CustomObjectsApi()
        ser = core.api_client.sanitize_for_serialization
        pods = dict(field_selector=f"spec.nodeName={self.host}",
                    label_selector=f"{labels.MANAGED_BY}={labels.MANAGED_BY_VALUE}")
        # Machines cannot be field-selected by status.host: every agent follows all of
        # them and keeps those placed here (small objects, and few change at a time).
        threading.Thread(target=self._follow, name="pod-source", daemon=True,
                         args=("pods", self._pods, core.list_pod_for_all_namespaces, (), pods, ser)).start()
        threading.Thread(target=self._follow, name="machine-source", daemon=True,
                         args=("machines", self._machines, custom.list_cluster_custom_object,
                               (GROUP, VERSION, "machines"), {}, lambda o: o)).start()

    def stop(self) -> None:
        self._stop.set()
        self._writer.shutdown(wait=False, cancel_futures=True)

    def _emit(self) -> None:
        assert self._loop is not None
        with self._lock:  # held while scheduling too: two threads' sets reach the agent in order
            if len(self._listed) < 2:
                return
            out = merge(list(self._pods.values()), list(self._machines.values()), self.host, self.region)
            self._loop.call_soon_threadsafe(self._on, out)

    def _follow(self, what: str, objects: dict[str, dict], list_fn, args: tuple, selector: dict, ser) -> None:
        """List, then watch from the list's resourceVersion, and again from the last one seen
        when a watch ends; on any failure keep the last objects and list again soon."""
        from kubernetes import watch

        failures = 0
        while not self._stop.is_set():
            try:
                listed = ser(list_fn(*args, **selector, _request_timeout=READ_TIMEOUT_S))
                with self._lock:
                    objects.clear()
                    objects.update({f"{o['metadata'].get('namespace')}/{o['metadata']['name']}": o
                                    for o in listed.get("items") or []})
                    self._listed.add(what)
                self._emit()
                log.info("listed", what=what, count=len(objects), after_failures=failures)
                failures = 0
                version = listed["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    w = watch.Watch()
                    for ev in w.stream(list_fn, *args, resource_version=version, timeout_seconds=WATCH_S,
                                       _request_timeout=READ_TIMEOUT_S, **selector):
                        if self._stop.is_set():
                            w.stop()
                            return
                        if ev["type"] == "ERROR":  # e.g. 410 Gone: the resourceVersion is too old
                            raise RuntimeError(f"watch error: {str(ev.get('raw_object'))[:200]}")
                        obj = ser(ev["object"])
                        version = obj["metadata"]["resourceVersion"]
                        name = f"{obj['metadata'].get('namespace')}/{obj['metadata']['name']}"
                        with self._lock:
                            if ev["type"] == "DELETED":
                                objects.pop(name, None)
                            else:
                                objects[name] = obj
                        self._emit()
            except Exception as exc:  # API unreachable: keep serving the last set, retry
                if getattr(exc, "status", None) in (403, 404):
                    # Not allowed, or no such resource (an older chart, no CRD): go on without it.
                    with self._lock:
                        self._listed.add(what)
                    self._emit()
                failures += 1
                log.warning("watch failed; keeping last known machines", what=what, failures=failures,
                            error=str(exc)[:300])
                self._stop.wait(min(RETRY_S[1], RETRY_S[0] * 2 ** (failures - 1)) * random.uniform(0.5, 1.0))
