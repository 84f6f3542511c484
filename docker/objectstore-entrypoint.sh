#!/bin/sh
# The bundled object store's entry point (docker/objectstore.Dockerfile).
#
#   kubefly-objectstore [WEED-MINI-FLAGS...]   the store: one `weed mini`
#   kubefly-objectstore relay                  S3 on the pod's port 8333, to the store
#
# The store's master, volume server and filer take unauthenticated requests (on
# their gRPC ports too), and tenants' Machines can reach any pod address, so the
# store listens on loopback only. Only its S3 gateway, which checks the identities
# in s3.json, is reachable from outside the pod: through the relay, a second
# container in the same pod. The gateway is on 8334 because weed refuses a port
# that any address already holds (the relay's 8333).
#
# KUBEFLY_OBJECTSTORE_BUCKET: the bucket created at start (default kubefly).
set -eu

if [ "${1:-}" = relay ]; then
  exec socat TCP-LISTEN:8333,fork,reuseaddr,max-children=64 TCP:127.0.0.1:8334
fi

# Off: what kubefly does not use (WebDAV, the Iceberg and Lance catalogs, the admin
# UI) and the report to telemetry.seaweedfs.com. Metrics are read-only, so they are
# served on every address, for Prometheus.
exec weed mini -dir=/data -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -s3.port=8334 -s3.config=/etc/kubefly-objectstore/s3.json \
  -bucket="${KUBEFLY_OBJECTSTORE_BUCKET:-kubefly}" \
  -metricsIp=0.0.0.0 -metricsPort=9327 \
  -master.telemetry=false -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
  "$@"
