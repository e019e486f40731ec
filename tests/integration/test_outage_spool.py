"""Kafka outages against SpoolBuffer + KafkaSink + a real tansu broker.

Two kinds of outage: the broker hung (SIGSTOP: connections stay open, nothing
answers) and the broker unreachable (a proxy the broker advertises as its
address is cut: connections reset, reconnects refused).  In both, acks go on
from the spool, every acked record reaches Kafka after recovery, and each
key's records arrive in the order they were sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from gateway.buffer.spooled import SpoolBuffer
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Cluster
from gateway.config.schema import Spool as SpoolConfig
from gateway.model import Ack, Outcome, Record
from gateway.sinks.kafka import KafkaSink
from tests.helpers import Broker, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEYS = 8
OUTAGE_S = 10.0


class CuttableProxy:
    """TCP proxy in front of the broker; ``cut()`` resets every connection and refuses new."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port, self.target_port = port, target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        self.writers.discard(writer)
        writer.transport.abort()


class Publisher:
    """Sends KEYS interleaved sequences, honouring backpressure like a source would."""

    def __init__(self, buffer: SpoolBuffer, topic: str) -> None:
        self.buffer, self.topic = buffer, topic
        self.acked: dict[int, list[int]] = defaultdict(list)
        self.failed = 0
        self.ack_times: list[float] = []
        self.sent = 0

    def on_done(self, key: int, n: int, outcome: Outcome) -> None:
        if outcome.ok:
            self.acked[key].append(n)
            self.ack_times.append(time.monotonic())
        else:
            self.failed += 1

    async def run(self, stop: asyncio.Event, rate: int = 400) -> None:
        n = 0
        while not stop.is_set():
            if self.buffer.flow.paused:
                await asyncio.sleep(0.01)
                continue
            for key in range(KEYS):
                record = Record(cluster="default", topic=self.topic, value=b"%d:%d" % (key, n),
                                key=b"key-%d" % key)
                record.ack = Ack(lambda o, k=key, i=n: self.on_done(k, i, o), 1)
                self.buffer.submit(record)
                self.sent += 1
            n += 1
            await asyncio.sleep(KEYS / rate)


def check_kafka(messages: list[Any], pub: Publisher) -> int:
    """Every acked record is in Kafka and each key's order holds; returns duplicates seen."""
    seen: dict[int, list[int]] = defaultdict(list)
    for msg in messages:
        key, n = (int(x) for x in msg.value().split(b":")[:2])
        seen[key].append(n)
    duplicates = 0
    for key, acked in pub.acked.items():
        got = seen[key]
        missing = set(acked) - set(got)
        assert not missing, f"key {key}: {len(missing)} acked records missing, e.g. {min(missing)}"
        first_seen: list[int] = []
        for n in got:
            if first_seen and n <= first_seen[-1]:
                assert n in first_seen, f"key {key}: {n} arrived after {first_seen[-1]}"
                duplicates += 1
                continue
            first_seen.append(n)
    return duplicates


async def until(predicate: Any, what: str, timeout: float = 90.0) -> None:
    """Poll ``predicate`` on the loop until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def run_outage(tmp_path: Path, mode: str, kind: str) -> None:
    kafka_port, proxy_port = free_port(), free_port()
    proxy = CuttableProxy(proxy_port, kafka_port)
    await proxy.open()
    broker = Broker(port=kafka_port, advertised_port=proxy_port).start()
    topic = f"outage-{mode}-{kind}"
    try:
        await asyncio.to_thread(broker.create_topic, topic, 3)
        # No librdkafka timeout (it would spool records too): acks during the outage
        # can only come from the spool taking over after spill_after_ms.
        sink = KafkaSink("default", Cluster(bootstrap_servers=broker.bootstrap,
                                            linger_ms=5, message_timeout_ms=600_000))
        await sink.start()
        buf = SpoolBuffer({"default": sink},
                          SpoolConfig(mode=mode, spill_after_ms=1_000,  # type: ignore[arg-type]
                                      fsync_interval_ms=5.0),
                          BufferConfig(), tmp_path / "spool")
        await buf.start()
        pub = Publisher(buf, topic)
        stop = asyncio.Event()
        sending = asyncio.create_task(pub.run(stop))
        await until(lambda: len(pub.ack_times) >= 200, "the first acks")
        if kind == "hung":
            broker.pause()
        else:
            await proxy.cut()
        outage_start = time.monotonic()
        # Acks go on from the spool: records sent after the outage began (Kafka cannot
        # have confirmed those) are acked. The outage then lasts OUTAGE_S at least.
        def acked_during() -> int:
            return sum(1 for t in pub.ack_times if t > outage_start + 2.0)

        await until(lambda: acked_during() >= 200, "acks from the spool during the outage")
        await asyncio.sleep(max(0.0, outage_start + OUTAGE_S - time.monotonic()))  # scenario
        if kind == "hung":
            broker.resume()
        else:
            await proxy.open()
        recovered = len(pub.ack_times)
        await until(lambda: len(pub.ack_times) >= recovered + 200, "acks after recovery")
        stop.set()
        await sending
        await until(lambda: buf.stats()["spool_records"] == 0
                    and not buf.stats()["replay_in_flight"], "the spool to drain")
        stats = buf.stats()
        await buf.close(5.0)
        await sink.close(5.0)

        total_acked = sum(len(v) for v in pub.acked.values())
        assert stats["spool_records"] == 0, stats
        assert pub.failed == 0 and total_acked == pub.sent
        messages = await asyncio.to_thread(broker.read, topic, total_acked, 60)
        duplicates = check_kafka(messages, pub)
        assert stats["lost_after_ack"] == 0
        print(f"{mode}/{kind}: acked={total_acked} during_outage={acked_during()} "
              f"duplicates={duplicates} stats={stats}")
    finally:
        broker.stop()
        with contextlib.suppress(Exception):
            await proxy.cut()


@pytest.mark.timeout(240)
async def test_broker_hung_kafka_mode(tmp_path: Path) -> None:
    await run_outage(tmp_path, "kafka", "hung")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["kafka", "write-ahead"])
async def test_broker_unreachable(tmp_path: Path, mode: str) -> None:
    await run_outage(tmp_path, mode, "unreachable")


@pytest.mark.timeout(240)
async def test_full_spool_pauses_intake_then_drains(tmp_path: Path, fresh_broker: Broker) -> None:
    topic = "outage-full"
    await asyncio.to_thread(fresh_broker.create_topic, topic, 1)
    sink = KafkaSink("default", Cluster(bootstrap_servers=fresh_broker.bootstrap, linger_ms=5))
    await sink.start()
    max_bytes = 64 << 10
    buf = SpoolBuffer({"default": sink},
                      SpoolConfig(mode="write-ahead", max_bytes=max_bytes, segment_bytes=8 << 10,
                                  fsync_interval_ms=5.0),
                      BufferConfig(), tmp_path / "spool")
    await buf.start()
    pub = Publisher(buf, topic)
    fresh_broker.pause()
    try:
        for n in range(250):  # ~2,000 records of ~200 bytes: four times what fits
            for key in range(KEYS):
                record = Record(cluster="default", topic=topic, key=b"key-%d" % key,
                                value=b"%d:%d:" % (key, n) + b"x" * 150)
                record.ack = Ack(lambda o, k=key, i=n: pub.on_done(k, i, o), 1)
                buf.submit(record)
                pub.sent += 1
        await until(lambda: buf.flow.paused and buf.full and pub.acked, "the spool full")
        acked_while_down = sum(len(v) for v in pub.acked.values())
        assert 0 < acked_while_down < pub.sent // 2  # only what the spool holds is acked
        assert buf.spool.used_bytes <= max_bytes and pub.failed == 0
    finally:
        fresh_broker.resume()
    await until(lambda: sum(len(v) for v in pub.acked.values()) == pub.sent
                and not buf.flow.paused, "every record acked and intake resumed")
    assert not buf.flow.paused and pub.failed == 0
    assert sum(len(v) for v in pub.acked.values()) == pub.sent
    await buf.close(10.0)
    await sink.close(5.0)
    messages = await asyncio.to_thread(fresh_broker.read, topic, pub.sent, 60)
    check_kafka(messages, pub)
