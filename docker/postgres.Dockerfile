# syntax=docker/dockerfile:1
# The Postgres member image: Debian's postgresql-15 and postgresql-15-repmgr plus
# kubefly, whose `kubefly postgres member` is the entrypoint (PID 1: postgres
# and repmgrd are its children and die with it).
#
# BASE_IMAGE is any Debian bookworm image. Where the package registries are
# reached through a TLS-intercepting proxy, pass its CA bundle as a build
# secret (never baked into the image):
#   docker build --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt -f docker/postgres.Dockerfile .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# curl: repmgr starts/stops postgres through the member's local /ctl API.
# pgbackrest: WAL archiving and base backups to the object store (docs/postgres.md).
RUN --mount=type=secret,id=cacert,required=false \
    if [ -s /run/secrets/cacert ]; then \
      echo 'Acquire::https::CAInfo "/run/secrets/cacert";' > /etc/apt/apt.conf.d/99kubefly-cacert; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      postgresql-15 postgresql-15-repmgr pgbackrest python3 python3-venv ca-certificates curl \
 && rm -f /etc/apt/apt.conf.d/99kubefly-cacert \
 && rm -rf /var/lib/apt/lists/*
# The Debian default cluster is never used: members initialise or clone their own.
RUN if pg_lsclusters -h | grep -q '^15 main'; then pg_dropcluster 15 main; fi

COPY pyproject.toml README.md /src/
COPY operator/kubefly /src/operator/kubefly
RUN --mount=type=secret,id=cacert,required=false \
    cert=; [ -s /run/secrets/cacert ] && cert=/run/secrets/cacert; \
    python3 -m venv /opt/kubefly \
 && PIP_CERT=$cert /opt/kubefly/bin/pip install /src \
 && rm -rf /src

# The data volume (pgdata, run, log, repmgr.conf, pgbackrest/) is mounted here, writable by
# the postgres user (uid/gid of Debian's postgres package; fsGroup in the pod).
ENV KUBEFLY_PG_DATA_DIR=/data \
    KUBEFLY_PG_PORT=5432 \
    KUBEFLY_PG_HEALTH_PORT=5500
VOLUME /data
EXPOSE 5432 5500
# Runs as the postgres user: the member then skips dropping privileges.
# The member starts as root so it can take ownership of the volume (a local
# PersistentVolume is root-owned); it runs postgres and repmgr as `postgres`.
ENTRYPOINT ["/opt/kubefly/bin/kubefly", "postgres", "member"]
