"""The Pod a Machine runs as: a pure function of the Machine, its host and its secrets.

The pod is pinned to the host by required node affinity (not `nodeName`), so
the scheduler still checks resources, taints and local-volume affinity. It
tolerates its host going NotReady/unreachable for ever: a machine stays on its
host, as on Fly, and the Machine's conditions say the host is lost, instead of
the pod being evicted and recreated somewhere it can never start.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from kubefly import API_VERSION, labels
from kubefly.api.machine import Stop
from kubefly.instances import Service as InstanceService
from kubefly.machines.dns_config import pod_dns
from kubefly.machines.volume_prep import volume_prep
from kubefly.placement.machines import guest_requests
from kubefly.secrets.digest import combined_digest

SECRETS_DIGEST = f"{labels.PREFIX}/secrets-digest"
# Digest of everything the pod is built from, so a spec change shows as a differing pod.
SPEC_DIGEST = f"{labels.PREFIX}/spec-digest"
CONTAINER = "machine"
# The pod's readiness gate: the host agent runs every check of the machine and
# writes this condition (True when all pass). Same name as the annotation that
# lists the checks. Kubernetes allows one readiness probe per container, and a
# probe failing in the kubelet would also hide the machine from the agent.
CHECKS_GATE = labels.CHECKS
ROUTED_GATE = labels.ROUTED


def readiness_gates(pod: dict) -> set[str]:
    """The condition types a pod (API JSON) names in spec.readinessGates."""
    return {g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or []}


def routed_condition(routed: bool, now: str) -> dict:
    """The pod condition behind the routed gate: True once the host agent has published the
    instance; False (written by the operator) when its host was lost, so that a host that comes
    back does not count its machines Ready before its agent has published them again."""
    if routed:
        return {"type": ROUTED_GATE, "status": "True", "reason": "Published",
                "message": "the host agent published this instance to the proxies and .internal DNS",
                "lastTransitionTime": now}
    return {"type": ROUTED_GATE, "status": "False", "reason": "HostLost",
            "message": "its host was lost; Ready again once the host's agent has published it",
            "lastTransitionTime": now}
RESTART_POLICY = {"no": "Never", "always": "Always", "on-failure": "OnFailure"}
DEFAULT_STOP_SIGNAL = Stop().signal  # Fly's SIGINT


def stop_hook(signal: str, timeout_seconds: int) -> dict | None:
    """The container lifecycle that sends the machine's stop signal to its main process.

    Kubernetes' own `lifecycle.stopSignal` (KEP-4960) is alpha and off in v1.36 and
    needs a runtime that honours it, so a preStop hook sends the signal: the kubelet
    runs the hook before its own SIGTERM and waits up to the grace period. When PID 1
    exits, its PID namespace (the hook with it) goes too, so the hook only has to
    outlast the grace period. From inside the namespace PID 1 gets a signal only if it
    handles it, just as with the runtime's signal from outside. SIGTERM is what the
    runtime sends anyway: no hook.
    """
    if signal == "SIGTERM":
        return None
    name = signal.removeprefix("SIG")
    return {"preStop": {"exec": {"command": ["/bin/sh", "-c", f"kill -s {name} 1 && exec sleep {timeout_seconds}"]}}}


@dataclass(frozen=True)
class SecretRef:
    app_secret: str
    secret_name: str
    digest: str


def spec_digest(spec: dict) -> str:
    """The part of the spec a pod is built from; `state` and `metadata` do not need a new pod."""
    relevant = {k: v for k, v in spec.items() if k not in ("state", "metadata")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def instance_id(uid: str, version: int) -> str:
    """Deterministic, so a restarted operator re-creates exactly what it meant to."""
    return hashlib.sha256(f"{uid}/{version}".encode()).hexdigest()[:16]


def services_annotation(services: list[dict]) -> str:
    out = []
    for svc in services:
        conc = svc.get("concurrency") or {}
        out.append(
            InstanceService(
                internal_port=svc["internalPort"],
                protocol=svc.get("protocol", "tcp"),
                ports=[p["port"] for p in svc.get("ports") or []],
                http_ports=[p["port"] for p in svc.get("ports") or [] if "http" in (p.get("handlers") or [])],
                concurrency_type=conc.get("type", "connections"),
                soft_limit=conc.get("softLimit", 20),
                hard_limit=conc.get("hardLimit"),
                autostart=svc.get("autostart", True),
                autostop=svc.get("autostop", "off"),
                min_machines_running=svc.get("minMachinesRunning", 0),
            ).model_dump(mode="json")
        )
    return json.dumps(out, separators=(",", ":"))


def build_pod(
    machine: dict,
    *,
    host: str,
    region: str,
    instance: str,
    secrets: list[SecretRef],
    claim: str | None = None,
    routed_gate: bool = False,
) -> dict:
    """`routed_gate`: host agents run, and the pod is Ready only once its host's agent published it."""
    meta, spec = machine["metadata"], machine["spec"]
    name, namespace = meta["name"], meta["namespace"]
    cpu_millis, memory_mib = guest_requests(spec.get("guest"))
    cpu_limit = (spec.get("guest") or {}).get("cpus", 1)
    checks = spec.get("checks") or []
    mounts = spec.get("mounts") or []
    env = [{"name": k, "value": v} for k, v in sorted((spec.get("env") or {}).items())]
    env += [
        {"name": "FLY_APP_NAME", "value": spec["app"]},
        {"name": "FLY_MACHINE_ID", "value": name},
        {"name": "FLY_REGION", "value": region},
        {"name": "FLY_MACHINE_VERSION", "value": instance},
    ]
    container: dict = {
        "name": CONTAINER,
        "image": spec["image"],
        "env": env,
        "envFrom": [{"secretRef": {"name": ref.secret_name}} for ref in sorted(secrets, key=lambda r: r.app_secret)],
        "resources": {
            "requests": {"cpu": f"{cpu_millis}m", "memory": f"{memory_mib}Mi"},
            "limits": {"cpu": str(cpu_limit), "memory": f"{memory_mib}Mi"},
        },
        "ports": [
            {"containerPort": svc["internalPort"], "protocol": svc.get("protocol", "tcp").upper()}
            for svc in spec.get("services") or []
        ],
    }
    stop = spec.get("stop") or {}
    grace = stop.get("timeoutSeconds", 5)
    if hook := stop_hook(stop.get("signal", DEFAULT_STOP_SIGNAL), grace):
        container["lifecycle"] = hook
    volumes = []
    prep: dict = {}
    if mounts and claim:
        container["volumeMounts"] = [{"name": "data", "mountPath": mounts[0]["path"]}]
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": claim}})
        prep = volume_prep("data", mounts[0]["path"])

    pod_labels = {
        labels.APP: spec["app"],
        labels.MACHINE: name,
        labels.REGION: region,
        labels.HOST: host,
        labels.MANAGED_BY: labels.MANAGED_BY_VALUE,
    }
    if mounts:
        pod_labels[labels.VOLUME] = mounts[0]["volume"]
    restart = (spec.get("restart") or {}).get("policy", "on-failure")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": pod_labels,
            "annotations": {
                labels.INSTANCE_ID: instance,
                labels.SERVICES: services_annotation(spec.get("services") or []),
                labels.CHECKS: json.dumps(checks, separators=(",", ":"), sort_keys=True),
                SECRETS_DIGEST: combined_digest((ref.app_secret, ref.digest) for ref in secrets),
                SPEC_DIGEST: spec_digest(spec),
            },
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "Machine",
                    "name": name,
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [container],
            **prep,
            # Every check gates readiness (never liveness: a failing check never restarts the machine).
            # The agent writes the checks gate after publishing the verdict, so it also means routed.
            **({"readinessGates": [{"conditionType": CHECKS_GATE}]} if checks else
               {"readinessGates": [{"conditionType": ROUTED_GATE}]} if routed_gate else {}),
            "volumes": volumes,
            "restartPolicy": RESTART_POLICY[restart],
            "terminationGracePeriodSeconds": grace,
            "enableServiceLinks": False,
            **pod_dns(namespace),
            # A machine has no business with the Kubernetes API.
            "automountServiceAccountToken": False,
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [host]}]}
                        ]
                    }
                }
            },
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
            ],
        },
    }
