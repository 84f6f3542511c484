"""Pure routing decisions: which instance a request should try, in which order.

Nothing here does I/O. The proxy hands in the instance rows it read from the
local replica, a load function (exact counts for its own host, the gossiped
figure plus its own outstanding requests for other hosts) and an RTT function.

Order (strategy `closest`, the default):
  1. instances in the request's region (the proxy's own region, or the one
     `fly-prefer-region` names): under the soft limit, then between soft and
     hard; least loaded first, then closest by RTT, ties random;
  2. other regions, only after every local one: closest region first, then
     least loaded (soft limits never push traffic across regions);
  instances believed to be at their hard limit are left out.
Strategy `leastload` (apps with many instances) ranks a random sample instead
of every instance, so a pick costs O(sample), not O(n log n).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum

from kubefly.instances import Instance, InstanceState, Service

# Unknown RTT sorts after every measured one but keeps ordering total.
UNKNOWN_RTT = 1e9

CLOSEST = "closest"
LEASTLOAD = "leastload"
STRATEGIES = (CLOSEST, LEASTLOAD)


class Band(IntEnum):
    """The three load bands the proxy acts on (as on the seed platform)."""

    under_soft = 0
    soft = 1
    full = 2


def band(load: int, service: Service) -> Band:
    if service.hard_limit is not None and load >= service.hard_limit:
        return Band.full
    if load >= service.soft_limit:
        return Band.soft
    return Band.under_soft


def http_service(instance: Instance) -> Service | None:
    """The service the HTTP proxy routes to: the one with an http handler on port 80, else
    the first with an http handler on any public port, else none.

    Never a service without public ports: those are private (a Postgres member's
    5432), and must not answer at `<app>.<org>.<domain>`.
    """
    found = None
    for service in instance.services:
        if 80 in service.http_ports:
            return service
        if found is None and service.http_ports:
            found = service
    return found


@dataclass(slots=True)  # not frozen: frozen dataclasses are slow to build, and this runs per request
class Choice:
    instance: Instance
    service: Service
    load: int
    band: Band
    rtt: float


class Candidate:
    """An instance that can take traffic, with what routing reads from it on every
    request, looked up once per instance row rather than once per request."""

    __slots__ = ("instance", "key", "service", "region", "host")

    def __init__(self, instance: Instance, service: Service):
        self.instance = instance
        self.key = instance.key
        self.service = service
        self.region = instance.region
        self.host = instance.host


def candidates(instances: Iterable[Instance]) -> list[Candidate]:
    """The routable instances that have an HTTP service."""
    out = []
    for inst in instances:
        if inst.routable:
            service = http_service(inst)
            if service is not None:
                out.append(Candidate(inst, service))
    return out


def _rated(
    cands: Iterable[Candidate],
    load: Callable[[Candidate], int],
    rtt: Callable[[str], float | None],
    exclude: Container[tuple[str, str]],
) -> Iterator[tuple[Candidate, int, Band, float]]:
    """Each candidate that is not excluded nor at its hard limit, with its load, band and RTT."""
    for c in cands:
        if exclude and c.key in exclude:
            continue
        current = load(c)
        b = band(current, c.service)
        if b is not Band.full:
            measured = rtt(c.host)
            yield c, current, b, UNKNOWN_RTT if measured is None else measured


def order(
    cands: Iterable[Candidate],
    *,
    region: str,
    load: Callable[[Candidate], int],
    rtt: Callable[[str], float | None],
    rng: random.Random,
    strategy: str = CLOSEST,
    sample: int = 8,
    exclude: Container[tuple[str, str]] = (),
) -> list[Choice]:
    """The candidates to try, best first. An empty list means nothing can take the request now."""
    local: list[Choice] = []
    remote: list[Choice] = []
    for c, current, b, r in _rated(cands, load, rtt, exclude):
        (local if c.region == region else remote).append(Choice(c.instance, c.service, current, b, r))
    if strategy == LEASTLOAD:
        return _sampled(local, sample, rng) + _sampled(remote, sample, rng)
    # A random key per choice breaks ties without biasing toward replica order.
    local.sort(key=lambda c: (c.band, c.load, c.rtt, rng.random()))
    remote.sort(key=lambda c: (c.band, c.rtt, c.load, rng.random()))
    return local + remote


def pick(
    cands: Iterable[Candidate],
    *,
    region: str,
    load: Callable[[Candidate], int],
    rtt: Callable[[str], float | None],
    rng: random.Random,
    exclude: Container[tuple[str, str]] = (),
) -> tuple[Choice | None, bool]:
    """The first candidate `order` (strategy closest) would return, found in one pass
    without ranking the rest, and whether any candidate is under its soft limit.

    The edge asks again after each "full" answer (loads change meanwhile), so it
    only ever needs the best one; ties are broken uniformly at random.
    """
    best: tuple | None = None
    best_key: tuple | None = None
    ties = 0
    under_soft = False
    for c, current, b, r in _rated(cands, load, rtt, exclude):
        if b is Band.under_soft:
            under_soft = True
        key = (0, b, current, r) if c.region == region else (1, b, r, current)
        if best_key is None or key < best_key:
            best_key, best, ties = key, (c, current, b, r), 1
        elif key == best_key:
            ties += 1
            if rng.random() * ties < 1:  # reservoir sampling: each tie kept with chance 1/ties
                best = (c, current, b, r)
    if best is None:
        return None, under_soft
    c, current, b, r = best
    return Choice(c.instance, c.service, current, b, r), under_soft


def _sampled(choices: list[Choice], sample: int, rng: random.Random) -> list[Choice]:
    if len(choices) <= sample:
        picked, rest = choices, []
    else:
        idx = set(rng.sample(range(len(choices)), sample))
        picked = [c for i, c in enumerate(choices) if i in idx]
        rest = [c for i, c in enumerate(choices) if i not in idx]
        rng.shuffle(rest)
    picked = sorted(picked, key=lambda c: (c.band, c.load, c.rtt, rng.random()))
    return picked + rest


def all_above_soft(choices: Sequence[Choice]) -> bool:
    return all(c.band is not Band.under_soft for c in choices)


def autostart_candidate(
    instances: Iterable[Instance], *, region: str, rtt: Callable[[str], float | None]
) -> Instance | None:
    """A stopped (or created, never booted) instance with autostart, in the request's
    region if any, else the closest."""
    best: tuple[int, float, str] | None = None
    found = None
    for inst in instances:
        if inst.state is not InstanceState.stopped and inst.state is not InstanceState.created:
            continue
        service = http_service(inst)
        if service is None or not service.autostart:
            continue
        measured = rtt(inst.host)
        key = (0 if inst.region == region else 1, UNKNOWN_RTT if measured is None else measured, inst.machine_id)
        if best is None or key < best:
            best, found = key, inst
    return found


def autostop_victims(
    instances: Sequence[Instance], load: Callable[[Instance], int]
) -> list[Instance]:
    """Idle instances of ONE app to stop in this pass: at most one per region.

    A region keeps one more started instance than it has busy (over-soft)
    ones; only idle instances (load 0) with autostop are stopped; the app never
    goes below its minimum running.
    """
    started = [i for i in instances if i.state is InstanceState.started]
    if not started:
        return []
    minimum = max((s.min_machines_running for i in started for s in i.services), default=0)
    running = len(started)
    victims = []
    by_region: dict[str, list[Instance]] = {}
    for inst in started:
        by_region.setdefault(inst.region, []).append(inst)
    for region in sorted(by_region):
        members = by_region[region]
        busy = 0
        idle = []
        for inst in members:
            service = http_service(inst)
            if service is None:
                continue
            current = load(inst)
            if band(current, service) is not Band.under_soft:
                busy += 1
            if current == 0 and service.autostop != "off":
                idle.append(inst)
        excess = len(members) - (busy + 1)
        # A lone idle instance is stopped too: nothing is using it.
        if (excess >= 1 or len(members) == 1) and idle and running > minimum:
            victims.append(min(idle, key=lambda i: i.machine_id))
            running -= 1
    return victims
