"""Per-key order across the direct and the spool paths (issue 10, defect 8).

Driven through ``PartitionedKafka``, a Sink double shaped like librdkafka's
per-partition queues; docs/spool.md ("Order across the two paths") says which
librdkafka behaviour each case stands for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.buffer.spooled import SpoolBuffer
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Spool as SpoolConfig
from gateway.model import Ack, Outcome, Record
from tests.support.sinks import PartitionedKafka, assert_key_order
from tests.unit.test_spool_buffer import until

pytestmark = pytest.mark.unit

KEY = b"k0"  # partition 0 of 2


def make(tmp_path: Path, sink: PartitionedKafka, **spool: Any) -> SpoolBuffer:
    cfg = SpoolConfig(**{"mode": "kafka", "fsync_interval_ms": 2.0, "spill_after_ms": 200,
                         **spool})
    return SpoolBuffer({"default": sink}, cfg,
                       BufferConfig(high_water_bytes=1 << 20, low_water_bytes=1 << 19),
                       tmp_path / "spool")


class Client:
    def __init__(self, buffer: SpoolBuffer) -> None:
        self.buffer = buffer
        self.outcomes: dict[bytes, Outcome] = {}
        self.sent: list[bytes] = []

    def send(self, value: bytes, key: bytes = KEY) -> None:
        record = Record(cluster="default", topic="t", value=value, key=key)
        record.ack = Ack(lambda o, v=value: self.outcomes.__setitem__(v, o), 1)  # type: ignore[misc]
        self.sent.append(value)
        self.buffer.submit(record)

    def spooled(self, value: bytes) -> bool:
        o = self.outcomes.get(value)
        return o is not None and o.ok and o.deliveries[0].spooled


async def test_record_refused_at_once_is_spooled_behind_older_open_ones(tmp_path: Path) -> None:
    """A younger record the sink refuses at once (a producer restarting) while an older
    one of its key is still open must not get the lower spool seq."""
    sink = PartitionedKafka()
    buf = make(tmp_path, sink)
    await buf.start()
    client = Client(buf)
    client.send(b"a")  # direct, open in the partition queue
    sink.refusing = True
    client.send(b"c")  # refused at once, retriable: spills every open record
    sink.refusing = False
    await until(lambda: client.spooled(b"a") and client.spooled(b"c"))
    sink.fail_front(0)  # a's (purged) report arrives afterwards
    await until(lambda: sink.queued() == 2)
    sink.deliver()
    assert_key_order(sink.values(), [b"a", b"c"])
    await buf.close(1.0)


async def test_no_replay_is_handed_over_while_a_direct_produce_is_open(tmp_path: Path) -> None:
    """a fails while b (younger, same key) is still open: replaying a now would queue
    it behind b in the producer.  The replay waits until b has its verdict."""
    sink = PartitionedKafka()
    buf = make(tmp_path, sink)
    await buf.start()
    client = Client(buf)
    client.send(b"a")
    client.send(b"b")
    await until(lambda: client.spooled(b"a") and client.spooled(b"b"))  # spilled on age
    await until(lambda: len(buf.replayer.readahead) == 2)  # read back, held at a
    sink.fail_front(0)  # a's direct attempt fails, b's is still open
    assert buf.replayer._wake.is_set()
    # The replayer clears its wake-up and runs one step (no await before producing).
    await until(lambda: not buf.replayer._wake.is_set())
    assert sink.queued() == 1, "a replay was queued behind an open direct produce"
    sink.fail_front(0)  # b fails too: both are replayed, in order
    await until(lambda: sink.queued() == 2)
    sink.deliver()
    assert_key_order(sink.values(), [b"a", b"b"])
    await buf.close(1.0)


async def test_direct_path_resumes_only_when_no_replay_is_in_flight(tmp_path: Path) -> None:
    sink = PartitionedKafka()
    buf = make(tmp_path, sink)
    await buf.start()
    client = Client(buf)
    client.send(b"a")
    client.send(b"b")
    await until(lambda: client.spooled(b"a") and client.spooled(b"b"))
    sink.fail_front(0)
    sink.fail_front(0)
    await until(lambda: sink.queued() == 2)  # replays of a, b in flight
    await until(lambda: not buf.replayer.readahead)
    buf.replayer._check_caught_up()
    assert buf.via_spool, "went direct while replays were in flight"
    client.send(b"c")  # through the spool, behind a and b
    await until(lambda: client.spooled(b"c"))
    await until(lambda: sink.queued() == 3)
    sink.deliver()
    assert_key_order(sink.values(), [b"a", b"b", b"c"])
    await until(lambda: not buf.via_spool)  # all settled: direct again
    client.send(b"d")
    assert sink.queued() == 1
    sink.deliver()
    assert client.outcomes[b"d"].ok and not client.outcomes[b"d"].deliveries[0].spooled
    await buf.close(1.0)
