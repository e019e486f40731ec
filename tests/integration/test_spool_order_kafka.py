"""Order across a producer restart, with the real sink and broker (issue 10, defect 8).

After a fatal producer error the sink replaces its producer and purges the old
one.  A record submitted before the purged records' failure reports have
reached the buffer must not reach Kafka ahead of them: the purged ones are
spooled and replayed, so the new one has to queue behind them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.buffer.spooled import SpoolBuffer
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Cluster
from gateway.config.schema import Spool as SpoolConfig
from gateway.model import Ack, Outcome, Record
from gateway.sinks.kafka import KafkaSink
from tests.helpers import Broker
from tests.support.sinks import assert_key_order
from tests.unit.test_spool_buffer import until

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_record_after_a_producer_restart_stays_behind_the_purged_one(
        tmp_path: Path, fresh_broker: Broker) -> None:
    topic = "restart-order"
    await asyncio.to_thread(fresh_broker.create_topic, topic, 1)
    sink = KafkaSink("default", Cluster(bootstrap_servers=fresh_broker.bootstrap,
                                        message_timeout_ms=0))
    await sink.start()
    buf = SpoolBuffer({"default": sink},
                      SpoolConfig(mode="kafka", spill_after_ms=600_000, fsync_interval_ms=2.0),
                      BufferConfig(), tmp_path / "spool")
    await buf.start()
    outcomes: dict[bytes, Outcome] = {}

    def send(value: bytes) -> None:
        record = Record(cluster="default", topic=topic, value=value, key=b"device-1")
        record.ack = Ack(lambda o: outcomes.__setitem__(value, o), 1)
        buf.submit(record)

    fresh_broker.pause()  # the producer has never asked for this topic: "a" waits for metadata
    try:
        send(b"a")
        await until(lambda: sink.in_flight == 1)
        sink._restart_needed = True  # what a fatal error report or error_cb does
        # The next poll on the loop swaps producers; "c" comes right after the swap, while
        # the purged "a" may still be unreported (produce() then refuses "c" until it is).
        await until(lambda: sink.restarts == 1, timeout=20)
        send(b"c")
    finally:
        fresh_broker.resume()
    await until(lambda: len(outcomes) == 2 and buf.stats()["spool_records"] == 0
                and buf.stats()["replay_in_flight"] == 0, timeout=60)
    assert all(o.ok for o in outcomes.values()), outcomes
    await buf.close(5.0)
    await sink.close(5.0)
    values = [m.value() for m in await asyncio.to_thread(fresh_broker.read, topic, 2, 30)]
    assert_key_order(values, [b"a", b"c"])
