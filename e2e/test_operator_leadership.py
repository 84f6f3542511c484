"""Operator leadership against a real kube-apiserver: never two active, through a partition of the
leader from the API and through an API outage longer than the Lease.

Each replica's Elector reaches the API through its own loopback forwarder; blocking a forwarder holds
every byte (requests hang, as when the control plane is paused or the network drops packets), and
unblocking lets the held bytes through, so a write queued during the outage lands afterwards. Short
timings (Lease 3 s, deadline 2 s, retry 0.5 s) keep the cases quick; the production figures are 15/10/2.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid

from kubefly.controllers.leadership import Elector, LeaseAPI, Timing

RELEASE_NAMESPACE = "kubefly-system"  # the chart's release namespace (e2e/conftest.py)

TIMING = Timing(lease_duration=3, renew_deadline=2, retry_period=0.5)


class Forwarder:
    """127.0.0.1:port -> the API server; block() holds all traffic until unblock()."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.open = threading.Event()
        self.open.set()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def block(self) -> None:
        self.open.clear()

    def unblock(self) -> None:
        self.open.set()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self.open.wait()
        try:
            up = socket.create_connection(self.upstream)
        except OSError:
            conn.close()
            return
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.open.wait()  # held, not dropped: delivered when the block ends
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Replica:
    """One operator replica's leadership: on losing it, a fresh Elector under the same name (the exec)."""

    def __init__(self, kube, identity: str, lease: str, terms: list):
        self.identity, self.lease, self.terms = identity, lease, terms
        base = kube.api_client().configuration
        host, port = base.host.removeprefix("https://").rsplit(":", 1)
        self.forwarder = Forwarder((host, int(port)))
        cfg = copy.copy(base)
        cfg.host = f"https://{host}:{self.forwarder.port}"
        self.api = LeaseAPI(cfg, RELEASE_NAMESPACE, lease)
        self.elector: Elector | None = None
        self.lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self.elector = Elector(self.api, self.identity, TIMING, on_lead=self._lead, on_lost=self._lost).start()

    def _lead(self) -> None:
        with self.lock:
            self.terms.append([self.identity, time.monotonic(), None])

    def _lost(self) -> None:
        with self.lock:
            term = next(t for t in reversed(self.terms) if t[0] == self.identity)
            term[2] = time.monotonic()
        old = self.elector
        old.stopping.set()
        threading.Thread(target=self._start, daemon=True).start()

    @property
    def leading(self) -> bool:
        return self.elector is not None and self.elector.election.leading

    def close(self) -> None:
        self.forwarder.unblock()
        if self.elector is not None:
            self.elector.stopping.set()


def never_two_active(terms: list) -> None:
    now = time.monotonic()
    spans = sorted((start, end or now, who) for who, start, end in terms)
    for (s1, e1, w1), (s2, e2, w2) in zip(spans, spans[1:]):
        assert s2 >= e1, f"{w1} active until {e1:.3f}, {w2} from {s2:.3f}: two active"


def wait(what: str, probe, timeout: float) -> float:
    start = time.monotonic()
    while not probe():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def replicas(kube, terms):
    lease = f"leader-{uuid.uuid4().hex[:6]}"
    a = Replica(kube, "a", lease, terms)
    wait("a to lead", lambda: a.leading, 20)
    b = Replica(kube, "b", lease, terms)
    return a, b


def test_a_leader_cut_off_from_the_api_stops_before_the_standby_takes_over(kube):
    terms: list = []
    a, b = replicas(kube, terms)
    try:
        time.sleep(2 * TIMING.lease_duration)
        assert a.leading and not b.leading, "the standby never takes a renewed lease"
        a.forwarder.block()
        cut = time.monotonic()
        took = wait("b to take over", lambda: b.leading, 20)
        a_stopped = terms[0][2] - cut
        print(f"[leadership] partition of the leader: it stopped after {a_stopped:.1f}s, the standby took over "
              f"after {took:.1f}s (lease {TIMING.lease_duration:.0f}s, deadline {TIMING.renew_deadline:.0f}s)")
        time.sleep(TIMING.lease_duration)
        a.forwarder.unblock()  # the partition heals: a is a candidate and stays one
        time.sleep(2 * TIMING.lease_duration)
        assert b.leading and not a.leading
        never_two_active(terms)
    finally:
        a.close()
        b.close()


def test_an_api_outage_longer_than_the_lease_leaves_exactly_one_active(kube):
    terms: list = []
    a, b = replicas(kube, terms)
    try:
        for r in (a, b):
            r.forwarder.block()
        time.sleep(2 * TIMING.lease_duration)  # the control plane paused, twice the Lease
        assert not a.leading and not b.leading, "nobody may be active without renewing"
        for r in (a, b):
            r.forwarder.unblock()
        back = time.monotonic()
        took = wait("one replica to lead again", lambda: a.leading or b.leading, 20)
        print(f"[leadership] after an outage of {2 * TIMING.lease_duration:.0f}s: {'a' if a.leading else 'b'} "
              f"active {took:.1f}s after the API returned")
        time.sleep(3 * TIMING.lease_duration)
        assert a.leading != b.leading
        never_two_active(terms)
    finally:
        a.close()
        b.close()


def test_two_operator_processes_one_cut_off_from_the_api(kube, operator, operator_process, namespace, tmp_path):
    """`kubefly operator` itself, twice, with the chart's timings (Lease 15 s, deadline 10 s) and the
    chart's RBAC: the leader reaches the API through a forwarder that is then blocked. It stops being
    active (replaces its process and waits as a candidate) before the standby takes over, and stays a
    candidate once it can reach the API again."""
    import yaml

    OperatorProcess = operator_process

    lease = "kubefly-operator"  # the one the chart's RBAC allows; the session operator hands it over meanwhile
    server = yaml.safe_load(kube.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    forwarder = Forwarder((host, int(port)))
    args = ("--namespace", namespace)  # an empty namespace: nothing of other tests is touched
    a = OperatorProcess(kube, tmp_path / "a", extra_args=args, identity="a")
    b = OperatorProcess(kube, tmp_path / "b", extra_args=args, identity="b")
    real = kube.cluster.service_account_kubeconfig

    def through_forwarder(ns, sa, path, **kw):
        real(ns, sa, path, **kw)
        cfg = yaml.safe_load(path.read_text())
        cfg["clusters"][0]["cluster"]["server"] = f"https://{host}:{forwarder.port}"
        path.write_text(yaml.safe_dump(cfg))
        return path

    operator.stop()
    kube.cluster.service_account_kubeconfig = through_forwarder
    try:
        a.start()
    finally:
        kube.cluster.service_account_kubeconfig = real
    try:
        wait("a to lead", lambda: "leadership acquired" in a.logs(), 60)
        b.start()
        time.sleep(5)
        assert "waiting for the leadership lease" in b.logs() and "leadership acquired" not in b.logs()
        forwarder.block()
        cut = time.monotonic()
        wait("a to stop being active", lambda: "leadership lost" in a.logs(), 30)
        a_stopped = time.monotonic() - cut
        wait("b to take over", lambda: "leadership acquired" in b.logs(), 60)
        b_took = time.monotonic() - cut
        print(f"[leadership] `kubefly operator` cut off from the API: it stopped after {a_stopped:.1f}s, "
              f"the standby took over after {b_took:.1f}s")
        assert a_stopped < b_took
        assert a.process.poll() is None, "the cut-off leader replaces its process, it does not exit"
        wait("a waiting again as a candidate", lambda: a.logs().count("waiting for the leadership lease") == 2, 30)
        forwarder.unblock()
        time.sleep(20)  # longer than the Lease: a stays a candidate, b renews
        assert a.logs().count("leadership acquired") == 1
        holder = json.loads(kube.kubectl("-n", RELEASE_NAMESPACE, "get", "lease", lease, "-o", "json").stdout)
        assert holder["spec"]["holderIdentity"] == "b"
        assert "leadership lost" not in b.logs()
    finally:
        forwarder.unblock()
        for op in (a, b):
            if op.process is not None and op.process.poll() is None:
                op.stop()
        handed_back = json.loads(kube.kubectl("-n", RELEASE_NAMESPACE, "get", "lease", lease, "-o", "json").stdout)["spec"]
        operator.start()
    assert not handed_back.get("holderIdentity"), f"b stopped cleanly and hands the Lease back: {handed_back}"
