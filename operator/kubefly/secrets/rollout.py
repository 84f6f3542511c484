"""Rolling an app's started machines onto new secret values, one at a time (pure).

The AppSecret controller drives it: each step reads the app's machines and the
roll's progress (kept in AppSecret status so an operator restart resumes it)
and gets one decision. A machine is rolled by setting the annotation
`kubefly.dev/secrets-digest` on the Machine to the combined digest its pod must
carry; the Machine controller replaces the pod. The next machine waits until
that one is Ready again as a new instance.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kubefly.labels import PREFIX
from kubefly.secrets.digest import combined_digest

DIGEST_ANNOTATION = f"{PREFIX}/secrets-digest"


@dataclass(frozen=True)
class AppSecretView:
    name: str
    digest: str


@dataclass(frozen=True)
class MachineView:
    name: str
    started: bool
    ready: bool
    instance_id: str | None
    secrets: tuple[str, ...] | None  # spec.secrets; None: every AppSecret of the app
    digest: str | None  # what the machine runs (or was last told to run)

    def gets(self, appsecret: str) -> bool:
        return self.secrets is None or appsecret in self.secrets


@dataclass(frozen=True)
class Progress:
    machine: str
    from_instance_id: str | None


@dataclass(frozen=True)
class Wait:
    machine: str


@dataclass(frozen=True)
class Roll:
    machine: str
    digest: str
    from_instance_id: str | None


@dataclass(frozen=True)
class Done:
    pass


def desired_digest(machine: MachineView, appsecrets: Iterable[AppSecretView]) -> str:
    return combined_digest((s.name, s.digest) for s in appsecrets if machine.gets(s.name))


def next_step(
    appsecret: str, appsecrets: list[AppSecretView], machines: list[MachineView], progress: Progress | None
) -> Wait | Roll | Done:
    by_name = {m.name: m for m in machines}
    if progress is not None:
        current = by_name.get(progress.machine)
        # A machine deleted or stopped meanwhile is not waited for: it picks the
        # values up when it next starts.
        if current is not None and current.started:
            if not (current.ready and current.instance_id != progress.from_instance_id):
                return Wait(current.name)
    for machine in sorted(machines, key=lambda m: m.name):
        if not machine.started or not machine.gets(appsecret):
            continue
        target = desired_digest(machine, appsecrets)
        if machine.digest != target:
            return Roll(machine.name, target, machine.instance_id)
    return Done()
