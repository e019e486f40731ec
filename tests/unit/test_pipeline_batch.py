"""``Pipeline.publish_many`` (the HTTP batch's way in): real routing, the real buffers,
a sink double shaped like partitioned Kafka (tests/support/sinks.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.buffer.priority import PrioritySpoolBuffer
from gateway.buffer.queue import MemoryBuffer
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Spool as SpoolConfig
from gateway.errors import DeliveryFailed, GatewayError
from gateway.model import Message, Outcome, Record
from gateway.pipeline import Admit, Pipeline
from gateway.routing.load import load_rules
from gateway.routing.router import Router
from tests.support.sinks import PartitionedKafka

pytestmark = pytest.mark.unit

RULES = """
unmatched: reject
rules:
  - {name: in, match: "in/#", kafka: {topic: t-in}}
  - {name: closed, match: "closed/#", action: reject, reason: closed}
"""


class Setup:
    def __init__(self, tmp: Path, kind: str, admit: Admit | None = None) -> None:
        (tmp / "rules").mkdir()
        (tmp / "rules" / "00.yaml").write_text(RULES)
        self.kafka = PartitionedKafka(2)
        sinks: Any = {"default": self.kafka}
        config = BufferConfig(high_water_bytes=1 << 20, low_water_bytes=1 << 19)
        self.buffer: MemoryBuffer | PrioritySpoolBuffer
        if kind == "memory":
            self.buffer = MemoryBuffer(sinks, config.high_water_bytes, config.low_water_bytes)
        else:  # the shipped default: spool on, hand-off mode
            self.buffer = PrioritySpoolBuffer(sinks, SpoolConfig(spill_after_ms=60_000),
                                              config, tmp / "spool")
        self.pipeline = Pipeline(Router(load_rules(tmp / "rules", frozenset(sinks))),
                                 self.buffer, admit)
        self.calls: list[list[Outcome]] = []

    def publish(self, *topics: str, key: bytes | None = None,
                partitions: dict[int, int] | None = None) -> None:
        messages = [Message(source="http", topic=t, payload=b"v%d" % i, key=key,
                            partition=(partitions or {}).get(i))
                    for i, t in enumerate(topics)]
        self.pipeline.publish_many(messages, self.calls.append)


@pytest.fixture(params=["memory", "spool"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    s = Setup(tmp_path, request.param)
    await s.buffer.start()
    yield s
    await s.buffer.close(1.0)


async def test_outcomes_by_index_in_one_call_once_kafka_has_every_record(
        setup: Setup) -> None:
    setup.publish("in/a", "closed/x", "in/b", "nowhere/y", "in/c")
    assert setup.calls == []  # three records wait for Kafka
    assert setup.kafka.queued() == 3 and setup.buffer.flow.pending_bytes > 0
    setup.kafka.deliver()
    [outcomes] = setup.calls
    assert [o.ok for o in outcomes] == [True, False, True, False, True]
    assert [o.error.code for o in outcomes if o.error is not None] == [
        "rejected", "no_matching_rule"]
    offsets = [o.deliveries[0].offset for o in outcomes if o.ok]
    assert offsets == [1, 2, 3]  # handed to Kafka in the batch's order
    assert setup.kafka.values() == [b"v0", b"v2", b"v4"]
    assert setup.buffer.flow.pending_bytes == 0


async def test_a_record_kafka_refuses_fails_its_message_only(setup: Setup) -> None:
    setup.publish("in/a", "in/b", "in/c", key=b"\x00")  # one key: one partition, in order
    setup.kafka.fail_front(0, retriable=False)
    assert setup.calls == []
    setup.kafka.deliver()
    [outcomes] = setup.calls
    assert [o.ok for o in outcomes] == [False, True, True]
    assert isinstance(outcomes[0].error, DeliveryFailed)
    assert setup.buffer.flow.pending_bytes == 0


async def test_refused_at_once_or_empty_calls_back_at_once(setup: Setup) -> None:
    setup.publish("closed/a", "nowhere/b")
    setup.publish()
    assert [[o.ok for o in outcomes] for outcomes in setup.calls] == [[False, False], []]
    assert setup.kafka.queued() == 0


async def test_an_explicit_partition_is_admitted_after_the_records_before_it_are_taken(
        tmp_path: Path) -> None:
    """Admission of an explicit partition reads the buffer's state (acks from Kafka or
    from the spool), so the records before it are handed over first, as one ``publish``
    per message would have; records without one go over together."""
    taken_when_admitted: list[tuple[bytes, int]] = []
    kafka: list[PartitionedKafka] = []

    def admit(record: Record) -> GatewayError | None:
        taken_when_admitted.append((record.value, kafka[0].queued()))
        return None

    s = Setup(tmp_path, "memory", admit)
    kafka.append(s.kafka)
    s.publish("in/a", "in/b", "in/c", "in/d", partitions={2: 1})
    assert taken_when_admitted == [(b"v0", 0), (b"v1", 0), (b"v2", 2), (b"v3", 2)]
    s.kafka.deliver()
    assert [o.ok for o in s.calls[0]] == [True] * 4


