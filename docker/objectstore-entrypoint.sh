#!/bin/sh
# The bundled object store's entry point (docker/objectstore.Dockerfile).
#
#   kubefly-objectstore [WEED-MINI-FLAGS...]   the store: one `weed mini`
#   kubefly-objectstore relay [PORT TARGET]    PORT on the pod's addresses (default 8333) to
#                                              TARGET on loopback (default 8334)
#
# The store's master, volume server and filer take unauthenticated requests (on
# their gRPC ports too), and tenants' Machines can reach any pod address, so the
# store listens on loopback only. Only its S3 gateway, which checks the identities
# in s3.json, is reachable from outside the pod: through the relays, more containers
# in the same pod: 8333 to its plain port 8334, 8443 to its TLS port 8444 (weed
# refuses a port that any address already holds, so the gateway cannot share them).
#
# s3.json changes whenever a tenant is granted or revoked (kubefly.objectstore.access);
# weed reloads it on SIGHUP, so the store runs in the background and this shell sends
# one when the file's content changes (checked every KUBEFLY_OBJECTSTORE_POLL seconds).
#
# KUBEFLY_OBJECTSTORE_BUCKET: the bucket created at start (default kubefly).
# KUBEFLY_OBJECTSTORE_CONFIG: the identity file (default /etc/kubefly-objectstore/s3.json).
# KUBEFLY_OBJECTSTORE_TLS: the directory of tls.crt and tls.key (default /etc/kubefly-objectstore-tls).
set -eu

if [ "${1:-}" = relay ]; then
  exec socat "TCP-LISTEN:${2:-8333},fork,reuseaddr,max-children=64" "TCP:127.0.0.1:${3:-8334}"
fi

config=${KUBEFLY_OBJECTSTORE_CONFIG:-/etc/kubefly-objectstore/s3.json}
tls=${KUBEFLY_OBJECTSTORE_TLS:-/etc/kubefly-objectstore-tls}
poll=${KUBEFLY_OBJECTSTORE_POLL:-2}

# Off: what kubefly does not use (WebDAV, the Iceberg and Lance catalogs, the admin
# UI, IAM writes) and the report to telemetry.seaweedfs.com. Metrics are read-only,
# so they are served on every address, for Prometheus. Flags given to this script
# come last and win (the component tests move ports and paths).
weed mini -dir=/data -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -s3.port=8334 -s3.port.https=8444 -s3.cert.file="$tls/tls.crt" -s3.key.file="$tls/tls.key" \
  -s3.config="$config" -s3.iam.readOnly=true \
  -bucket="${KUBEFLY_OBJECTSTORE_BUCKET:-kubefly}" \
  -metricsIp=0.0.0.0 -metricsPort=9327 \
  -master.telemetry=false -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
  "$@" &
weed=$!
trap 'kill -TERM "$weed" 2>/dev/null || true' TERM INT

# A Secret volume swaps the whole directory at once, so a changed sum is a complete new file.
seen=$(cksum <"$config")
while kill -0 "$weed" 2>/dev/null; do
  sleep "$poll" &
  wait $! || true  # a TERM interrupts the wait; the loop then sees weed leaving
  now=$(cksum <"$config" 2>/dev/null) || continue
  if [ "$now" != "$seen" ]; then
    seen=$now
    echo "kubefly-objectstore: $config changed, reloading identities" >&2
    kill -HUP "$weed" || true
  fi
done
status=0
wait "$weed" || status=$?
exit "$status"
