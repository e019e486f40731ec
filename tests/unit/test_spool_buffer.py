"""SpoolBuffer against a fake sink: ack after fsync, spill, replay order, full, ENOSPC."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.buffer import spool as spool_mod
from gateway.buffer.spooled import SpoolBuffer
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Spool as SpoolConfig
from gateway.errors import DeliveryFailed, GatewayError, SpoolError
from gateway.model import Ack, Delivery, Outcome, Record

pytestmark = pytest.mark.unit


class FakeSink:
    """Holds produced records until the test decides what Kafka says."""

    def __init__(self) -> None:
        self.pending: list[tuple[Record, Callable[..., None]]] = []
        self.log: list[bytes] = []  # values Kafka accepted, in order

    def produce(self, record: Record, callback: Callable[..., None]) -> None:
        self.pending.append((record, callback))

    def deliver(self, n: int | None = None) -> None:
        batch, self.pending = self.pending[:n], self.pending[len(self.pending[:n]):]
        for record, cb in batch:
            self.log.append(record.value)
            cb(record, Delivery(cluster="default", topic=record.topic, offset=len(self.log)), None)

    def fail(self, error: GatewayError) -> None:
        batch, self.pending = self.pending, []
        for record, cb in batch:
            cb(record, None, error)


class Client:
    """Submits records with acks and remembers every outcome."""

    def __init__(self, buffer: SpoolBuffer) -> None:
        self.buffer = buffer
        self.outcomes: dict[bytes, Outcome] = {}

    def send(self, value: bytes, topic: str = "t") -> None:
        record = Record(cluster="default", topic=topic, value=value, key=b"k")
        record.ack = Ack(lambda o, v=value: self.outcomes.__setitem__(v, o), 1)  # type: ignore[misc]
        self.buffer.submit(record)

    def acked(self) -> list[bytes]:
        return [v for v, o in self.outcomes.items() if o.ok]


def make(tmp_path: Path, sink: FakeSink, dead_letter: Any = None, **spool: Any) -> SpoolBuffer:
    cfg = SpoolConfig(**{"fsync_interval_ms": 2.0, "spill_after_ms": 200, **spool})
    return SpoolBuffer({"default": sink}, cfg,  # type: ignore[dict-item]
                       BufferConfig(high_water_bytes=1 << 20, low_water_bytes=1 << 19),
                       tmp_path / "spool", dead_letter=dead_letter)


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_write_ahead_acks_after_fsync_then_replays_in_order(tmp_path: Path) -> None:
    sink = FakeSink()
    buf = make(tmp_path, sink, mode="write-ahead")
    await buf.start()
    client = Client(buf)
    for i in range(500):
        client.send(b"%d" % i)
    assert client.outcomes == {}  # nothing acked before the fsync
    await until(lambda: len(client.acked()) == 500)
    assert all(o.deliveries[0].spooled for o in client.outcomes.values())
    assert buf.spool.fsyncs < 50  # group commit
    await until(lambda: len(sink.pending) == 500)
    sink.deliver()
    assert sink.log == [b"%d" % i for i in range(500)]
    await until(lambda: buf.stats()["spool_records"] == 0)
    await buf.close(2.0)


async def test_unconfirmed_spool_survives_restart(tmp_path: Path) -> None:
    sink = FakeSink()
    buf = make(tmp_path, sink, mode="write-ahead")
    await buf.start()
    client = Client(buf)
    for i in range(50):
        client.send(b"%d" % i)
    await until(lambda: len(sink.pending) == 50)
    sink.deliver(20)
    await buf.close(0.5)  # Kafka "down" for the other 30

    sink2 = FakeSink()
    buf2 = make(tmp_path, sink2, mode="write-ahead")
    await buf2.start()
    await until(lambda: len(sink2.pending) >= 30)
    sink2.deliver()
    # Seqs 0..19 were confirmed and must not come back; 20..49 replay in order.
    assert sink2.log[:30] == [b"%d" % i for i in range(20, 50)]
    await buf2.close(1.0)


async def test_kafka_mode_acks_on_delivery_and_spills_when_kafka_stalls(tmp_path: Path) -> None:
    sink = FakeSink()
    buf = make(tmp_path, sink, mode="kafka")
    await buf.start()
    client = Client(buf)
    client.send(b"a")
    sink.deliver()
    assert client.outcomes[b"a"].ok and not client.outcomes[b"a"].deliveries[0].spooled

    for v in (b"b", b"c"):
        client.send(v)  # Kafka stalls: no delivery report
    await until(lambda: len(client.acked()) == 3)  # spilled after spill_after_ms, then fsynced
    assert client.outcomes[b"c"].deliveries[0].spooled
    client.send(b"d")  # spool not empty: new records queue behind b, c
    await until(lambda: b"d" in client.outcomes)
    assert [r.value for r, _ in sink.pending] == [b"b", b"c"]  # d waits for b, c's verdict
    sink.deliver()  # Kafka comes back: the direct attempts of b, c land
    await until(lambda: [r.value for r, _ in sink.pending] == [b"d"])
    sink.deliver()
    assert sink.log == [b"a", b"b", b"c", b"d"]  # no duplicates, order kept
    await until(lambda: not buf.via_spool)
    client.send(b"e")
    sink.deliver()
    assert client.outcomes[b"e"].deliveries[0].spooled is False
    await buf.close(1.0)


async def test_kafka_mode_retriable_failure_spools_permanent_fails(tmp_path: Path) -> None:
    sink = FakeSink()
    buf = make(tmp_path, sink, mode="kafka")
    await buf.start()
    client = Client(buf)
    client.send(b"big")
    sink.fail(DeliveryFailed("too large", retriable=False))
    assert client.outcomes[b"big"].ok is False

    client.send(b"x")
    sink.fail(DeliveryFailed("message timed out", retriable=True))
    await until(lambda: b"x" in client.outcomes)
    assert client.outcomes[b"x"].ok and client.outcomes[b"x"].deliveries[0].spooled
    await until(lambda: len(sink.pending) == 1)  # the replayer tries again from the spool
    sink.deliver()
    assert sink.log == [b"x"]
    await buf.close(1.0)


async def test_refused_after_ack_goes_to_dead_letter_or_is_counted_lost(tmp_path: Path) -> None:
    sink = FakeSink()
    seen: list[str] = []

    def dead_letter(record: Record, reason: str) -> Record | None:
        seen.append(reason)
        if record.value == b"nodlq":
            return None
        return Record(cluster="default", topic="dlq", value=record.value)

    buf = make(tmp_path, sink, mode="write-ahead", dead_letter=dead_letter)
    await buf.start()
    client = Client(buf)
    client.send(b"toobig")
    client.send(b"nodlq")
    await until(lambda: len(sink.pending) == 2)
    sink.fail(DeliveryFailed("MSG_SIZE_TOO_LARGE", retriable=False))
    await until(lambda: len(sink.pending) == 1)
    assert sink.pending[0][0].topic == "dlq"
    sink.deliver()
    await until(lambda: buf.stats()["spool_records"] == 0)
    assert buf.counters["dead_lettered"] == 1 and buf.counters["lost_after_ack"] == 1
    assert len(seen) == 2
    await buf.close(1.0)


async def test_full_spool_pauses_and_never_acks_unsaved(tmp_path: Path) -> None:
    sink = FakeSink()
    buf = make(tmp_path, sink, mode="write-ahead", max_bytes=4096, segment_bytes=1024)
    await buf.start()
    pauses: list[bool] = []
    buf.flow.subscribe(pauses.append)
    client = Client(buf)
    for i in range(200):
        client.send(b"%03d" % i + b"x" * 40)
    await until(lambda: buf.full and not buf.unsynced)
    acked = len(client.acked())
    assert 0 < acked < 200 and len(client.outcomes) == acked  # the rest wait, unacked
    assert buf.flow.paused and pauses == [True]
    assert buf.spool.used_bytes <= 4096
    deadline = asyncio.get_running_loop().time() + 60
    while len(sink.log) < 200:  # Kafka back: deliveries free segments, waiting records get in
        assert asyncio.get_running_loop().time() < deadline, len(sink.log)
        sink.deliver()
        await asyncio.sleep(0.05)
    await until(lambda: not buf.flow.paused)
    assert len(client.acked()) == 200
    assert sink.log == [b"%03d" % i + b"x" * 40 for i in range(200)]
    await buf.close(1.0)


async def test_enospc_fails_acks_and_pauses_instead_of_acking(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = FakeSink()
    buf = make(tmp_path, sink, mode="write-ahead")
    await buf.start()
    client = Client(buf)
    client.send(b"ok")
    await until(lambda: b"ok" in client.outcomes)

    def no_space(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    real_write = os.write
    monkeypatch.setattr(spool_mod.os, "write", no_space)
    client.send(b"lost-space")
    await until(lambda: b"lost-space" in client.outcomes)
    outcome = client.outcomes[b"lost-space"]
    assert outcome.ok is False and isinstance(outcome.error, SpoolError)
    assert buf.flow.paused
    monkeypatch.setattr(spool_mod.os, "write", real_write)
    await until(lambda: not buf.flow.paused, timeout=3.0)  # retried after a pause
    client.send(b"after")
    await until(lambda: b"after" in client.outcomes)
    assert client.outcomes[b"after"].ok
    await until(lambda: len(sink.pending) == 2)
    sink.deliver()
    assert sink.log == [b"ok", b"after"]  # the failed record is not replayed as if saved
    await buf.close(1.0)


@pytest.mark.parametrize("mode", ["kafka", "write-ahead"])
async def test_unknown_cluster_fails_the_ack_and_spools_nothing(tmp_path: Path, mode: str) -> None:
    sink = FakeSink()
    buf = make(tmp_path, sink, mode=mode)
    await buf.start()
    outcomes: list[Outcome] = []
    record = Record(cluster="nope", topic="t", value=b"v")
    record.ack = Ack(outcomes.append, 1)
    buf.submit(record)
    assert len(outcomes) == 1 and outcomes[0].ok is False
    assert "no Kafka cluster named 'nope'" in str(outcomes[0].error)
    assert sink.pending == [] and buf.spool.next_seq == 0 and buf.mem_bytes == 0
    await buf.close(1.0)


def count_reads(buf: SpoolBuffer, monkeypatch: pytest.MonkeyPatch,
                slow: float = 0.0) -> list[int]:
    """The cursor of every disk read of ``buf``'s replayer, in order; with ``slow``, each
    read takes that much longer after reading (more batches are written meanwhile)."""
    reads: list[int] = []
    read = buf.spool.read

    def counted(cursor: int, max_records: int) -> Any:
        reads.append(cursor)
        got = read(cursor, max_records)
        if slow:
            time.sleep(slow)
        return got

    monkeypatch.setattr(buf.spool, "read", counted)
    return reads


async def test_write_ahead_does_not_read_back_a_batch_whose_durable_callback_is_coming(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread marks a batch written before its callback reaches the loop; a
    replayer woken in between (a Kafka report, a tick) must wait for the callback's
    in-memory records, not read the batch back from disk."""
    sink = FakeSink()
    buf = make(tmp_path, sink, mode="write-ahead")
    reads = count_reads(buf, monkeypatch)
    post = buf.spool._post
    loop = asyncio.get_running_loop()

    def late(callback: Any, *args: object) -> None:
        if callback == buf._on_durable:  # the replayer runs first, the callback after it
            loop.call_soon_threadsafe(buf.replayer.wake)
            loop.call_soon_threadsafe(loop.call_later, 0.02, callback, *args)
        else:
            post(callback, *args)

    monkeypatch.setattr(buf.spool, "_post", late)
    await buf.start()
    client = Client(buf)
    for i in range(100):
        client.send(b"%d" % i)
        if i % 10 == 9:
            await until(lambda n=i + 1: len(client.acked()) == n)  # type: ignore[misc]
    await until(lambda: len(sink.pending) == 100)
    assert reads == []  # every batch came from memory
    sink.deliver()
    assert sink.log == [b"%d" % i for i in range(100)]
    await buf.close(2.0)


async def test_write_ahead_catches_up_with_memory_after_one_disk_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replayer sent to the disk once (here: one refused offer) takes the batches
    that became durable during that read from memory afterwards, instead of reading
    every later batch back while the traffic lasts."""
    sink = FakeSink()
    buf = make(tmp_path, sink, mode="write-ahead")
    reads = count_reads(buf, monkeypatch, slow=0.05)  # a read behind a busy disk or GIL
    offer = buf.replayer.offer
    refused: list[int] = []

    def refuse_first(records: list[Any]) -> bool:
        if not refused:
            refused.append(records[0][0])
            return False
        return offer(records)

    monkeypatch.setattr(buf.replayer, "offer", refuse_first)
    await buf.start()
    client = Client(buf)
    for i in range(300):
        client.send(b"%d" % i)
        if i % 5 == 4:
            await until(lambda n=i + 1: len(client.acked()) == n)  # type: ignore[misc]
            await asyncio.sleep(0.005)
    await until(lambda: len(sink.pending) == 300)
    assert reads == [0]  # one read for the refused batch, memory from then on
    sink.deliver()
    assert sink.log == [b"%d" % i for i in range(300)]  # in order, no gap, no duplicate
    await buf.close(2.0)


async def test_write_ahead_replays_from_memory_then_from_disk_when_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caught-up replayer takes just-fsynced records from memory (no disk read); when
    it cannot (here: told so), the disk read picks up exactly where memory stopped."""
    sink = FakeSink()
    buf = make(tmp_path, sink, mode="write-ahead")
    reads = count_reads(buf, monkeypatch)
    await buf.start()
    client = Client(buf)
    for i in range(200):
        client.send(b"%d" % i)
        if i % 50 == 49:
            await until(lambda n=i + 1: len(client.acked()) == n)  # type: ignore[misc]
    await until(lambda: len(sink.pending) == 200)
    assert reads == []  # every batch came from memory
    sink.deliver()
    monkeypatch.setattr(buf.replayer, "offer", lambda records: False)
    for i in range(200, 400):
        client.send(b"%d" % i)
    await until(lambda: len(sink.pending) == 200)
    assert reads and reads[0] == 200  # the disk read starts where memory stopped
    sink.deliver()
    assert sink.log == [b"%d" % i for i in range(400)]  # in order, no gap, no duplicate
    await until(lambda: buf.stats()["spool_records"] == 0)
    await buf.close(2.0)
