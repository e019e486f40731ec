"""config/gateway.yaml: defaults, strict errors with file:line:key, env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigErrors, load_config, producer_settings
from gateway.errors import ConfigError
from tests.helpers import ANON, ROOT

pytestmark = pytest.mark.unit


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_defaults_serve_without_a_file() -> None:
    config = load_config(None, env=ANON)
    assert config.listeners.mqtt.port == 1883
    assert config.listeners.http.port == 8080
    assert config.kafka.clusters["default"].bootstrap_servers == "embedded"
    assert config.rules.dir == "bridge-rules"
    assert config.spool.dir == "var/spool"


def test_built_in_default_refuses_anonymous_clients() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={})
    assert info.value.key == "auth.allow_anonymous"
    assert load_config(None, env={"LASTMILE_AUTH__PASSWORD_FILE": "/x"}).auth.password_file == "/x"


def test_shipped_config_loads() -> None:
    config = load_config(ROOT / "config" / "gateway.yaml", env=ANON)
    assert config.kafka.clusters["default"].bootstrap_servers == "embedded"
    assert config.kafka.clusters["default"].acks == "all"


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"),
    [
        ("listeners:\n  mqtt:\n    prot: 1884\n", 3, "listeners.mqtt.prot", "unknown key"),
        ("listeners:\n  mqtt:\n    port: abc\n", 3, "listeners.mqtt.port", "Expected `int`"),
        ("listeners:\n  mqtt:\n    port: 70000\n", 3, "listeners.mqtt.port", "out of range"),
        ("kafka:\n  clusters:\n    edge:\n      acks: maybe\n", 4,
         "kafka.clusters.edge.acks", "Invalid enum value"),
        ("spool:\n  enabled: true\n  mode: sometimes\n", 3, "spool.mode", "Invalid enum"),
        ("workers: 0\n", 1, "workers", "at least 1"),
        ("kafka:\n  clusters:\n    default:\n      producer:\n        linger.ms: 10\n", 5,
         "kafka.clusters.default.producer.linger.ms", "conflicts with the typed setting"),
        ("log:\n  level: info\n  level: debug\n", 3, "log.level", "duplicate key"),
        ("auth:\n  allow_anonymous: false\n", 2, "auth.allow_anonymous",
         "no client could ever authenticate"),
        ("auth:\n  allow_anonymous: true\n  jwt: {issuer: x}\n", 3, "auth.jwt",
         "give jwks_file or jwks_url"),
        ("auth:\n  allow_anonymous: true\n  jwt:\n    jwks_file: /j\n"
         "    algorithms: [RS256, HS256]\n", 5, "auth.jwt.algorithms", "'HS256' is not allowed"),
        ("listeners: [1, 2\n", 2, "", "invalid YAML"),
    ],
)
def test_errors_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if text.startswith("auth:") else ANON)
    err = info.value
    assert err.file == str(path)
    assert err.line == line, str(err)
    assert err.key == key
    assert fragment in str(err)
    assert str(err).startswith(f"{path}:{line}: ")


def test_env_overrides_apply_and_name_the_variable_on_error(tmp_path: Path) -> None:
    path = write(tmp_path, "listeners:\n  mqtt: {port: 1883}\n")
    config = load_config(path, env={**ANON,
        "LASTMILE_BOOTSTRAP_SERVERS": "kafka-1:9092,kafka-2:9092",
        "LASTMILE_MQTT_PORT": "1884",
        "LASTMILE_HTTP_PORT": "8081",
        "LASTMILE_SPOOL__FSYNC_INTERVAL_MS": "2.5",
        "UNRELATED": "x",
    })
    assert config.kafka.clusters["default"].bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert config.listeners.mqtt.port == 1884
    assert config.listeners.http.port == 8081
    assert config.spool.fsync_interval_ms == 2.5
    with pytest.raises(ConfigError, match=r"^\$LASTMILE_MQTT_PORT: listeners.mqtt.port"):
        load_config(path, env={**ANON, "LASTMILE_MQTT_PORT": "not-a-port"})


def test_librdkafka_passthrough_and_typed_settings() -> None:
    config = load_config(None, env={**ANON, "LASTMILE_KAFKA__CLUSTERS__DEFAULT__PRODUCER":
                                    "{batch.num.messages: 5000, client.id: edge-gw}"})
    settings = producer_settings(config.kafka.clusters["default"], "k:9092")
    assert settings["bootstrap.servers"] == "k:9092"
    assert settings["acks"] == "all" and settings["enable.idempotence"] is True
    assert settings["batch.num.messages"] == 5000 and settings["client.id"] == "edge-gw"


def test_every_error_is_listed_at_once_in_line_order(tmp_path: Path) -> None:
    path = write(tmp_path, """\
workers: 0
listeners:
  mqtt:
    prot: 1884
  http:
    port: abc
spool:
  max_bytes: 10 GiBs
  mode: sometimes
log:
  level: info
  level: debug
""")
    with pytest.raises(ConfigErrors) as info:
        load_config(path, env={**ANON, "LASTMILE_METRICS_TYPO__PORT": "1",
                               "LASTMILE_LISTENERS__METRICS__PORT": "70000"})
    found = [(e.file, e.line, e.key) for e in info.value.errors]
    f = str(path)
    assert found == [
        (f, 1, "workers"), (f, 4, "listeners.mqtt.prot"), (f, 6, "listeners.http.port"),
        (f, 8, "spool.max_bytes"), (f, 9, "spool.mode"), (f, 12, "log.level"),
        ("$LASTMILE_LISTENERS__METRICS__PORT", None, "listeners.metrics.port"),
        ("$LASTMILE_METRICS_TYPO__PORT", None, "metrics_typo"),
    ], found
    # The first error's location is the exception's own, for callers that read one.
    assert (info.value.file, info.value.line, info.value.key) == (f, 1, "workers")
    text = str(info.value)
    assert text.startswith("8 errors:\n") and f"{f}:9: spool.mode: Invalid enum" in text


def test_a_dropped_bad_value_causes_no_second_error(tmp_path: Path) -> None:
    # low_water_bytes is unreadable; its default (32 MiB) is above the 16 MiB high water
    # mark, but that comparison is not the operator's mistake: one error, not two.
    path = write(tmp_path, "buffer:\n  high_water_bytes: 16MiB\n  low_water_bytes: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ANON)
    assert not isinstance(info.value, ConfigErrors)
    assert (info.value.line, info.value.key) == (3, "buffer.low_water_bytes")


def test_cross_field_errors_are_all_listed(tmp_path: Path) -> None:
    path = write(tmp_path, """\
auth:
  allow_anonymous: false
buffer:
  high_water_bytes: 1MiB
  low_water_bytes: 2MiB
kafka:
  clusters:
    default:
      bootstrap_servers: " "
      producer: {linger.ms: 5}
""")
    with pytest.raises(ConfigErrors) as info:
        load_config(path, env={})
    assert [(e.line, e.key) for e in info.value.errors] == [
        (2, "auth.allow_anonymous"), (5, "buffer.low_water_bytes"),
        (9, "kafka.clusters.default.bootstrap_servers"),
        (10, "kafka.clusters.default.producer.linger.ms"),
    ]
