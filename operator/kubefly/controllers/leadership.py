"""Operator leadership: one active replica, decided by a coordination.k8s.io Lease.

Kopf's peering is a soft lock: each replica pauses while it sees a
higher-priority peer, and after an API outage longer than the records' life
every replica may believe it is alone (two active for 9-14 s, fighting over
the same pods). A Lease with optimistic concurrency is a hard one:

- The leader renews every `retry_period`. It stops being active the moment
  `renew_deadline` has passed since it *sent* its last successful renewal
  (its own monotonic clock; a hung request counts as failed): the process
  replaces itself (exec) and comes back as a candidate, so no stale cache,
  daemon or queued handler of the old term survives.
- A candidate takes the Lease only after it has seen the same record
  (resourceVersion) unchanged for the Lease's full duration, counted from when
  it first saw it and only over reads that succeeded: any failed read starts
  the count again. The holder stopped `lease_duration - renew_deadline`
  before, and a write queued in a paused API server lands first.
- Every write carries the resourceVersion it was decided on (409 otherwise),
  so two candidates never both win.

`Election` is the pure state machine (times passed in); `Elector` runs it on
its own thread, off Kopf's event loop, so a busy loop cannot delay a renewal.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import structlog
from prometheus_client import Gauge

log = structlog.get_logger("kubefly.controllers.leadership")
LEADER = Gauge("kubefly_operator_leader", "1 while this operator replica holds the leadership Lease")


@dataclass(frozen=True)
class Timing:
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leadership timing: need 0 < retry period < renew deadline < lease duration, got "
                             f"{self.retry_period}, {self.renew_deadline}, {self.lease_duration}")


@dataclass(frozen=True)
class Lease:
    holder: str  # "" when released
    duration_s: float
    resource_version: str
    transitions: int = 0
    acquired: str | None = None  # acquireTime, kept by renewals (a PUT replaces the whole spec)

    @classmethod
    def from_object(cls, obj: dict) -> "Lease":
        spec = obj.get("spec") or {}
        return cls(spec.get("holderIdentity") or "", float(spec.get("leaseDurationSeconds") or 0),
                   obj["metadata"]["resourceVersion"], int(spec.get("leaseTransitions") or 0), spec.get("acquireTime"))


class Step(enum.Enum):
    WAIT = "wait"
    CREATE = "create"  # no Lease yet
    ACQUIRE = "acquire"  # update the Lease to us, on the resourceVersion read
    RENEW = "renew"
    STOP = "stop"  # we were leading and are not any more


class Election:
    """What one replica should do next, from what it read and when. No I/O."""

    def __init__(self, identity: str, timing: Timing):
        self.identity, self.timing = identity, timing
        self.leading = False
        self.last_renew_sent: float | None = None
        self._observed: tuple[str, float] | None = None  # (resourceVersion, first seen unchanged since)

    def next_step(self, lease: Lease | None, now: float) -> Step:
        """After a successful read at `now` (the time its answer arrived)."""
        if self.leading:
            if self.must_stop(now) or lease is None or lease.holder != self.identity:
                return Step.STOP
            return Step.RENEW
        if lease is None:
            return Step.CREATE
        # Our own name: an earlier process of this replica (a container restart, or our own exec
        # after losing it); it is gone, so nobody else acts under this name.
        if lease.holder in ("", self.identity):
            return Step.ACQUIRE
        if self._observed is None or self._observed[0] != lease.resource_version:
            self._observed = (lease.resource_version, now)
            return Step.WAIT
        return Step.ACQUIRE if now - self._observed[1] >= lease.duration_s else Step.WAIT

    def read_failed(self) -> None:
        # What happened while we could not look is unknown: the holder may have renewed.
        self._observed = None

    def wrote(self, sent_at: float) -> bool:
        """An acquire or renewal decided at `sent_at` succeeded; True if we just became the leader."""
        became = not self.leading
        self.leading, self.last_renew_sent = True, sent_at
        self._observed = None
        return became

    def must_stop(self, now: float) -> bool:
        return self.leading and (self.last_renew_sent is None or now - self.last_renew_sent >= self.timing.renew_deadline)

    def request_timeout(self, now: float) -> float:
        """A request may not outlive the renewal deadline (a leader) nor one retry period."""
        budget = self.timing.retry_period
        if self.leading and self.last_renew_sent is not None:
            budget = min(budget, self.last_renew_sent + self.timing.renew_deadline - now)
        return max(0.2, budget)

    def lease_body(self, current: Lease | None, namespace: str, name: str, now: datetime) -> dict:
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.timing.lease_duration),
                "renewTime": stamp}
        meta: dict = {"name": name, "namespace": namespace}
        if current is None or current.holder != self.identity or not self.leading:
            spec["acquireTime"] = stamp
            spec["leaseTransitions"] = (current.transitions + 1) if current is not None else 0
        else:
            spec["leaseTransitions"] = current.transitions
            if current.acquired:
                spec["acquireTime"] = current.acquired
        if current is not None:
            meta["resourceVersion"] = current.resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


class LeaseAPI:
    """The three Lease calls, synchronous, each with its own timeout. Errors raise ApiException or OSError."""

    def __init__(self, cfg, namespace: str, name: str):
        """`cfg`: a kubernetes.client.Configuration (copied: no retries here, or one call could outlast its timeout)."""
        import copy

        from kubernetes import client

        cfg = copy.copy(cfg)
        cfg.retries = False
        self.api = client.CoordinationV1Api(client.ApiClient(cfg))
        self.namespace, self.name = namespace, name

    def read(self, timeout: float) -> Lease | None:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False,
                                                  _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return Lease.from_object(json.loads(resp.data))

    def create(self, body: dict, timeout: float) -> None:
        self.api.create_namespaced_lease(self.namespace, body, _preload_content=False, _request_timeout=timeout)

    def replace(self, body: dict, timeout: float) -> None:
        self.api.replace_namespaced_lease(self.name, self.namespace, body, _preload_content=False,
                                          _request_timeout=timeout)

    def release(self, identity: str, timeout: float) -> None:
        """Hand the Lease back (a clean shutdown): the next candidate need not wait for it to expire."""
        lease = self.read(timeout)
        if lease is None or lease.holder != identity:
            return
        self.replace({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                      "metadata": {"name": self.name, "namespace": self.namespace,
                                   "resourceVersion": lease.resource_version},
                      "spec": {"holderIdentity": "", "leaseDurationSeconds": 1,
                               "leaseTransitions": lease.transitions}}, timeout)


class Elector:
    """Runs an Election against the API on its own threads: the loop, and a watchdog for the deadline."""

    def __init__(self, api: LeaseAPI, identity: str, timing: Timing, *, on_lead: Callable[[], None],
                 on_lost: Callable[[], None], clock: Callable[[], float] = time.monotonic):
        self.api, self.timing, self.clock = api, timing, clock
        self.election = Election(identity, timing)
        self.on_lead, self.on_lost = on_lead, on_lost
        self.stopping = threading.Event()
        self.heartbeat = clock()
        self._lost = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def identity(self) -> str:
        return self.election.identity

    def start(self) -> "Elector":
        for target, name in ((self._loop, "leader-election"), (self._watchdog, "leader-watchdog")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self._threads:
            t.join()

    def _lose(self, why: str) -> None:
        if not self._lost.acquire(blocking=False):
            return
        self.election.leading = False
        LEADER.set(0)
        log.warning("leadership lost: this replica stops being active", identity=self.identity, why=why,
                    lease=f"{self.api.namespace}/{self.api.name}")
        self.on_lost()

    def _watchdog(self) -> None:
        while not self.stopping.wait(0.1):
            if self.election.must_stop(self.clock()):
                self._lose(f"no renewal within the {self.timing.renew_deadline:.0f}s renew deadline")
                return

    def _loop(self) -> None:
        from kubernetes.client.exceptions import ApiException

        e = self.election
        refused = None
        while not self.stopping.is_set() and not self._lost.locked():
            self.heartbeat = sent = self.clock()
            try:
                lease = self.api.read(e.request_timeout(sent))
            except Exception as exc:  # ApiException, and urllib3's own errors on timeouts
                e.read_failed()
                status = getattr(exc, "status", None)
                if status is not None and status != refused:
                    # An answer, not an outage: RBAC or a wrong name; say it once.
                    log.error("the API refuses the leadership lease", status=status, reason=getattr(exc, "reason", None),
                              lease=f"{self.api.namespace}/{self.api.name}")
                else:
                    log.debug("cannot read the leadership lease", error=str(exc))
                refused = status
                self.stopping.wait(self.timing.retry_period)
                continue
            refused = None
            step = e.next_step(lease, self.clock())
            if step is Step.STOP:
                self._lose("the lease is held by " + (lease.holder if lease else "nobody (deleted)"))
                return
            if step in (Step.CREATE, Step.ACQUIRE, Step.RENEW):
                body = e.lease_body(lease, self.api.namespace, self.api.name, datetime.now(timezone.utc))
                try:
                    (self.api.create if step is Step.CREATE else self.api.replace)(body, e.request_timeout(self.clock()))
                except ApiException as exc:
                    if exc.status != 409:
                        log.info("leadership lease write failed", step=step.value, status=exc.status)
                    # 409: someone else wrote first; the next read says who.
                except Exception as exc:
                    log.info("leadership lease write failed", step=step.value, error=str(exc))
                else:
                    if e.wrote(sent) and not self._lost.locked() and not e.must_stop(self.clock()):
                        LEADER.set(1)
                        log.info("leadership acquired: this replica is active", identity=self.identity,
                                 lease=f"{self.api.namespace}/{self.api.name}")
                        self.on_lead()
            self.stopping.wait(self.timing.retry_period)


class CandidateHealth:
    """/healthz while this replica waits for the Lease (Kopf serves it once active): alive while the loop runs."""

    def __init__(self, port: int, elector: Elector):
        elector_ = elector
        stale_after = 3 * elector.timing.retry_period + elector.timing.lease_duration

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                ok = self.path.startswith("/healthz") and elector_.clock() - elector_.heartbeat < stale_after
                body = json.dumps({"candidate": elector_.identity, "ok": ok}).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="candidate-health", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
