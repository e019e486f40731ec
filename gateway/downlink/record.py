"""The shape of one record the downlink consumer hands on."""

from __future__ import annotations

import msgspec


class ConsumedRecord(msgspec.Struct, gc=False, kw_only=True, frozen=True):
    """One Kafka record as consumed (confluent-kafka's Message, copied out once)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    # None is a tombstone (log compaction deletes the key); b"" is an empty value.
    value: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    cluster: str = "default"
    # The record's Kafka timestamp in seconds since the epoch (0.0: unknown); MQTT 5
    # message expiry counts from it.
    timestamp: float = 0.0
