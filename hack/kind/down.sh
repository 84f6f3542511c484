#!/usr/bin/env bash
# `make kind-down`: delete the kind cluster (caches and images stay).
#   hack/kind/down.sh [--name NAME]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
name=$(awk '/^name:/ {print $2}' "$repo/kind-config.yaml")
[ "${1:-}" = --name ] && name=$2
if command -v docker >/dev/null && docker info >/dev/null 2>&1 && kind get clusters 2>/dev/null | grep -qx "$name"; then
  kind delete cluster --name "$name" >&2
  log "cluster $name deleted"
fi
rm -f "$kcache/$name.kubeconfig" "$kcache/$name.images"
