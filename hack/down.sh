#!/usr/bin/env bash
# `make down`: delete what `make up` started: the kind cluster, or the operator
# process and the local control plane.
set -euo pipefail
cd "$(dirname "$0")/.."
state=.cluster
if [ -f "$state/operator.pid" ]; then
  pid=$(cat "$state/operator.pid")
  if kill "$pid" 2>/dev/null; then
    # Kopf drains on SIGTERM; one that hangs (its cluster gone) is killed.
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    echo "[down] operator (pid $pid) stopped"
  fi
  rm -f "$state/operator.pid"
fi
.venv/bin/python -m kubefly.devcluster down
bash hack/kind/down.sh
