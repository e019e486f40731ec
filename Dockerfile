# Lastmile gateway image. Build: docker build -t lastmile .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /var/lib/lastmile lastmile \
    && mkdir -p /var/lib/lastmile/spool /etc/lastmile/rules \
    && chown -R lastmile /var/lib/lastmile
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/gateway.yaml /etc/lastmile/gateway.yaml
COPY bridge-rules/ /etc/lastmile/rules/
USER lastmile
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
STOPSIGNAL SIGTERM
ENTRYPOINT ["lastmile"]
CMD ["serve", "--config", "/etc/lastmile/gateway.yaml"]
