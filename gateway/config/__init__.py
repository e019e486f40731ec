"""Gateway configuration: load config/gateway.yaml, apply env overrides, validate.

Environment overrides (values parsed as YAML scalars):

- ``LASTMILE_<SECTION>__<KEY>...`` sets any key by its path, e.g.
  ``LASTMILE_LISTENERS__MQTT__PORT=1884`` or
  ``LASTMILE_KAFKA__CLUSTERS__DEFAULT__BOOTSTRAP_SERVERS=kafka-1:9092``.
- Shorthands for what changes per deployment: ``LASTMILE_BOOTSTRAP_SERVERS``
  (the ``default`` cluster), ``LASTMILE_MQTT_PORT``, ``LASTMILE_HTTP_PORT``,
  ``LASTMILE_WORKERS``, ``LASTMILE_SPOOL_DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway.config.schema import Cluster, Config, TlsListener
from gateway.config.yamlsrc import SourceMap, convert, parse_yaml
from gateway.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "max_record_bytes", "producer_settings"]

# librdkafka refuses a record when key + value + headers + this framing bound exceed
# the producer's message.max.bytes (RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD, rdkafka_proto.h).
RECORD_FRAMING = 36
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
# Kept free in every accepted record for the headers a dead-letter copy adds after an
# ack (reason, detail cut to DEAD_LETTER_DETAIL_BYTES, topic): that copy must fit too.
DEAD_LETTER_ROOM = 1024
DEAD_LETTER_DETAIL_BYTES = 512
# Between an edge limit (MQTT packet, HTTP body) and the record limit: room for the key
# and headers rules add (client id, username, constants).  A record that rules make
# larger still is refused after routing, before any ack (docs/contract.md).
RULE_ROOM = 8 << 10
_EDGE_LIMITS = ("max_packet_size", "http_max_body_bytes")
_PROPAGATION = "topic.metadata.propagation.max.ms"

ENV_PREFIX = "LASTMILE_"
SHORTHANDS: dict[str, tuple[str, ...]] = {
    "LASTMILE_BOOTSTRAP_SERVERS": ("kafka", "clusters", "default", "bootstrap_servers"),
    "LASTMILE_MQTT_PORT": ("listeners", "mqtt", "port"),
    "LASTMILE_HTTP_PORT": ("listeners", "http", "port"),
    "LASTMILE_WORKERS": ("workers",),
    "LASTMILE_SPOOL_DIR": ("spool", "dir"),
}


def _env_overrides(env: Mapping[str, str]) -> list[tuple[str, tuple[str, ...], Any]]:
    found = []
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if name in SHORTHANDS:
            path = SHORTHANDS[name]
        elif "__" in name:
            path = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        else:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid value {raw!r}", file=f"${name}") from exc
        found.append((name, path, value))
    return found


def _apply(data: dict[str, Any], path: tuple[str, ...], value: Any, name: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("cannot override inside a non-mapping", file=f"${name}")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the gateway config; ``path=None`` means all defaults."""
    env = os.environ if env is None else env
    file = str(path) if path is not None else "<defaults>"
    if path is None:
        data: Any = {}
        smap = SourceMap(file)
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config: {exc.strerror}", file=file) from exc
        data, smap = parse_yaml(text, file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise smap.error("the config must be a mapping of sections")
    overrides = _env_overrides(env)
    for name, key_path, value in overrides:
        _apply(data, key_path, value, name)
    try:
        config = convert(data, Config, smap)
    except ConfigError as exc:
        # Name the env var when the bad key came from one.
        for name, key_path, _ in overrides:
            if exc.key == ".".join(key_path):
                raise ConfigError(exc.reason, file=f"${name}", key=exc.key) from exc
        raise
    _check(config, smap)
    _fit_to_kafka(config, smap, data)
    return config


def _check_auth(config: Config, smap: SourceMap) -> None:
    """Anonymous access off needs a way in: a password file, JWTs or client certificates."""
    auth = config.auth
    jwt = auth.jwt
    if jwt is not None:
        if not (jwt.jwks_file or jwt.jwks_url):
            raise smap.error("give jwks_file or jwks_url", ("auth", "jwt"))
        from gateway.auth.jwks import check_config

        try:
            check_config(jwt)  # no "none", no HMAC with a public key, sane timings
        except ConfigError as exc:
            raise smap.error(exc.reason, tuple(exc.key.split("."))) from exc
    if auth.allow_anonymous:
        return
    mtls = any(
        listener.enabled and listener.require_client_cert
        for listener in (config.listeners.mqtts, config.listeners.https)
    )
    if not (auth.password_file or jwt is not None or mtls):
        raise smap.error(
            "false, but no client could ever authenticate: set auth.password_file or auth.jwt, "
            "require client certificates on a TLS listener, or say allow_anonymous: true",
            ("auth", "allow_anonymous"))


TLS_LISTENERS = ("mqtts", "https")


def _check_tls(listener: TlsListener, section: str, smap: SourceMap) -> None:
    """An enabled TLS listener's files load and belong together, checked before serving."""
    if not listener.enabled:
        return
    path = ("listeners", section)
    for key in ("certfile", "keyfile"):
        if not getattr(listener, key):
            raise smap.error(f"{key} is required when the listener is enabled",
                             (*path, key))
    if listener.require_client_cert and not listener.cafile:
        raise smap.error("require_client_cert needs a cafile (the CAs clients' certificates "
                         "come from)", (*path, "require_client_cert"))
    from gateway.tls import TlsFileError, build_context

    try:
        build_context(listener)
    except TlsFileError as exc:
        raise smap.error(f"{exc.file}: {exc.reason}", (*path, exc.key)) from exc


def _check(config: Config, smap: SourceMap) -> None:
    """Cross-field checks msgspec cannot express."""
    if config.workers < 1:
        raise smap.error("must be at least 1", ("workers",))
    if not config.kafka.clusters:
        raise smap.error("at least one cluster is required", ("kafka", "clusters"))
    for section in ("mqtt", "mqtts", "http", "https", "metrics"):
        listener = getattr(config.listeners, section)
        if not 0 <= listener.port <= 65535:
            raise smap.error("port out of range 0-65535", ("listeners", section, "port"))
    for section in TLS_LISTENERS:
        _check_tls(getattr(config.listeners, section), section, smap)
    _check_auth(config, smap)
    if config.buffer.low_water_bytes >= config.buffer.high_water_bytes:
        raise smap.error("must be below high_water_bytes", ("buffer", "low_water_bytes"))
    for name, cluster in config.kafka.clusters.items():
        try:
            producer_settings(cluster)
        except ConfigError as exc:
            raise smap.error(exc.reason, ("kafka", "clusters", name, "producer", exc.key)) from exc
        if not cluster.bootstrap_servers.strip():
            raise smap.error("must not be empty", ("kafka", "clusters", name, "bootstrap_servers"))


def message_max_bytes(cluster: Cluster) -> int:
    """The producer's message.max.bytes for ``cluster`` (librdkafka's default if unset)."""
    raw = cluster.producer.get("message.max.bytes", LIBRDKAFKA_MESSAGE_MAX_BYTES)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ConfigError("must be an integer", key="message.max.bytes")
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError("must be an integer", key="message.max.bytes") from exc
    if not 1000 <= value <= 1_000_000_000:
        raise ConfigError("must be between 1000 and 1000000000 (librdkafka's range)",
                          key="message.max.bytes")
    return value


def max_record_bytes(config: Config) -> int:
    """The largest record (key + value + headers) every cluster will take.

    The smallest cluster decides: a dead-letter copy may go to another cluster.
    """
    return min(message_max_bytes(c) for c in config.kafka.clusters.values()) \
        - RECORD_FRAMING - DEAD_LETTER_ROOM


def _fit_to_kafka(config: Config, smap: SourceMap, data: dict[str, Any]) -> None:
    """What the gateway accepts must be producible (issue #10): derive or refuse.

    Edge limits the operator left out are derived from the clusters' producer
    limit; ones set above it are an error at their line.  In hand-off spool mode,
    librdkafka must report a missing topic before the record would be spilled
    and acknowledged, so topic.metadata.propagation.max.ms stays below
    spool.spill_after_ms.
    """
    sizes: dict[str, int] = {}
    for name, cluster in config.kafka.clusters.items():
        try:
            sizes[name] = message_max_bytes(cluster)
        except ConfigError as exc:
            raise smap.error(exc.reason, ("kafka", "clusters", name, "producer", exc.key)) \
                from exc
    smallest = min(sizes, key=sizes.__getitem__)
    edge = max_record_bytes(config) - RULE_ROOM
    key_path = ("kafka", "clusters", smallest, "producer", "message.max.bytes")
    if edge < 1024:
        raise smap.error(f"too small: leaves {edge} bytes for a message after the record "
                         f"framing ({RECORD_FRAMING}), the dead-letter room "
                         f"({DEAD_LETTER_ROOM}) and the room for rule headers ({RULE_ROOM})",
                         key_path)
    given = data.get("limits")
    given = given if isinstance(given, dict) else {}
    for key in _EDGE_LIMITS:
        value = getattr(config.limits, key)
        if key not in given:
            setattr(config.limits, key, min(value, edge))
        elif value > edge:
            raise smap.error(
                f"{value} bytes can not be produced to cluster '{smallest}': its "
                f"message.max.bytes {sizes[smallest]} "
                f"leaves {edge} after record framing, dead-letter room and room for rule "
                f"headers; lower this or raise kafka.clusters.{smallest}.producer"
                f"['message.max.bytes'] (and the brokers' limits)", ("limits", key))
    spool = config.spool
    if not (spool.enabled and spool.mode == "kafka"):
        return
    for name, cluster in config.kafka.clusters.items():
        raw = cluster.producer.get(_PROPAGATION)
        if raw is None:
            cluster.producer[_PROPAGATION] = min(30_000, spool.spill_after_ms // 2)
            continue
        try:
            value = int(raw)
        except (TypeError, ValueError) as exc:
            raise smap.error("must be an integer",
                             ("kafka", "clusters", name, "producer", _PROPAGATION)) from exc
        if value >= spool.spill_after_ms:
            raise smap.error(
                f"must be below spool.spill_after_ms ({spool.spill_after_ms}): otherwise a "
                "record for a topic that does not exist is spilled and acknowledged before "
                "Kafka reports the topic missing",
                ("kafka", "clusters", name, "producer", _PROPAGATION))


# librdkafka keys that a typed setting owns; giving both ways is an error.
_TYPED_KEYS = {
    "bootstrap.servers": "bootstrap_servers",
    "metadata.broker.list": "bootstrap_servers",
    "acks": "acks",
    "request.required.acks": "acks",
    "enable.idempotence": "idempotence",
    "linger.ms": "linger_ms",
    "queue.buffering.max.ms": "linger_ms",
    "compression.type": "compression",
    "compression.codec": "compression",
    "message.timeout.ms": "message_timeout_ms",
    "delivery.timeout.ms": "message_timeout_ms",
    "queue.buffering.max.kbytes": "queue_max_kbytes",
    "queue.buffering.max.messages": "queue_max_messages",
}
# Keys the gateway must own for its delivery contract.
_FORBIDDEN_KEYS = {"on_delivery", "error_cb", "dr_cb", "dr_msg_cb", "delivery.report.only.error"}


def producer_settings(cluster: Cluster, bootstrap: str | None = None) -> dict[str, Any]:
    """librdkafka settings for one cluster: typed settings plus checked passthrough."""
    for key in cluster.producer:
        if key in _TYPED_KEYS:
            raise ConfigError(
                f"'{key}' conflicts with the typed setting '{_TYPED_KEYS[key]}'; set it there",
                key=key,
            )
        if key in _FORBIDDEN_KEYS:
            raise ConfigError(f"'{key}' is managed by the gateway", key=key)
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap or cluster.bootstrap_servers,
        "acks": cluster.acks,
        "enable.idempotence": cluster.idempotence,
        "linger.ms": cluster.linger_ms,
        "compression.type": cluster.compression,
        "message.timeout.ms": cluster.message_timeout_ms,
        "queue.buffering.max.kbytes": cluster.queue_max_kbytes,
        "queue.buffering.max.messages": cluster.queue_max_messages,
        "socket.nagle.disable": True,
    }
    settings.update(cluster.producer)
    return settings
