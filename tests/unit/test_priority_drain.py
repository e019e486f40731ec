"""Priority drain (issue 14): high-priority records reach Kafka before the normal backlog.

``PrioritySpoolBuffer`` over ``OnOffKafka``, a Sink double that holds every
record while Kafka is "down" and delivers in hand-over order once it is up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.buffer.inspect import inspect_spool
from gateway.buffer.priority import PrioritySpoolBuffer
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Spool as SpoolConfig
from gateway.model import Ack, Delivery, Outcome, Record
from gateway.routing.compile import compile_rule
from gateway.routing.rules import KafkaSpec, RuleSpec
from tests.unit.test_spool_buffer import until

pytestmark = pytest.mark.unit

Callback = Callable[..., None]


class OnOffKafka:
    """Shaped like librdkafka in front of a broker: one FIFO per topic (partition), each
    drained on its own at a steady pace, so topics interleave in the log as records of
    different partitions do in Kafka.  Down: holds everything."""

    PER_STEP = 20  # records per topic per millisecond

    def __init__(self) -> None:
        self.up = True
        self.queues: dict[str, deque[tuple[Record, Callback]]] = {}
        self.log: list[bytes] = []  # values in the order Kafka wrote them
        self._stepping = False

    def produce(self, record: Record, callback: Callback) -> None:
        self.queues.setdefault(record.topic, deque()).append((record, callback))
        self._schedule()

    def _schedule(self) -> None:
        if self.up and not self._stepping and any(self.queues.values()):
            self._stepping = True
            asyncio.get_running_loop().call_later(0.001, self._step)

    def _step(self) -> None:
        self._stepping = False
        if not self.up:
            return
        for queue in self.queues.values():
            for _ in range(min(self.PER_STEP, len(queue))):
                record, callback = queue.popleft()
                self.log.append(record.value)
                callback(record, Delivery(cluster="default", topic=record.topic,
                                          offset=len(self.log)), None)
        self._schedule()

    def set_up(self, up: bool) -> None:
        self.up = up
        self._schedule()


def make(tmp_path: Path, sink: OnOffKafka, **spool: Any) -> PrioritySpoolBuffer:
    cfg = SpoolConfig(**{"mode": "kafka", "fsync_interval_ms": 2.0, "spill_after_ms": 200,
                         **spool})
    return PrioritySpoolBuffer({"default": sink}, cfg,  # type: ignore[dict-item]
                               BufferConfig(high_water_bytes=1 << 22, low_water_bytes=1 << 21),
                               tmp_path / "spool")


class Client:
    def __init__(self, buffer: PrioritySpoolBuffer) -> None:
        self.buffer = buffer
        self.outcomes: dict[bytes, Outcome] = {}

    def send(self, value: bytes, key: bytes, high: bool = False) -> None:
        record = Record(cluster="default", topic="alarms" if high else "telemetry",
                        value=value, key=key, high_priority=high)
        record.ack = Ack(lambda o, v=value: self.outcomes.__setitem__(v, o), 1)  # type: ignore[misc]
        self.buffer.submit(record)

    def spooled(self, values: list[bytes]) -> bool:
        return all((o := self.outcomes.get(v)) is not None and o.ok and o.deliveries[0].spooled
                   for v in values)


def in_key_order(log: list[bytes], sent: list[bytes]) -> bool:
    first = [v for i, v in enumerate(log) if v in sent and v not in log[:i]]
    return first == sent


async def test_high_priority_records_drain_before_the_normal_backlog(tmp_path: Path) -> None:
    sink = OnOffKafka()
    buf = make(tmp_path, sink)
    await buf.start()
    client = Client(buf)
    sink.set_up(False)
    client.send(b"n-first", b"dev0")  # open in "librdkafka" when Kafka goes away
    client.send(b"h-first", b"dev0", high=True)
    # Both spilled: from now on both priorities take the spool path.
    await until(lambda: buf.normal.via_spool and buf.high.via_spool)
    # Backlogs larger than one turn of a replayer (PRODUCE_TURN) in both priorities.
    normal = [f"n{i}".encode() for i in range(3000)]
    high = [f"h{i}".encode() for i in range(1500)]
    for i, value in enumerate(normal):
        client.send(value, f"dev{i % 3}".encode())
        if i % 2 == 1:  # alarms among the telemetry, sent after older normal records
            client.send(high[i // 2], f"dev{i % 3}".encode(), high=True)
    await until(lambda: client.spooled(normal + high))
    assert buf.drain()["high"]["backlog_records"] == 1501
    sink.set_up(True)
    await until(lambda: set(normal + high) <= set(sink.log))
    log = sink.log
    last_high = max(log.index(v) for v in high)
    first_normal = min(log.index(v) for v in normal)
    assert last_high < first_normal, f"a normal record was written before an alarm: " \
        f"{first_normal} < {last_high}"
    for dev in range(3):  # per-key order within each priority
        key = f"dev{dev}"
        sent_n = [v for i, v in enumerate(normal) if i % 3 == dev]
        sent_h = [high[i // 2] for i in range(len(normal)) if i % 2 == 1 and i % 3 == dev]
        assert in_key_order(log, sent_n), key
        assert in_key_order(log, sent_h), key
    await until(lambda: not buf.via_spool)
    await buf.close(2.0)


async def test_drain_stats_show_oldest_age_backlog_and_rate(tmp_path: Path) -> None:
    sink = OnOffKafka()
    buf = make(tmp_path, sink)
    await buf.start()
    client = Client(buf)
    sink.set_up(False)
    client.send(b"first", b"k")
    await until(lambda: buf.normal.via_spool)  # the rest go through the spool: replayed
    values = [f"v{i}".encode() for i in range(500)]
    for value in values:
        client.send(value, b"k")
    await until(lambda: client.spooled(values))
    first = buf.drain()["normal"]
    assert first["backlog_records"] == 501 and first["backlog_bytes"] > 0
    await asyncio.sleep(0.3)
    later = buf.drain()["normal"]
    assert later["oldest_record_age_seconds"] > first["oldest_record_age_seconds"] > 0
    assert later["drain_records_per_second"] == 0
    sink.set_up(True)
    await until(lambda: buf.drain()["normal"]["backlog_records"] == 0)
    # The rate is sampled once a second by the buffer's timer.
    await until(lambda: buf.drain()["normal"]["drain_records_per_second"] > 0, timeout=10)
    done = buf.drain()["normal"]
    assert done["oldest_record_age_seconds"] == 0 and done["replayed_records"] >= 500
    assert done["replayed_bytes"] > 0
    await buf.close(2.0)


async def test_both_spools_share_max_bytes_and_alarms_keep_a_reserve(tmp_path: Path) -> None:
    sink = OnOffKafka()
    buf = make(tmp_path, sink, max_bytes=64 * 1024, mode="write-ahead")
    await buf.start()
    client = Client(buf)
    sink.set_up(False)
    for i in range(2000):  # far more than fits: the normal spool fills to its limit
        client.send(f"n{i}".encode() + b"x" * 100, b"k")
    await until(lambda: buf.normal.full)
    assert buf.flow.paused
    client.send(b"alarm", b"k", high=True)  # still fits: the reserve is the alarms'
    await until(lambda: client.spooled([b"alarm"]))
    assert buf.budget.used <= 64 * 1024
    assert buf.normal.spool.used_bytes + buf.high.spool.used_bytes == buf.budget.used
    sink.set_up(True)
    await until(lambda: len(client.outcomes) == 2001 and not buf.flow.paused)
    assert all(o.ok for o in client.outcomes.values())
    await buf.close(2.0)


async def test_a_crash_mid_drain_recovers_both_spools_high_first(tmp_path: Path) -> None:
    sink = OnOffKafka()
    buf = make(tmp_path, sink, mode="write-ahead")
    await buf.start()
    client = Client(buf)
    sink.set_up(False)
    for i in range(3000):
        client.send(f"n{i}".encode(), b"k")
        if i % 2 == 0:  # more alarms than one turn of the replayer hands over
            client.send(f"h{i}".encode(), b"k", high=True)
    await until(lambda: len(client.outcomes) == 4500)
    await buf.close(0.2)  # Kafka still away: everything stays on disk
    assert (tmp_path / "spool" / "high").is_dir()
    report = inspect_spool(str(tmp_path / "spool"))  # `lastmile spool inspect` counts both
    assert report["records"] == 4500 and report["high"]["records"] == 1500
    again = OnOffKafka()
    buf2 = make(tmp_path, again, mode="write-ahead")
    await buf2.start()
    await until(lambda: len(set(again.log)) == 4500)
    highs = [i for i, v in enumerate(again.log) if v.startswith(b"h")]
    normals = [i for i, v in enumerate(again.log) if v.startswith(b"n")]
    assert max(highs) < min(normals), (max(highs), min(normals), len(highs))
    await buf2.close(1.0)


def test_rule_priority_key() -> None:
    spec = RuleSpec(name="alarms", match="alarms/#", priority="high",
                    kafka=KafkaSpec(topic="alarms"))
    rule, problems = compile_rule(spec, 0, "r.yaml", 1, False)
    assert not problems and rule.high_priority
    spec = RuleSpec(name="t", match="t/#", kafka=KafkaSpec(topic="t"))
    assert not compile_rule(spec, 0, "r.yaml", 1, False)[0].high_priority
    spec = RuleSpec(name="d", match="d/#", action="drop", priority="high")
    assert compile_rule(spec, 0, "r.yaml", 1, False)[1]


