"""Byte sizes with units (``512MiB``, ``1GiB``, ``10MB``) in the config and the rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.config.sizes import SizeError, parse_size
from gateway.errors import ConfigError
from gateway.routing.load import load_rules
from gateway.routing.rules import RulesError
from tests.helpers import ANON

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0), ("1048576", 1 << 20), ("100B", 100), ("1kB", 1000), ("10MB", 10_000_000),
        ("2GB", 2 * 10**9), ("1TB", 10**12), ("64KiB", 64 << 10), ("512MiB", 512 << 20),
        ("1GiB", 1 << 30), ("2TiB", 2 << 40), ("1.5KiB", 1536), (" 8 MiB ", 8 << 20),
        ("20Gi", 20 << 30), ("500Mi", 500 << 20),  # Kubernetes' spelling of a volume size
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("1GiBs", "unknown unit 'GiBs'"), ("10 mib", "unknown unit 'mib'"),
        ("lots", "invalid size 'lots'"), ("-1MiB", "invalid size"), ("1.5B", "not a whole"),
        ("", "invalid size"), ("1e6", "invalid size"),
    ],
)
def test_bad_sizes_say_what_is_accepted(text: str, fragment: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert fragment in str(info.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_every_byte_size_in_the_config_takes_units(tmp_path: Path) -> None:
    path = write(tmp_path, """\
spool: {max_bytes: 20GiB, segment_bytes: 64MiB}
buffer: {high_water_bytes: 128MiB, low_water_bytes: 64MiB}
limits:
  max_packet_size: 256KiB
  topic_alias_max_bytes: 32KiB
  max_client_id_bytes: 1KiB
  max_write_buffer_bytes: 1MiB
  http_max_body_bytes: 512kB
  http_max_inflight_body_bytes: 100MB
  idempotency_max_bytes: 32MiB
  idempotency_max_key_bytes: 255B
""")
    config = load_config(path, env=ANON)
    assert (config.spool.max_bytes, config.spool.segment_bytes) == (20 << 30, 64 << 20)
    assert config.buffer.high_water_bytes == 128 << 20
    assert config.buffer.low_water_bytes == 64 << 20
    limits = config.limits
    assert (limits.max_packet_size, limits.topic_alias_max_bytes) == (256 << 10, 32 << 10)
    assert (limits.max_client_id_bytes, limits.max_write_buffer_bytes) == (1024, 1 << 20)
    assert (limits.http_max_body_bytes, limits.http_max_inflight_body_bytes) == (
        512_000, 100_000_000)
    assert (limits.idempotency_max_bytes, limits.idempotency_max_key_bytes) == (32 << 20, 255)


def test_plain_ints_stay_bytes_and_env_values_take_units(tmp_path: Path) -> None:
    path = write(tmp_path, "spool:\n  max_bytes: 1048576\n")
    config = load_config(path, env={**ANON, "LASTMILE_BUFFER__HIGH_WATER_BYTES": "256MiB"})
    assert config.spool.max_bytes == 1 << 20
    assert config.buffer.high_water_bytes == 256 << 20


def test_a_bad_unit_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 1\nspool:\n  max_bytes: 10 GiBs\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ANON)
    err = info.value
    assert (err.file, err.line, err.key) == (str(path), 3, "spool.max_bytes")
    assert "unknown unit 'GiBs'" in err.reason and "MiB" in err.reason


def test_the_constraints_still_apply_after_the_unit(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_write_buffer_bytes: 1KiB\n")  # at least 4096
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ANON)
    assert info.value.key == "limits.max_write_buffer_bytes" and ">= 4096" in info.value.reason


def test_rules_payload_max_bytes_takes_units(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("""\
rules:
  - name: small
    match: "a/#"
    payload: {max_bytes: 64KiB}
    kafka: {topic: a}
  - name: bad
    match: "b/#"
    payload: {max_bytes: 64 KB!}
    kafka: {topic: b}
""")
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    (err,) = info.value.errors
    assert (err.line, err.key) == (8, "payload.max_bytes") and "invalid size" in str(err)
    (tmp_path / "r.yaml").write_text(
        'rules:\n  - name: small\n    match: "a/#"\n    payload: {max_bytes: 64KiB}\n'
        "    kafka: {topic: a}\n")
    table = load_rules(tmp_path)
    assert table.entries[0].max_bytes == 64 << 10
