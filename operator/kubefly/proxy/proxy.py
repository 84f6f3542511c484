"""The proxy's two roles in one process.

Edge: a request entered here. Resolve the Host header to an app, rank its
instances (routing.order), try the best one; on "full" (an instance at its
hard limit) or a refused connection, try the next at once; when everything is
full, wait for a freed slot within a bounded budget, then answer 503.

Host: this proxy runs on the instance's host and owns the instance's
concurrency count. An instance on this host is reached directly (no extra
hop); one on another host is reached through that host's proxy, which answers
"full" (503 + `kubefly-full`) instead of queueing.
"""

from __future__ import annotations

import asyncio
import hmac
import operator
import random
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Protocol

from kubefly import logs
from kubefly.instances import ConcurrencyType, Instance, InstanceState
from kubefly.proxy import http1, metrics, routing
from kubefly.proxy.config import Config
from kubefly.proxy.server import Request
from kubefly.proxy.upstream import Pool, UpstreamConn, UpstreamError, UpstreamTimeout



def log():
    # Bound lazily: a logger bound before logs.configure() would keep the default renderer.
    return logs.get("kubefly.proxy")

AppKey = tuple[str, str]


class Replica(Protocol):
    """What the proxy reads from the local gossip replica."""

    self_host: str
    self_region: str

    def instances(self, org: str | None = None, app: str | None = None) -> list[Instance]: ...
    def apps(self) -> set[tuple[str, str]]: ...
    def rtt(self, host: str) -> float | None: ...
    def host_ip(self, host: str) -> str | None: ...


class Starter(Protocol):
    """Sets a machine's desired state (autostart, autostop)."""

    async def start(self, instance: Instance) -> None: ...
    async def stop(self, instance: Instance) -> None: ...


class Outcome(Enum):
    full = "full"  # the instance is at its hard limit, or no longer on that host
    retry = "retry"  # the request never reached the instance: safe to reissue


class Replay:
    __slots__ = ("region", "instance", "elsewhere")

    def __init__(self, region: str | None, instance: str | None, elsewhere: bool):
        self.region = region
        self.instance = instance
        self.elsewhere = elsewhere


class Binding:
    """A slot an open client connection holds on one instance (concurrency type
    "connections"): taken by the connection's first request there, released when
    the connection closes. Towards another host it owns a hop connection of its
    own, so that host counts it as one open connection too."""

    __slots__ = ("app", "upstream", "_release")

    def __init__(self, app: AppKey, release: Callable[[], None]):
        self.app = app
        self.upstream: UpstreamConn | None = None
        self._release = release

    def take(self) -> UpstreamConn | None:
        conn, self.upstream = self.upstream, None
        if conn is not None and not conn.closed:
            conn.reused = True
            return conn
        return None

    def keep(self, conn: UpstreamConn) -> None:
        if conn.closed or not conn.reusable:
            conn.close()
        else:
            self.upstream = conn

    def release(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        self._release()


def parse_replay(value: bytes) -> Replay | None:
    """`fly-replay: region=ams;instance=abc;elsewhere=true`; None if it says nothing usable."""
    fields = {}
    for part in value.decode("latin-1").split(";"):
        k, _, v = part.strip().partition("=")
        if k:
            fields[k.strip().lower()] = v.strip()
    region = fields.get("region", "").split(",")[0] or None
    replay = Replay(region, fields.get("instance") or None, fields.get("elsewhere", "").lower() == "true")
    if not (replay.region or replay.instance or replay.elsewhere):
        return None
    return replay


# The edge acts on fly-replay; the client never sees it.
REPLAY_DROP = http1.DROP | {b"fly-replay"}
# Client-supplied copies of what the edge asserts are dropped, not trusted.
EDGE_DROP = http1.DROP | frozenset(
    {
        b"x-forwarded-for",  # re-added with the client appended
        b"forwarded",
        b"fly-client-ip",
        b"fly-region",
        b"fly-request-id",
        b"fly-forwarded-port",
        b"fly-replay-src",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-forwarded-host",
        b"x-forwarded-ssl",
    }
)


def resolve_app(host: bytes | None, domain: str, apps: dict[str, set[str]]) -> tuple[AppKey | None, str]:
    """Map a Host header to (org, app), or None and the reason.

    `<app>.<org>.<domain>` always names one app; `<app>.<domain>` works while
    exactly one org has an app of that name, and is refused as ambiguous
    otherwise (never routed to a guessed org).
    """
    if not host:
        return None, "no Host header"
    name = host.decode("latin-1").strip().lower()
    if name.startswith("["):
        name = name[: name.find("]") + 1]
    else:
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    suffix = "." + domain.lower()
    if not name.endswith(suffix):
        return None, f"{name} is not under {domain}"
    labels = name[: -len(suffix)].split(".")
    if len(labels) == 1:
        orgs = apps.get(labels[0], set())
        if len(orgs) == 1:
            return (next(iter(orgs)), labels[0]), ""
        if len(orgs) > 1:
            return None, f"app {labels[0]} exists in several orgs: use {labels[0]}.<org>.{domain}"
        return None, f"no app {labels[0]}"
    if len(labels) == 2 and labels[1] in apps.get(labels[0], set()):
        return (labels[1], labels[0]), ""
    return None, f"no app at {name}"


def _not_woken(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(False)


class Proxy:
    def __init__(
        self,
        replica: Replica,
        config: Config,
        *,
        starter: Starter | None = None,
        report_load: Callable[[dict[tuple[str, str], int]], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
        hop_port: int = 4281,
    ):
        self.replica = replica
        self.config = config
        self.starter = starter
        self.report_load = report_load
        self.rng = rng or random.Random()
        self.hop_port = hop_port  # this proxy's own: every host's proxy listens on the same one
        self._unaddressed: set[str] = set()
        self._replay_held = 0  # bytes of request bodies held for a retry (Config.replay_budget_bytes)
        self.pool = Pool(connect_timeout=config.connect_timeout_s, idle_timeout=config.pool_idle_s)
        # Exact concurrency of instances on this host (edge and host roles share it).
        self.local_load: dict[tuple[str, str], int] = defaultdict(int)
        # This edge's requests in flight to instances on other hosts.
        self.outstanding: dict[tuple[str, str], int] = defaultdict(int)
        self.app_inflight: dict[AppKey, int] = defaultdict(int)
        self.waiters: dict[AppKey, deque[asyncio.Future]] = defaultdict(deque)
        self._starting: dict[tuple[str, str], asyncio.Task] = {}
        self._apps: dict[str, set[str]] = {}
        self._apps_stamp = -1.0
        self._apps_domain = ""
        self._load_dirty = asyncio.Event()
        self._idle_seen: set[tuple[str, str]] = set()
        self._deadlines: dict[asyncio.Task, float] = {}
        self._expired: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._resolved: dict[bytes | None, tuple[AppKey | None, str]] = {}
        self._region_src: str | None = None
        self._region_bytes = b""
        self._cands: dict[AppKey, tuple[list[Instance], list[routing.Candidate]]] = {}
        self._public_apps: dict[AppKey, tuple[list[Instance], bool]] = {}

    @property
    def _region(self) -> bytes:
        region = self.replica.self_region
        if region is not self._region_src:  # encoded once, not per request
            self._region_src, self._region_bytes = region, region.encode()
        return self._region_bytes

    # -- replica views ---------------------------------------------------------
    def load(self, inst: Instance) -> int:
        return self._load(inst.key, inst.host, inst.load, routing.http_service(inst))

    def _candidate_load(self, c: routing.Candidate) -> int:
        return self._load(c.key, c.host, c.instance.load, c.service)

    def _load(self, key: tuple[str, str], host: str, gossiped: int, service) -> int:
        if host == self.replica.self_host:
            return self.local_load.get(key, 0)
        if service is not None and service.hard_limit is not None:
            # A gossiped load is a little old: it ranks an instance but never rules it
            # out; its host says "full" if it really is. Only this edge's own requests
            # in flight, which it knows exactly, can make it skip an instance unasked.
            gossiped = min(gossiped, service.hard_limit - 1)
        return max(gossiped, self.outstanding.get(key, 0))

    def _candidates(self, app: AppKey, instances: list[Instance]) -> list[routing.Candidate]:
        """The app's candidates, rebuilt only when its rows change (the replica hands out
        the same row objects until then)."""
        hit = self._cands.get(app)
        if hit is not None and (
            hit[0] is instances or (len(hit[0]) == len(instances) and all(map(operator.is_, hit[0], instances)))
        ):
            return hit[1]
        cands = routing.candidates(instances)
        self._cands[app] = (instances, cands)
        return cands

    def rtt(self, host: str) -> float | None:
        if host == self.replica.self_host:
            return 0.0
        return self.replica.rtt(host)

    def _resolve(self, host: bytes | None, domain: str) -> tuple[AppKey | None, str]:
        # The replica changes at gossip speed: the name index is rebuilt at most every
        # 100 ms, and Host headers already resolved against it cost one dict lookup.
        now = time.monotonic()
        if now - self._apps_stamp > 0.1 or domain != self._apps_domain:
            index: dict[str, set[str]] = {}
            public: dict[AppKey, tuple[list[Instance], bool]] = {}
            for key in self.replica.apps():
                # An app whose machines have only private services (no public http port)
                # has no name at the edge: it is "no app", not a 503 that confirms it exists.
                if self._public(key, public):
                    index.setdefault(key[1], set()).add(key[0])
            self._public_apps = public
            if index != self._apps or domain != self._apps_domain:
                self._apps, self._apps_domain = index, domain
                self._resolved = {}
            self._apps_stamp = now
        hit = self._resolved.get(host)
        if hit is None:
            hit = resolve_app(host, domain, self._apps)
            if len(self._resolved) > 10_000:  # random Host headers must not grow it without bound
                self._resolved = {}
            self._resolved[host] = hit
        return hit

    def _public(self, key: AppKey, out: dict[AppKey, tuple[list[Instance], bool]]) -> bool:
        """Whether any machine of the app has a service the edge serves; recomputed only when its rows change."""
        rows = self.replica.instances(*key)
        hit = self._public_apps.get(key)
        if hit is not None and len(hit[0]) == len(rows) and all(map(operator.is_, hit[0], rows)):
            out[key] = hit
            return hit[1]
        out[key] = (rows, any(routing.http_service(i) is not None for i in rows))
        return out[key][1]

    # -- local slots -------------------------------------------------------------
    def acquire(self, inst: Instance, hard: int | None) -> bool:
        n = self.local_load.get(inst.key, 0)
        if hard is not None and n >= hard:
            return False
        self.local_load[inst.key] = n + 1
        self._load_dirty.set()
        return True

    def release(self, inst: Instance) -> None:
        n = self.local_load.get(inst.key, 0) - 1
        if n <= 0:
            self.local_load.pop(inst.key, None)
        else:
            self.local_load[inst.key] = n
        self._load_dirty.set()
        waiters = self.waiters.get((inst.org, inst.app))
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                break

    async def _wait_for_slot(self, app: AppKey, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        waiters = self.waiters[app]
        waiters.append(fut)
        # A timer handle rather than asyncio.timeout(): when every instance is full this
        # runs for each waiting request many times a second.
        timer = loop.call_later(timeout, _not_woken, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if fut.cancelled() or not fut.done() or fut.result() is False:  # not woken by a release: still in line
                fut.cancel()
                try:
                    waiters.remove(fut)
                except ValueError:
                    pass  # a release took it out of line as it was being cancelled

    # -- edge ---------------------------------------------------------------------
    async def edge(self, req: Request) -> None:
        cfg = self.config
        started = time.monotonic()
        app, reason = self._resolve(req.header(b"host"), cfg.domain)
        if app is None:
            self._answer(req, 404, f"kubefly: {reason}\n", b"unknown-app")
            return
        if self.app_inflight[app] >= cfg.app_max_inflight:
            self._answer(req, 503, f"kubefly: app {app[1]} is over its concurrency budget at this proxy\n", b"app-budget")
            self._count(app, 503)
            return
        self.app_inflight[app] += 1
        status = 0
        loop = req.conn.loop
        task = asyncio.current_task(loop)
        self._deadlines[task] = started + cfg.total_timeout_s
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep())
        try:
            status = await self._route(req, app, cfg, started)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            task.uncancel()
            status = 504
            if not req.conn.busy_writing:
                self._answer(req, 504, "kubefly: request timed out\n", b"timeout")
            else:
                req.conn.close()
        finally:
            self._deadlines.pop(task, None)
            self.app_inflight[app] -= 1
            self._count(app, status or 499, time.monotonic() - started)

    async def _sweep(self) -> None:
        """Cancel requests past their total timeout.

        One sweep a second instead of a timer per request: asyncio.timeout()
        costs more than the rest of a small request's routing.
        """
        while self._deadlines:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for task, deadline in list(self._deadlines.items()):
                if deadline < now:
                    del self._deadlines[task]
                    self._expired.add(task)
                    task.cancel()

    def _count(self, app: AppKey, status: int, seconds: float | None = None) -> None:
        stats = metrics.REQUESTS.stats(app)
        stats.answered(status)
        if seconds is not None:
            stats.observe(seconds)

    def _forward_head(self, req: Request, request_id: bytes) -> bytes:
        """The request's end-to-end headers plus what the edge asserts, serialized once
        (an attempt, a hop or a replay only appends lines to it), in one pass."""
        kept = []
        xff = prior = None
        host = b""
        has_connection = False
        for h in req.headers:
            name = h[0]
            if name not in EDGE_DROP:
                kept.append(h)
                if name == b"host":
                    host = h[1]
            elif name == b"x-forwarded-for":
                xff = h[1]
            elif name == b"forwarded":
                prior = h[1]
            elif name == b"connection":
                has_connection = True
        if has_connection:  # rare: the Connection header may name more hop-by-hop headers
            kept = http1.end_to_end(kept + [h for h in req.headers if h[0] == b"connection"], EDGE_DROP)
        client = req.conn.peer.encode()
        port = req.conn.local_port
        fwd = b'for="%s";proto=http;host="%s"' % (client, host)
        return http1.serialize_headers(kept) + (
            b"x-forwarded-for: %s\r\nforwarded: %s\r\nx-forwarded-proto: http\r\nx-forwarded-host: %s\r\n"
            b"x-forwarded-port: %s\r\nfly-client-ip: %s\r\nfly-forwarded-port: %s\r\nfly-region: %s\r\n"
            b"fly-request-id: %s\r\n"
        ) % (
            xff + b", " + client if xff else client,
            prior + b", " + fwd if prior else fwd,
            host, port, client, port, self._region, request_id,
        )

    async def _read_for_replay(self, req: Request, cfg: Config) -> tuple[bytes, bool, int]:
        """The body, whole if it fits the per-request replay limit and what is left of the proxy's
        replay budget (else it streams, not replayable); and the bytes held against the budget."""
        if req.body.empty:
            return b"", True, 0
        reserved = max(0, min(cfg.replay_body_limit, cfg.replay_budget_bytes - self._replay_held))
        self._replay_held += reserved
        try:
            body, replayable = await req.body.read_upto(reserved)
        except BaseException:
            self._replay_held -= reserved
            raise
        self._replay_held -= reserved - len(body)
        metrics.REPLAY_HELD.set(self._replay_held)
        return body, replayable, len(body)

    def _release_replay(self, held: int) -> None:
        if held:
            self._replay_held -= held
            metrics.REPLAY_HELD.set(self._replay_held)

    async def _route(self, req: Request, app: AppKey, cfg: Config, started: float) -> int:
        body, replayable, held = await self._read_for_replay(req, cfg)
        try:
            return await self._route_body(req, app, cfg, started, body, replayable)
        finally:
            self._release_replay(held)

    async def _route_body(self, req: Request, app: AppKey, cfg: Config, started: float, body: bytes,
                          replayable: bool) -> int:
        org, name = app
        # Unique enough to follow a request through logs; not a secret, so no syscall for entropy.
        request_id = b"%016x-%s" % (self.rng.getrandbits(64), self._region)
        base = head = None  # built at the first attempt: a request refused at once never needs it
        forced = req.header(b"fly-force-instance-id")
        force = forced.decode("latin-1").strip() or None if forced else None
        prefer = req.header(b"fly-prefer-region")
        region = (prefer.decode("latin-1").strip() if prefer else "") or self.replica.self_region
        deadline = started + cfg.retry_budget_s
        exclude: set[tuple[str, str]] = set()
        attempts = replays = 0
        while True:
            instances = self.replica.instances(org, name)
            if force is not None:
                instances = [i for i in instances if force in (i.machine_id, i.instance_id)]
                if not instances:
                    return self._answer(req, 404, f"kubefly: app {name} has no instance {force}\n", b"no-instance")
            cands = routing.candidates(instances) if force is not None else self._candidates(app, instances)
            strategy = cfg.strategy_for(org, name, len(instances))
            sticky = self._sticky(req.conn.bindings, instances, exclude) if req.conn.bindings else None
            if sticky is not None:
                choices, under_soft = [sticky], True
            elif strategy == routing.CLOSEST:
                # Only the best candidate is tried; after "full" the edge asks again.
                best, under_soft = routing.pick(
                    cands, region=region, load=self._candidate_load, rtt=self.rtt, rng=self.rng, exclude=exclude
                )
                choices = [best] if best is not None else []
            else:
                choices = routing.order(
                    cands, region=region, load=self._candidate_load, rtt=self.rtt, rng=self.rng, strategy=strategy,
                    sample=cfg.sample, exclude=exclude,
                )
                under_soft = not routing.all_above_soft(choices)
            if force is None and not under_soft and self.starter is not None:
                candidate = routing.autostart_candidate(instances, region=region, rtt=self.rtt)
                waiting = self._autostart(candidate) if candidate is not None else None
                # Nothing can serve now: hold the request until a machine passes its checks,
                # the one started for it or one already on its way up (started for an
                # earlier request, here or at another edge, or by its owner).
                coming = candidate if candidate is not None or cands else self._coming(instances)
                if not choices and coming is not None:
                    if not await self._wait_started(waiting, coming, started + cfg.autostart_timeout_s):
                        return self._answer(req, 503, f"kubefly: app {name} did not start in time\n", b"autostart")
                    continue
            if not choices:
                if not cands:
                    return self._answer(req, 503, f"kubefly: app {name} has no started instance\n", b"no-instance")
                remaining = deadline - time.monotonic()
                capacity = sum(c.service.hard_limit or 0 for c in cands)
                if remaining <= 0 or attempts >= cfg.max_attempts or len(self.waiters[app]) >= max(capacity, 1):
                    return self._answer(req, 503, f"kubefly: every instance of {name} is at its limit\n", b"full")
                # A slot frees on this host (wake-up) or a peer's load report changes (re-check).
                await self._wait_for_slot(app, min(remaining, 0.05))
                exclude.clear()
                continue
            choice = choices[0]
            attempts += 1
            if base is None:
                base = head = self._forward_head(req, request_id)
            result = await self._attempt(req, choice, head, body, replayable, cfg, request_id)
            if isinstance(result, int):
                return result
            if isinstance(result, Replay):
                replays += 1
                if replays > cfg.max_replays:
                    return self._answer(req, 502, "kubefly: too many replays\n", b"replay-chain")
                head = base + b"fly-replay-src: instance=%s;region=%s\r\n" % (
                    choice.instance.machine_id.encode(), choice.instance.region.encode())
                force = result.instance
                if result.region:
                    region = result.region
                exclude = {choice.instance.key} if result.elsewhere else set()
                attempts = 0
                deadline = time.monotonic() + cfg.retry_budget_s
                continue
            if result is Outcome.full:
                metrics.FULL.labels(org, name).inc()
            if not replayable or attempts >= cfg.max_attempts or time.monotonic() >= deadline:
                return self._answer(req, 503, f"kubefly: no instance of {name} could take the request\n", b"full")
            metrics.RETRIES.labels(org, name).inc()
            if force is None:
                exclude.add(choice.instance.key)
            else:
                await asyncio.sleep(0.01)  # forced to one instance: let it free a slot

    def _autostart(self, inst: Instance) -> asyncio.Task:
        task = self._starting.get(inst.key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._start(inst))
            self._starting[inst.key] = task
            task.add_done_callback(lambda _t, key=inst.key: self._starting.pop(key, None))
        return task

    async def _start(self, inst: Instance) -> None:
        log().info("autostart", org=inst.org, app=inst.app, machine=inst.machine_id, region=inst.region)
        metrics.AUTOSTARTS.labels(inst.org, inst.app).inc()
        try:
            await self.starter.start(inst)
        except Exception as exc:
            log().warning("autostart failed", org=inst.org, app=inst.app, machine=inst.machine_id, error=str(exc))

    def _coming(self, instances: list[Instance]) -> Instance | None:
        """An instance on its way up, or on its way down (it can be started once stopped),
        that could then take the request."""
        for inst in instances:
            if inst.state in (InstanceState.starting, InstanceState.stopping) and routing.http_service(inst) is not None:
                return inst
        return None

    async def _wait_started(self, task: asyncio.Task | None, inst: Instance, deadline: float) -> bool:
        """Until the instance is routable (True), or, when waiting on one this request did not
        start (no task), until it is stopped (so the caller starts it) or gone (the caller
        looks again); False at the deadline."""
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + deadline - time.monotonic()):
                if task is not None:
                    await asyncio.shield(task)
                # The replica shows the instance routable once its host's agent sees it pass its checks.
                while True:
                    row = next((i for i in self.replica.instances(inst.org, inst.app)
                                if i.machine_id == inst.machine_id), None)
                    if row is not None and row.routable:
                        return True
                    if task is None and (row is None or row.state in (InstanceState.stopped, InstanceState.created)):
                        return True
                    await asyncio.sleep(0.05)
        except TimeoutError:
            return False

    async def _attempt(self, req, choice, head, body, replayable, cfg, request_id):
        inst, service = choice.instance, choice.service
        local = inst.host == self.replica.self_host
        if local:
            target = (inst.address, service.internal_port)
        else:
            target = self._hop_target(inst)
            if target is None:
                return Outcome.retry
            head = head + b"%s: %s/%s/%s\r\n" % (
                http1.H_INSTANCE, inst.org.encode(), inst.app.encode(), inst.machine_id.encode())
            if cfg.hop_token:
                head += b"%s: %s\r\n" % (http1.H_HOP_TOKEN, cfg.hop_token.encode())
        if service.concurrency_type is ConcurrencyType.connections:
            return await self._attempt_bound(req, inst, service, local, target, head, body, replayable, cfg, request_id)
        if local:
            if not self.acquire(inst, service.hard_limit):
                return Outcome.full
            try:
                return await self._exchange(req, target, head, body, replayable, cfg, request_id, edge=True)
            finally:
                self.release(inst)
        self.outstanding[inst.key] += 1
        try:
            return await self._exchange(req, target, head, body, replayable, cfg, request_id, edge=True)
        finally:
            self._unoutstand(inst.key)

    def _hop_target(self, inst: Instance) -> tuple[str, int] | None:
        """Where the instance's host proxy takes hops: the host's IP as its agent
        advertises it (member data in the replica), on the platform's hop port."""
        ip = self.replica.host_ip(inst.host)
        if ip is None:
            if inst.host not in self._unaddressed:  # once per host, not per request
                self._unaddressed.add(inst.host)
                log().warning("agent knows no address for host: its instances are skipped", host=inst.host)
            return None
        return ip, self.config.hop_port or self.hop_port

    def _unoutstand(self, key: tuple[str, str]) -> None:
        n = self.outstanding[key] - 1
        if n:
            self.outstanding[key] = n
        else:
            del self.outstanding[key]

    async def _attempt_bound(self, req, inst, service, local, target, head, body, replayable, cfg, request_id):
        """Concurrency type "connections": the client connection holds one slot on the
        instance from its first request there until it closes, however many requests it sends."""
        bindings = req.conn.bindings
        binding = bindings.get(inst.key)
        if binding is None:
            if local:
                if not self.acquire(inst, service.hard_limit):
                    return Outcome.full
                binding = Binding((inst.org, inst.app), lambda: self.release(inst))
            else:
                self.outstanding[inst.key] += 1
                binding = Binding((inst.org, inst.app), lambda key=inst.key: self._unoutstand(key))
            bindings[inst.key] = binding
        result = await self._exchange(
            req, target, head, body, replayable, cfg, request_id, edge=True, binding=None if local else binding
        )
        if isinstance(result, (Outcome, Replay)) and bindings.get(inst.key) is binding:
            # Not served there (full, unreachable, replayed elsewhere): the slot goes back at once.
            del bindings[inst.key]
            binding.release()
        return result

    def _sticky(self, bindings: dict, instances: list[Instance], exclude) -> routing.Choice | None:
        """The instance this client connection already holds a slot on, if it can still serve."""
        for inst in instances:
            if inst.key in bindings and inst.key not in exclude and inst.routable:
                service = routing.http_service(inst)
                if service is not None:
                    load = self.load(inst)
                    return routing.Choice(inst, service, load, routing.band(load, service), 0.0)
        return None

    # -- one upstream exchange -------------------------------------------------------
    async def _exchange(self, req, target, headers, body, replayable, cfg, request_id, *, edge: bool,
                        binding: Binding | None = None):
        """Send the request, stream the answer back. Returns a status, Outcome or Replay.

        `edge`: this proxy took the client's connection, so it acts on
        `fly-replay` and adds the request id; a host hop passes both through.
        `binding`: the upstream connection is the binding's own, never pooled.
        """
        for fresh in (False, True):
            conn = self.pool.idle_conn(target) if binding is None else binding.take()
            if conn is None:
                try:
                    conn = await self.pool.connect(*target)
                except UpstreamError:
                    return Outcome.retry
            try:
                return await self._send(req, conn, headers, body, replayable, cfg, request_id, edge, binding)
            except asyncio.CancelledError:
                conn.close()  # the request's total timeout: this exchange is abandoned mid-way
                raise
            except UpstreamTimeout:
                conn.close()
                if req.conn.busy_writing:
                    req.conn.close()
                    return 504
                return self._answer(req, 504, "kubefly: instance did not answer in time\n", b"timeout")
            except UpstreamError as exc:
                conn.close()
                if exc.sent or not replayable:
                    if req.conn.busy_writing:
                        req.conn.close()
                        return 502
                    return self._answer(req, 502, f"kubefly: instance failed: {exc}\n", b"upstream")
                if fresh or not conn.reused:
                    return Outcome.retry
                # A pooled connection the instance had already closed: one more try on a new one.
        return Outcome.retry

    async def _send(self, req, conn: UpstreamConn, headers, body, replayable, cfg, request_id, edge, binding=None):
        client = req.conn
        conn.begin(req.method == b"HEAD", cfg.idle_timeout_s, cfg.response_timeout_s)
        lines = [b"%s %s HTTP/1.1\r\n" % (req.method, req.target), headers]
        if req.upgrade:
            lines.append(b"connection: upgrade\r\nupgrade: %s\r\n" % (req.header(b"upgrade") or b""))
        if replayable:
            if body or not req.body.empty:
                lines.append(b"content-length: %d\r\n" % len(body))
            lines.append(b"\r\n")
            lines.append(body)
            conn.write(b"".join(lines))
        else:
            lines.append(b"transfer-encoding: chunked\r\n\r\n" if req.body.chunked else b"content-length: %d\r\n\r\n" % req.body.length)
            conn.write(b"".join(lines))
            while True:
                piece = await req.body.read()
                if not piece:
                    break
                conn.write(http1.chunk(piece) if req.body.chunked else piece)
                await conn.drain()
            if req.body.chunked:
                conn.write(http1.LAST_CHUNK)
        status, rheaders = await conn.head()
        # A host proxy, or the app itself, says it is at its limit: try elsewhere.
        if status == 503 and http1.get(rheaders, http1.H_FULL) is not None:
            conn.reusable = False
            conn.close()
            return Outcome.full
        block, length, replay = http1.response_headers(rheaders, REPLAY_DROP if edge else http1.DROP)
        if edge and replay is not None and replayable and not req.upgrade:
            directive = parse_replay(replay)
            if directive is not None:
                conn.reusable = False
                conn.close()
                return directive
        if status == 101 and req.upgrade:
            return await self._tunnel(req, conn, rheaders)
        no_body = http1.status_has_no_body(status, req.method)
        keep = req.keep_alive and not client.draining and not req.upgrade
        out = [http1.status_line(status), block]
        if edge:
            out.append(b"fly-request-id: %s\r\n" % request_id)
        chunked = False
        if length is not None and (not no_body or req.method == b"HEAD"):
            out.append(b"content-length: %s\r\n" % length)
        elif not no_body:
            if req.version == "1.1":
                chunked = True
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                keep = False  # HTTP/1.0 client: the end of the body is the end of the connection
        out.append(b"connection: keep-alive\r\n\r\n" if keep else b"connection: close\r\n\r\n")
        req.keep_alive = keep
        client.busy_writing = True
        if not no_body:
            # Head and the body read with it leave in one write (one syscall for small answers).
            early = conn.early_body()
            if early:
                out.append(http1.chunk(early) if chunked else early)
            if chunked and conn.finished:
                out.append(http1.LAST_CHUNK)
                chunked = False
        client.write(b"".join(out))
        if not no_body and not conn.finished:  # more body to come (most small answers are complete here)
            def sink(data: bytes, _chunked=chunked) -> None:
                client.write(http1.chunk(data) if _chunked else data)
                if client.write_paused:
                    conn.pause()
                    client.on_writable = conn.resume

            conn.set_sink(sink)
        await conn.done()
        if chunked:
            client.write(http1.LAST_CHUNK)
        client.busy_writing = False
        if not req.body.done:
            # The instance answered before reading the whole body: the connection cannot be reused.
            conn.reusable = False
        if binding is None:
            self.pool.release(conn)
        else:
            binding.keep(conn)
        return status

    async def _tunnel(self, req, conn: UpstreamConn, rheaders) -> int:
        client = req.conn
        client.write(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            + http1.serialize_headers([h for h in rheaders if h[0] not in (b"content-length",)])
            + b"\r\n"
        )
        closed = asyncio.get_running_loop().create_future()

        def finish() -> None:
            if not closed.done():
                closed.set_result(None)
            conn.close()
            client.close()

        conn.start_tunnel(client.write, finish)
        client.start_tunnel(conn.write_raw, finish)
        # Bytes the client sent with the upgrade request belong to the tunnel.
        await closed
        return 101

    def _answer(self, req: Request, status: int, text: str, code: bytes) -> int:
        req.conn.write(
            http1.simple_response(
                status, text.encode(), keep_alive=req.keep_alive and req.body.done, extra=[(b"kubefly-error", code)]
            )
        )
        return status

    # -- host role ------------------------------------------------------------------
    async def host(self, req: Request) -> None:
        """A hop from an edge proxy for an instance on this host: enforce its limit, forward."""
        cfg = self.config
        if cfg.hop_token and not hmac.compare_digest(req.header(http1.H_HOP_TOKEN) or b"", cfg.hop_token.encode()):
            self._answer(req, 403, "kubefly: not a kubefly edge\n", b"hop-token")
            return
        # org/app/machine: the app narrows the lookup to its own rows (org/machine,
        # from an older edge, scans the org's).
        parts = (req.header(http1.H_INSTANCE) or b"").decode("latin-1").split("/")
        org, machine = parts[0], parts[-1]
        rows = self.replica.instances(org, parts[1]) if len(parts) == 3 else self.replica.instances(org)
        inst = next(
            (i for i in rows if i.machine_id == machine and i.host == self.replica.self_host and i.routable), None
        )
        service = routing.http_service(inst) if inst is not None else None
        bindings = req.conn.bindings
        # Concurrency type "connections": this hop connection (one per client
        # connection at the edge) holds one slot until it closes.
        per_conn = service is not None and service.concurrency_type is ConcurrencyType.connections
        held = per_conn and inst.key in bindings
        if inst is None or service is None or not (held or self.acquire(inst, service.hard_limit)):
            req.conn.write(
                http1.simple_response(503, b"", keep_alive=req.keep_alive and req.body.done, extra=[(http1.H_FULL, b"1")])
            )
            return
        if per_conn and not held:
            bindings[inst.key] = Binding((inst.org, inst.app), lambda: self.release(inst))
        held = 0
        try:
            body, replayable, held = await self._read_for_replay(req, cfg)
            # Only an edge that proved itself asserts who the client is.
            headers = http1.serialize_headers(http1.end_to_end(req.headers, http1.DROP if cfg.hop_token else EDGE_DROP))
            request_id = req.header(b"fly-request-id") or b""
            result = await self._exchange(
                req, (inst.address, service.internal_port), headers, body, replayable, cfg, request_id, edge=False
            )
            if result is Outcome.retry or result is Outcome.full:
                req.conn.write(
                    http1.simple_response(503, b"", keep_alive=req.keep_alive, extra=[(http1.H_FULL, b"1")])
                )
                binding = bindings.pop(inst.key, None) if per_conn else None
                if binding is not None:
                    binding.release()
        finally:
            self._release_replay(held)
            if not per_conn:
                self.release(inst)

    # -- background: load reports and autostop ---------------------------------------
    async def report_loads(self) -> None:
        """Publish this host's instance loads to the replica, coalesced to at most 10 per second."""
        if self.report_load is None:
            return
        while True:
            await self._load_dirty.wait()
            self._load_dirty.clear()
            try:
                await self.report_load(dict(self.local_load) | self._zeroes())
            except Exception as exc:
                log().warning("load report failed", error=str(exc))
            await asyncio.sleep(0.1)

    def _zeroes(self) -> dict[tuple[str, str], int]:
        return {i.key: 0 for i in self.replica.instances() if i.host == self.replica.self_host and i.key not in self.local_load}

    async def autostop_pass(self) -> list[Instance]:
        """Stop idle machines: one per region and app, decided by one proxy per region.

        The decider is the proxy on the lowest-named host holding a started
        instance of the app in that region, so proxies do not stop several at
        once. An instance must be idle on two passes in a row.
        """
        if self.starter is None:
            return []
        stopped = []
        idle_now: set[tuple[str, str]] = set()
        for org, app in sorted(self.replica.apps()):
            instances = self.replica.instances(org, app)
            for victim in routing.autostop_victims(instances, self.load):
                peers = [i.host for i in instances if i.region == victim.region and i.state.value == "started"]
                if min(peers) != self.replica.self_host:
                    continue
                idle_now.add(victim.key)
                if victim.key not in self._idle_seen:
                    continue
                log().info("autostop", org=org, app=app, machine=victim.machine_id, region=victim.region)
                try:
                    await self.starter.stop(victim)
                except Exception as exc:
                    log().warning("autostop failed", org=org, app=app, machine=victim.machine_id, error=str(exc))
                    continue
                metrics.AUTOSTOPS.labels(org, app).inc()
                stopped.append(victim)
        self._idle_seen = idle_now - {v.key for v in stopped}
        return stopped

    async def autostop_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.autostop_interval_s)
            await self.autostop_pass()
