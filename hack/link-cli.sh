#!/usr/bin/env bash
# `make up`'s `kubefly` on PATH: links this checkout's .venv/bin/kubefly into the
# tools directory (~/.cache/kubefly/bin, beside kubectl, helm and kind), the one
# directory the quick start puts on PATH. Prints that directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${KUBEFLY_CACHE:-$HOME/.cache/kubefly}/bin
cli="$repo/.venv/bin/kubefly"
[ -x "$cli" ] || { echo "[up] $cli is missing: run make venv" >&2; exit 1; }
mkdir -p "$bin"
ln -sfn "$cli" "$bin/kubefly"
echo "$bin"
