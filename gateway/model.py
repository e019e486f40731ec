"""The shapes that cross stage boundaries.

Every source turns what it receives into one ``Message``; routing turns a
``Message`` into zero or more ``Record``s; the buffer and the Kafka sink move
``Record``s.  An ``Ack`` joins the fate of all records of one message and calls
the source back once, when the message is safe or has failed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import msgspec

from gateway.errors import GatewayError


class Sequence:
    """One client session's stamp counter (``kafka.sequence``, docs/rules.md).

    Lives in the MQTT session state (``ClientState``), so a resumed session
    continues it and a new session starts a new one.  ``session`` is made on
    the first stamp: 12 hex digits of the creation time in ms, then 8 random
    ones, so ids sort by when the session began.
    """

    __slots__ = ("last", "session")

    def __init__(self) -> None:
        self.session = ""
        self.last = 0

    def next(self) -> tuple[str, int]:
        """The session id and the next sequence number (1, 2, ...)."""
        if not self.session:
            self.session = f"{time.time_ns() // 1_000_000:012x}{os.urandom(4).hex()}"
        self.last += 1
        return self.session, self.last


class Message(msgspec.Struct, kw_only=True):
    """One publish as a source received it, before routing."""

    source: str  # "mqtt" | "http" | "bridge"
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    client_id: str = ""
    # Who the client proved to be (gateway.auth.Identity): never a name nobody verified.
    # username: the password-file user or the JWT's sub; None when anonymous.
    username: str | None = None
    # Identity proven by a client certificate (subject CN), when mTLS is on.
    cert_identity: str | None = None
    # The verified JWT's claims as text ({claim.NAME} in templates, allow.claims).
    claims: Mapping[str, str] | None = None
    # MQTT 5 properties that rules and headers may use.
    user_properties: list[tuple[str, str]] = []
    content_type: str | None = None
    payload_format: int | None = None  # 1 = UTF-8 declared
    message_expiry: int | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    # Explicit Kafka hints (HTTP batch / REST Proxy records may carry them).
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = []
    partition: int | None = None
    received_at: float = 0.0
    # The client session's stamp counter (MQTT only); the router draws from it when a
    # rule says ``kafka.sequence: true``.
    sequence: Sequence | None = None


class Record(msgspec.Struct, kw_only=True):
    """One Kafka record to produce, after routing."""

    cluster: str
    topic: str
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = []
    partition: int | None = None
    # The rule said ``priority: high``: spooled apart and drained first after an outage.
    high_priority: bool = False
    # Not serialised: joins this record back to its message's ack.
    ack: Ack | None = None


class Delivery(msgspec.Struct, kw_only=True):
    """Where one record went, as reported back to the client."""

    cluster: str
    topic: str
    partition: int = -1
    offset: int = -1
    spooled: bool = False  # safe on local disk, not yet in Kafka


class Outcome(msgspec.Struct, kw_only=True):
    """The final word on one message, handed to the source exactly once."""

    ok: bool
    deliveries: list[Delivery] = []
    error: GatewayError | None = None
    # Set when routing dropped the message on purpose (action: drop).
    dropped: bool = False
    dead_lettered: bool = False
    rule: str = ""


class Ack:
    """Resolves once every record of a message is safe, or on the first failure.

    Records call ``record_safe`` / ``record_failed`` (from the event loop).  The
    callback runs exactly once.
    """

    __slots__ = ("_callback", "_deliveries", "_done", "_remaining", "dead_lettered", "rule")

    def __init__(self, callback: Callable[[Outcome], None], expected: int, rule: str = "",
                 dead_lettered: bool = False) -> None:
        self._callback = callback
        self._remaining = expected
        # Made with the first delivery (most messages have one record: one list, not two).
        self._deliveries: list[Delivery] | None = None
        self._done = False
        self.rule = rule
        self.dead_lettered = dead_lettered
        if expected == 0:
            self._finish(Outcome(ok=True, rule=rule))

    def record_safe(self, delivery: Delivery) -> None:
        if self._done:
            return
        deliveries = self._deliveries
        if deliveries is None:
            deliveries = self._deliveries = [delivery]
        else:
            deliveries.append(delivery)
        self._remaining -= 1
        if self._remaining <= 0:
            self._done = True
            self._callback(Outcome(ok=True, deliveries=deliveries, rule=self.rule,
                                   dead_lettered=self.dead_lettered))

    def record_failed(self, error: GatewayError) -> None:
        if self._done:
            return
        self._finish(
            Outcome(ok=False, error=error, deliveries=self._deliveries or [], rule=self.rule)
        )

    def _finish(self, outcome: Outcome) -> None:
        self._done = True
        self._callback(outcome)


def record_size(record: Record) -> int:
    """Bytes a record occupies for buffer accounting (payload, key, headers, overhead)."""
    size = len(record.value) + 64
    if record.key is not None:
        size += len(record.key)
    for name, value in record.headers:
        size += len(name) + len(value)
    return size


def record_wire_size(record: Record) -> int:
    """Bytes librdkafka counts against ``message.max.bytes``, framing excluded.

    Key, value, and each header's name and value with their varint lengths
    (``rd_kafka_headers_serialized_size``); the per-record framing bound is
    ``config.RECORD_FRAMING``.
    """
    size = len(record.value)
    if record.key is not None:
        size += len(record.key)
    for name, value in record.headers:
        n = len(name) if name.isascii() else len(name.encode("utf-8", "surrogatepass"))
        size += n + len(value) + _varint_len(n) + _varint_len(len(value))
    return size


def _varint_len(n: int) -> int:
    # Kafka's zig-zag varint: 7 bits a byte of 2n.
    n <<= 1
    length = 1
    while n >= 0x80:
        n >>= 7
        length += 1
    return length
