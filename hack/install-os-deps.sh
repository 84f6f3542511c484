#!/usr/bin/env bash
# Installs the Debian packages listed in hack/os-packages.txt (or the list
# file given as the argument, e.g. hack/os-packages-kind.txt) that are missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t pkgs < <(grep -vE '^\s*(#|$)' "${1:-$here/os-packages.txt}")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then echo "[os-deps] all ${#pkgs[@]} packages present"; exit 0; fi
echo "[os-deps] installing: ${missing[*]}"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts a default cluster on install; kubefly runs its own Postgres processes.
if command -v pg_lsclusters >/dev/null && systemctl is-active --quiet postgresql 2>/dev/null; then
  $sudo systemctl stop postgresql || true
fi
echo "[os-deps] done"
