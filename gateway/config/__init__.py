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

import msgspec
import yaml

from gateway.config.schema import Cluster, Config, TlsListener
from gateway.config.sizes import convert_sizes, size_paths
from gateway.config.yamlsrc import PathKey, SourceMap, build, compose, format_path, locate
from gateway.errors import ConfigError

__all__ = ["Config", "ConfigError", "ConfigErrors", "load_config", "max_record_bytes",
           "producer_settings"]

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


class ConfigErrors(ConfigError):
    """Several problems in the config; ``errors`` lists each (file, line, key, reason).

    Its own file, line and key are the first error's, so a caller reading one still can.
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.reason, file=first.file, line=first.line, key=first.key)
        self.errors = errors
        text = f"{len(errors)} errors:\n" + "\n".join(str(e) for e in errors)
        self.message = text
        self.args = (text,)


# Past this many, the rest are left for the next run (a file that is not a config at all).
MAX_ERRORS = 50
SIZE_PATHS = size_paths(Config)


def _env_overrides(env: Mapping[str, str],
                   errors: list[ConfigError]) -> list[tuple[str, tuple[str, ...], Any]]:
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
        except yaml.YAMLError:
            errors.append(ConfigError(f"invalid value {raw!r}", file=f"${name}"))
            continue
        found.append((name, path, value))
    return found


def _apply(data: dict[str, Any], path: tuple[str, ...], value: Any, name: str,
           errors: list[ConfigError]) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            errors.append(ConfigError("cannot override inside a non-mapping", file=f"${name}"))
            return
        node = child
    node[path[-1]] = value


def _drop(data: Any, path: PathKey) -> bool:
    """Remove the mapping key holding the error at ``path`` (its default then applies)."""
    for depth in range(len(path), 0, -1):
        parent = _node(data, path[: depth - 1])
        if isinstance(parent, dict) and path[depth - 1] in parent:
            del parent[path[depth - 1]]
            return True
    return False


def _node(data: Any, path: PathKey) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _convert_all(data: dict[str, Any], smap: SourceMap,
                 errors: list[ConfigError]) -> Config | None:
    """msgspec stops at the first error: record it, drop the key, convert again."""
    for path, reason in convert_sizes(data, SIZE_PATHS):
        errors.append(smap.error(reason, path))
    while len(errors) < MAX_ERRORS:
        try:
            return msgspec.convert(data, Config, strict=False)
        except msgspec.ValidationError as exc:
            message, path = locate(exc, data)
            errors.append(smap.error(message, path))
            if not _drop(data, path):
                return None
    return None


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None, *,
                tls_files: bool = True) -> Config:
    """Load and validate the gateway config; ``path=None`` means all defaults.

    Every problem found is reported at once: one ConfigError, or ConfigErrors for
    several, each naming file, line and key.  ``tls_files=False`` skips reading the
    TLS listeners' files (``rules check`` runs where they may not exist).
    """
    env = os.environ if env is None else env
    file = str(path) if path is not None else "<defaults>"
    smap = SourceMap(file)
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config: {exc.strerror}", file=file) from exc
        node = compose(text, file)
        data = {} if node is None else build(node, (), smap)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise smap.error("the config must be a mapping of sections")
    errors = [ConfigError("duplicate key", file=file, line=line, key=format_path(key))
              for key, line in smap.duplicates]
    overrides = _env_overrides(env, errors)
    for name, key_path, value in overrides:
        _apply(data, key_path, value, name, errors)
    config = _convert_all(data, smap, errors)
    if config is not None:
        # A key dropped for a bad value took its default: say nothing more about it.
        bad = {e.key for e in errors if e.key}
        checks: list[ConfigError] = []
        _check(config, smap, checks, tls_files)
        if config.kafka.clusters:
            _fit_to_kafka(config, smap, data, checks)
        errors += [e for e in checks
                   if not any(e.key == k or e.key.startswith(k + ".") for k in bad)]
        if not errors:
            return config
    errors = [_name_env(e, overrides) for e in errors]
    errors.sort(key=lambda e: (e.file != file, e.line or 0, e.file))
    raise errors[0] if len(errors) == 1 else ConfigErrors(errors)


def _name_env(error: ConfigError, overrides: list[tuple[str, tuple[str, ...], Any]]) -> ConfigError:
    """Name the env var when the bad key came from one (or is an unknown key it added)."""
    for name, key_path, _ in overrides:
        joined = ".".join(key_path)
        if error.key and (error.key == joined or joined.startswith(error.key + ".")):
            return ConfigError(error.reason, file=f"${name}", key=error.key)
    return error


def _check_auth(config: Config, smap: SourceMap, errors: list[ConfigError]) -> None:
    """Anonymous access off needs a way in: a password file, JWTs or client certificates."""
    auth = config.auth
    jwt = auth.jwt
    if jwt is not None:
        if not (jwt.jwks_file or jwt.jwks_url):
            errors.append(smap.error("give jwks_file or jwks_url", ("auth", "jwt")))
        from gateway.auth.jwks import check_config

        try:
            check_config(jwt)  # no "none", no HMAC with a public key, sane timings
        except ConfigError as exc:
            errors.append(smap.error(exc.reason, tuple(exc.key.split("."))))
    if auth.allow_anonymous:
        return
    mtls = any(
        listener.enabled and listener.require_client_cert
        for listener in (config.listeners.mqtts, config.listeners.https)
    )
    if not (auth.password_file or jwt is not None or mtls):
        errors.append(smap.error(
            "false, but no client could ever authenticate: set auth.password_file or auth.jwt, "
            "require client certificates on a TLS listener, or say allow_anonymous: true",
            ("auth", "allow_anonymous")))


TLS_LISTENERS = ("mqtts", "https")


def _check_tls(listener: TlsListener, section: str, smap: SourceMap, files: bool) -> None:
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
    if not files:
        return
    from gateway.tls import TlsFileError, build_context

    try:
        build_context(listener)
    except TlsFileError as exc:
        raise smap.error(f"{exc.file}: {exc.reason}", (*path, exc.key)) from exc


def _check(config: Config, smap: SourceMap, errors: list[ConfigError],
           tls_files: bool = True) -> None:
    """Cross-field checks msgspec cannot express."""
    if config.workers < 1:
        errors.append(smap.error("must be at least 1", ("workers",)))
    if not config.kafka.clusters:
        errors.append(smap.error("at least one cluster is required", ("kafka", "clusters")))
    for section in ("mqtt", "mqtts", "http", "https", "metrics"):
        listener = getattr(config.listeners, section)
        if not 0 <= listener.port <= 65535:
            errors.append(smap.error("port out of range 0-65535", ("listeners", section, "port")))
    for section in TLS_LISTENERS:
        try:
            _check_tls(getattr(config.listeners, section), section, smap, tls_files)
        except ConfigError as exc:
            errors.append(exc)
    _check_auth(config, smap, errors)
    if config.buffer.low_water_bytes >= config.buffer.high_water_bytes:
        errors.append(smap.error("must be below high_water_bytes", ("buffer", "low_water_bytes")))
    for name, cluster in config.kafka.clusters.items():
        try:
            producer_settings(cluster)
        except ConfigError as exc:
            errors.append(smap.error(exc.reason, ("kafka", "clusters", name, "producer", exc.key)))
        if not cluster.bootstrap_servers.strip():
            errors.append(smap.error("must not be empty",
                                     ("kafka", "clusters", name, "bootstrap_servers")))


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


def _fit_to_kafka(config: Config, smap: SourceMap, data: dict[str, Any],
                  errors: list[ConfigError]) -> None:
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
            errors.append(smap.error(exc.reason,
                                     ("kafka", "clusters", name, "producer", exc.key)))
    if len(sizes) < len(config.kafka.clusters):
        return
    smallest = min(sizes, key=sizes.__getitem__)
    edge = max_record_bytes(config) - RULE_ROOM
    key_path = ("kafka", "clusters", smallest, "producer", "message.max.bytes")
    if edge < 1024:
        errors.append(smap.error(f"too small: leaves {edge} bytes for a message after the record "
                         f"framing ({RECORD_FRAMING}), the dead-letter room "
                         f"({DEAD_LETTER_ROOM}) and the room for rule headers ({RULE_ROOM})",
                         key_path))
        return
    given = data.get("limits")
    given = given if isinstance(given, dict) else {}
    for key in _EDGE_LIMITS:
        value = getattr(config.limits, key)
        if key not in given:
            setattr(config.limits, key, min(value, edge))
        elif value > edge:
            errors.append(smap.error(
                f"{value} bytes can not be produced to cluster '{smallest}': its "
                f"message.max.bytes {sizes[smallest]} "
                f"leaves {edge} after record framing, dead-letter room and room for rule "
                f"headers; lower this or raise kafka.clusters.{smallest}.producer"
                f"['message.max.bytes'] (and the brokers' limits)", ("limits", key)))
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
        except (TypeError, ValueError):
            errors.append(smap.error("must be an integer",
                                     ("kafka", "clusters", name, "producer", _PROPAGATION)))
            continue
        if value >= spool.spill_after_ms:
            errors.append(smap.error(
                f"must be below spool.spill_after_ms ({spool.spill_after_ms}): otherwise a "
                "record for a topic that does not exist is spilled and acknowledged before "
                "Kafka reports the topic missing",
                ("kafka", "clusters", name, "producer", _PROPAGATION)))


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
