"""KafkaSink.in_flight: records handed to librdkafka and not yet reported on the loop.

librdkafka's queue length also counts events poll() has not served yet (error
events pile up while brokers are down), so a metric built on it read 2 after
every delivery report had been handled (issue #11 item 9).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.config.schema import Cluster
from gateway.errors import GatewayError
from gateway.model import Delivery, Record
from gateway.sinks.kafka import KafkaSink

pytestmark = pytest.mark.unit


class FakeMessage:
    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 7


class FakeProducer:
    """Takes records; its queue length also counts three unserved client events."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any, Any], None]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, partition: int, *,
                on_delivery: Callable[[Any, Any], None], headers: Any) -> None:
        self.callbacks.append(on_delivery)

    def __len__(self) -> int:
        return len(self.callbacks) + 3


def test_in_flight_is_zero_once_every_report_was_handled() -> None:
    sink = KafkaSink("default", Cluster(bootstrap_servers="127.0.0.1:1"))
    producer = FakeProducer()
    sink._producer = producer  # type: ignore[assignment]
    seen: list[GatewayError | None] = []

    def on_result(record: Record, delivery: Delivery | None, error: GatewayError | None) -> None:
        seen.append(error)

    for i in range(2):
        sink.produce(Record(cluster="default", topic="t", value=b"%d" % i), on_result)
    assert sink.in_flight == 2
    callbacks, producer.callbacks = producer.callbacks, []
    for callback in callbacks:  # what poll() does (on the loop)
        callback(None, FakeMessage("t"))
    assert sink.in_flight == 2  # reported by librdkafka, not yet handled on the loop
    sink._dispatch(sink._take_reports())
    assert seen == [None, None]
    assert sink.in_flight == 0
