"""AppSecrets on kind: sealed values reach the environment of the app's real
pods, and a change rolls the started machines one at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from .kindlib import RELEASE_NAMESPACE, KindCluster
from .test_kind_machines import machine

KUBEFLY = Path(sys.executable).with_name("kubefly")
APP = "sec"


def seal(kind: KindCluster, namespace: str, *pairs: str) -> dict:
    proc = subprocess.run([str(KUBEFLY), "secrets", "seal", "-n", namespace, "--app", APP,
                           "--home-namespace", RELEASE_NAMESPACE, *pairs],
                          capture_output=True, text=True, env={**os.environ, "KUBECONFIG": str(kind.kubeconfig)})
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def get(kind: KindCluster, *args: str) -> dict:
    return json.loads(kind.kubectl(*args, "-o", "json").stdout)


def cond(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def settled(m: dict) -> bool:
    return (m.get("status") or {}).get("state") == "started" and (cond(m, "Ready") or {}).get("status") == "True"


def machines(kind: KindCluster, namespace: str) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in get(kind, "-n", namespace, "get", "machines")["items"]}


def env_of(kind: KindCluster, namespace: str, pod: str, key: str) -> str:
    return kind.kubectl("-n", namespace, "exec", pod, "-c", "machine", "--", "printenv", key, check=False).stdout.strip()


def test_secret_values_reach_the_pods_env_and_a_change_rolls_machines_one_at_a_time(kind: KindCluster, namespace: str):
    kind.kubectl("apply", "-f", "-", input=json.dumps(seal(kind, namespace, "TOKEN=v1")))
    kind.wait_for("the AppSecret Ready", lambda: (cond(get(kind, "-n", namespace, "get", "appsecret", APP), "Ready") or {})
                  .get("status") == "True")
    names = {"sec-1": "ams", "sec-2": "iad", "sec-3": "syd"}
    specs = [machine(kind, name, region) for name, region in names.items()]
    for spec in specs:
        spec["spec"]["app"] = APP
    kind.apply(specs, namespace)
    kind.wait_for("three started machines", lambda: len(ms := machines(kind, namespace)) == 3 and all(map(settled, ms.values())),
                  timeout=180)
    kind.wait_for("no roll in progress", lambda: not get(kind, "-n", namespace, "get", "appsecret", APP)["status"].get("rollout"))
    assert {n: env_of(kind, namespace, n, "TOKEN") for n in names} == {n: "v1" for n in names}
    before = {n: m["status"]["instanceId"] for n, m in machines(kind, namespace).items()}
    digest = get(kind, "-n", namespace, "get", "appsecret", APP)["status"]["digest"]

    # Watch while rolling: never more than one machine out of service for the roll.
    out_max, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            out_max[0] = max(out_max[0], sum(1 for m in machines(kind, namespace).values() if not settled(m)))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        kind.kubectl("apply", "-f", "-", input=json.dumps(seal(kind, namespace, "TOKEN=v2")))
        kind.wait_for("the roll to finish", lambda: (s := get(kind, "-n", namespace, "get", "appsecret", APP))["status"]
                      .get("digest") != digest and (cond(s, "RolledOut") or {}).get("status") == "True"
                      and not s["status"].get("rollout"), timeout=300)
    finally:
        stop.set()
        watcher.join()
    after = machines(kind, namespace)
    assert all(after[n]["status"]["instanceId"] != before[n] for n in names), "every started machine is a new instance"
    assert out_max[0] <= 1, f"{out_max[0]} machines were out of service at once"
    assert {n: env_of(kind, namespace, n, "TOKEN") for n in names} == {n: "v2" for n in names}
