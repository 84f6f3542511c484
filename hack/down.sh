#!/usr/bin/env bash
# `make down`: delete what `make up` started: the kind cluster, or the operator
# process and the local control plane.
set -euo pipefail
cd "$(dirname "$0")/.."
state=.cluster
if [ -f "$state/operator.pid" ]; then
  pid=$(cat "$state/operator.pid")
  kill "$pid" 2>/dev/null && echo "[down] operator (pid $pid) stopped" || true
  rm -f "$state/operator.pid"
fi
.venv/bin/python -m kubefly.devcluster down
bash hack/kind/down.sh
