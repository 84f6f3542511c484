#!/usr/bin/env bash
# Makes a Docker daemon available for kind: installs Debian's docker.io,
# containerd and runc where they are missing (hack/os-packages-kind.txt),
# puts runc-kubefly in front of runc only where this machine needs it
# (CAP_SYS_RESOURCE absent from the bounding set), and starts dockerd if it is
# not running (systemd where it runs, else a background process logging to
# ~/.cache/kubefly/kind/logs/dockerd.log). Prints one line saying what it did.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

bash "$repo/hack/install-os-deps.sh" "$repo/hack/os-packages-kind.txt" >&2

daemon_json=/etc/docker/daemon.json
wrapper=/usr/local/sbin/runc-kubefly
changed=false
if needs_runc_wrapper; then
  w=$(runc_wrapper)
  if ! cmp -s "$w" "$wrapper"; then $sudo install -m 0755 "$w" "$wrapper"; changed=true; fi
  runtime="runc-kubefly (CAP_SYS_RESOURCE is absent from this machine's capability bounding set)"
  # Merge into any existing daemon.json rather than replace it.
  want=$(python3 - "$daemon_json" "$wrapper" <<'PY'
import json, os, sys
path, wrapper = sys.argv[1], sys.argv[2]
conf = json.load(open(path)) if os.path.exists(path) else {}
conf.setdefault("runtimes", {})["runc-kubefly"] = {"path": wrapper}
conf["default-runtime"] = "runc-kubefly"
print(json.dumps(conf, indent=2, sort_keys=True))
PY
)
  if [ "$want" != "$(cat "$daemon_json" 2>/dev/null)" ]; then
    $sudo mkdir -p /etc/docker; echo "$want" | $sudo tee "$daemon_json" >/dev/null; changed=true
  fi
else
  runtime="runc unchanged (this machine has CAP_SYS_RESOURCE)"
fi

# `docker build --secret` needs BuildKit's client, which Debian's docker.io lacks.
plugin=/usr/local/lib/docker/cli-plugins/docker-buildx
if ! docker buildx version >/dev/null 2>&1; then
  bash "$repo/hack/build-tools.sh" buildx >/dev/null
  $sudo mkdir -p "$(dirname "$plugin")"; $sudo ln -sf "$bin/docker-buildx" "$plugin"
fi

# Every kind node runs systemd, the kubelet and kube-proxy, each holding inotify
# instances; at Linux's default of 128 per user, a second cluster on the machine
# makes kube-proxy exit with "too many open files". Raised only where lower.
inotify=""
for kv in fs.inotify.max_user_instances=512 fs.inotify.max_user_watches=524288; do
  k=${kv%=*} v=${kv#*=}
  if [ "$(sysctl -n "$k")" -lt "$v" ]; then $sudo sysctl -qw "$kv"; inotify="$inotify; $k raised to $v"; fi
done

pidfile="$kcache/dockerd.pid"
ours() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
start() {
  if [ -d /run/systemd/system ]; then
    $sudo systemctl restart docker
  else
    # No init system here: run dockerd in the background, detached from this shell.
    $sudo setsid nohup dockerd >>"$kcache/logs/dockerd.log" 2>&1 </dev/null &
    echo $! > "$pidfile"
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  die "dockerd did not answer within 60s; see $kcache/logs/dockerd.log"
}

state="running"
if ! docker info >/dev/null 2>&1; then
  start; state="started"
elif $changed; then
  if ours; then
    $sudo kill "$(cat "$pidfile")"
    for _ in $(seq 30); do ours || break; sleep 1; done
    start
  elif [ -d /run/systemd/system ]; then
    start
  else
    die "dockerd is running but not from here, and $daemon_json changed: restart it to use runc-kubefly"
  fi
  state="restarted"
fi
# The one line `make kind-up` shows about the machine.
log "docker: dockerd $(docker version -f '{{.Server.Version}}') $state; runtime: $runtime$inotify"
