"""What the gateway accepts must be producible: edge limits vs message.max.bytes (issue #10).

The defaults used to be 1 MiB for MQTT packets and HTTP bodies against
librdkafka's 1,000,000-byte message.max.bytes: a 1,000,100-byte publish was
acknowledged from the spool, then refused by Kafka for good.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaException, Producer

from gateway.config import (
    DEAD_LETTER_ROOM,
    RECORD_FRAMING,
    RULE_ROOM,
    load_config,
    max_record_bytes,
)
from gateway.errors import ConfigError
from gateway.model import Record, record_wire_size
from tests.helpers import ANON

pytestmark = pytest.mark.unit


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_defaults_are_derived_from_the_producer_limit() -> None:
    config = load_config(None, env=ANON)
    limit = 1_000_000 - RECORD_FRAMING - DEAD_LETTER_ROOM
    assert max_record_bytes(config) == limit
    assert config.limits.max_packet_size == limit - RULE_ROOM
    assert config.limits.http_max_body_bytes == limit - RULE_ROOM
    # Still fits the 1,000,100-byte publish of the issue? No: refused at the edge.
    assert config.limits.max_packet_size < 1_000_100


def test_a_larger_producer_limit_lets_the_defaults_stay_1_mib(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka:\n  clusters:\n    default:\n      producer:\n"
                           "        message.max.bytes: 2000000\n")
    config = load_config(path, env=ANON)
    assert config.limits.max_packet_size == 1 << 20
    assert config.limits.http_max_body_bytes == 1 << 20


def test_the_smallest_cluster_decides(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka:\n  clusters:\n    default: {}\n    small:\n"
                           "      producer: {message.max.bytes: 100000}\n")
    config = load_config(path, env=ANON)
    assert max_record_bytes(config) == 100_000 - RECORD_FRAMING - DEAD_LETTER_ROOM
    assert config.limits.max_packet_size == max_record_bytes(config) - RULE_ROOM


@pytest.mark.parametrize("key", ["max_packet_size", "http_max_body_bytes"])
def test_an_explicit_limit_kafka_cannot_take_names_file_line_and_key(tmp_path: Path,
                                                                      key: str) -> None:
    path = write(tmp_path, f"workers: 1\nlimits:\n  {key}: 1048576\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ANON)
    err = info.value
    assert (err.file, err.line, err.key) == (str(path), 3, f"limits.{key}")
    assert "message.max.bytes" in err.reason and "default" in err.reason


def test_an_explicit_limit_that_fits_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_packet_size: 65536\n")
    assert load_config(path, env=ANON).limits.max_packet_size == 65536


def test_env_set_limit_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"limits\.http_max_body_bytes"):
        load_config(None, env={**ANON, "LASTMILE_LIMITS__HTTP_MAX_BODY_BYTES": "2000000"})


@pytest.mark.parametrize("value", ["lots", "10", "true"])
def test_a_bad_message_max_bytes_is_located(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "kafka:\n  clusters:\n    default:\n      producer:\n"
                           f"        message.max.bytes: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ANON)
    assert info.value.key == "kafka.clusters.default.producer.message.max.bytes"
    assert info.value.line == 5


def test_propagation_is_derived_below_spill_after(tmp_path: Path) -> None:
    config = load_config(None, env=ANON)
    assert config.spool.mode == "kafka"
    propagation = config.kafka.clusters["default"].producer["topic.metadata.propagation.max.ms"]
    assert isinstance(propagation, int) and propagation < config.spool.spill_after_ms
    path = write(tmp_path, "kafka:\n  clusters:\n    default:\n      producer:\n"
                           "        topic.metadata.propagation.max.ms: 30000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ANON)
    assert info.value.key == "kafka.clusters.default.producer.topic.metadata.propagation.max.ms"
    assert "spill_after_ms" in info.value.reason


def test_propagation_left_alone_when_acks_wait_for_kafka() -> None:
    config = load_config(None, env={**ANON, "LASTMILE_SPOOL__ENABLED": "false"})
    assert "topic.metadata.propagation.max.ms" not in config.kafka.clusters["default"].producer


@pytest.mark.parametrize("headers", [[], [("h", b"v")], [("name" * 40, b"x" * 300)],
                                     [("\u00e9t\u00e9", b""), ("a", b"b" * 70)]])
def test_wire_size_matches_librdkafka_exactly(headers: list[tuple[str, bytes]]) -> None:
    # produce() checks message.max.bytes before any broker is involved.
    limit = 5000
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": limit,
                         "log_level": 0})
    key = b"k" * 10
    base = Record(cluster="c", topic="t", value=b"", key=key, headers=headers)
    fits = limit - RECORD_FRAMING - record_wire_size(base)
    for value_len, ok in ((fits, True), (fits + 1, False)):
        record = Record(cluster="c", topic="t", value=b"v" * value_len, key=key,
                        headers=headers)
        assert record_wire_size(record) + RECORD_FRAMING == limit + (0 if ok else 1)
        try:
            producer.produce("t", record.value, record.key, headers=headers or None)
            accepted = True
        except KafkaException:
            accepted = False
        assert accepted is ok, (value_len, headers)
    producer.purge()


def test_integration_tests_spell_the_constants_right() -> None:
    from tests.integration import test_contract_edge as edge

    assert (edge.RECORD_FRAMING, edge.DEAD_LETTER_ROOM, edge.RULE_ROOM) == (
        RECORD_FRAMING, DEAD_LETTER_ROOM, RULE_ROOM)
