# syntax=docker/dockerfile:1
# The kubefly image: one package, one entry point (`kubefly operator|agent|proxy|dns`),
# and restic, which the snapshot pods run against the object store (docs/objectstore.md).
#
# BASE_IMAGE is any Debian bookworm image: the registry's debian:bookworm-slim
# where one is reachable, a locally built debootstrap rootfs where none is.
# Where PyPI is reached through a TLS-intercepting proxy, pass its CA bundle as
# a build secret (never baked into the image):
#   docker build --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt -f docker/kubefly.Dockerfile .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates restic \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY operator/kubefly /src/operator/kubefly
RUN --mount=type=secret,id=cacert,required=false \
    cert=; [ -s /run/secrets/cacert ] && cert=/run/secrets/cacert; \
    python3 -m venv /opt/kubefly \
 && PIP_CERT=$cert /opt/kubefly/bin/pip install /src \
 && rm -rf /src

# A named user: Kopf's peering identity (getpass.getuser) needs a passwd entry.
RUN groupadd --system --gid 65532 kubefly \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kubefly
USER 65532:65532
ENTRYPOINT ["/opt/kubefly/bin/kubefly"]
