"""The physical floors the gateway's ack latency is judged against (issue 15).

    python -m benchmarks.floors [--bootstrap HOST:PORT] [--rate 20000 --duration 5]
    python -m benchmarks.floors --fsync-only [--dir DIR]
    python -m benchmarks.floors --max --bootstrap HOST:PORT [--duration 5]
    python -m benchmarks.floors --burn 0.6 --duration 5

- Kafka intake floor (``--max``): the same bare producer, with the gateway's own
  producer settings (``gateway.config.producer_settings`` of a default cluster:
  acks=all, idempotent, linger 5 ms, lz4, the same queue bounds), producing 100-byte
  records as fast as it can; on a full queue it polls and retries.  Prints a
  ``{"event": "start"}`` line when the clock starts and the result as soon as it
  stops (before the queue is purged), so a caller can sample the broker's CPU over
  exactly that window.  Delivered/s counts the reports of success seen in the window.
- ``--burn CORES``: a process that takes CORES of CPU (busy-waits until its CPU time
  is CORES x the wall time elapsed), standing in for a load generator's CPU share.

- Kafka floor: a bare confluent-kafka producer (acks=all, idempotent, linger 5 ms,
  lz4 as the gateway) producing 100-byte records keyed by 100 clients at a fixed
  rate to the same broker; latency from ``produce()`` to the delivery report.
  Reports are polled on the producing thread every millisecond (no GIL hand-over).
- fsync floor: ``write`` of a 2 KB append then ``fdatasync`` of the file, on the
  disk the spool uses; the latency of the pair.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from functools import partial
from typing import Any

from benchmarks.mqttwire import make_payload
from benchmarks.stats import summarize


def kafka_floor(bootstrap: str, rate: float, duration: float, payload: int = 100,
                clients: int = 100, topic: str = "bench-floor") -> dict[str, Any]:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 5,
                         "compression.type": "lz4"})
    lat: list[float] = []
    failed = 0

    def report(sent_at: float, err: Any, msg: Any) -> None:
        nonlocal failed
        if err is not None:
            failed += 1
            return
        lat.append(time.monotonic() - sent_at)

    value = b"x" * payload
    keys = [f"bench/c{i}".encode() for i in range(clients)]
    # Warm-up: metadata and the idempotent producer id before the clock starts.
    producer.produce(topic, value, keys[0], on_delivery=lambda e, m: None)
    producer.flush(10.0)
    t0 = time.monotonic()
    sent = 0
    end = t0 + duration
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - t0) * rate)
        while sent < due:
            producer.produce(topic, value, keys[sent % clients],
                             on_delivery=partial(report, now))
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    left = producer.flush(30.0)
    out: dict[str, Any] = {"rate": rate, "sent": sent, "failed": failed, "undelivered": left,
                           "delivery_ms": summarize(lat, 1000.0)}
    return out


def kafka_max(bootstrap: str, duration: float, payload: int = 100, clients: int = 100,
              topic: str = "bench-floor-max", emit: Any = None) -> dict[str, Any]:
    """A bare producer, the gateway's producer settings, as fast as it can."""
    from confluent_kafka import Producer

    from gateway.config import producer_settings
    from gateway.config.schema import Cluster

    settings = producer_settings(Cluster(), bootstrap)
    delivered = failed = 0

    def report(err: Any, msg: Any) -> None:  # one function for every record: no allocation
        nonlocal delivered, failed
        if err is None:
            delivered += 1
        else:
            failed += 1

    producer = Producer({**settings, "on_delivery": report})
    # The load generator's records (its payload header, zero padding; key = client id,
    # as the bench rule sets it), 100 per client made up front: compression sees the
    # same bytes as in the gateway's runs, and making them is not the producer's work.
    run_id = random.randrange(1, 2**31)
    t_ns = time.time_ns()
    pool = [(make_payload(run_id, c, seq, t_ns + seq * 1000, payload),
             f"lmb-{run_id}-{c}".encode()) for seq in range(100) for c in range(clients)]
    n_pool = len(pool)
    producer.produce(topic, *pool[0])  # metadata and the producer id first
    producer.flush(10.0)
    delivered = failed = 0
    produce, poll = producer.produce, producer.poll
    full = sent = 0
    if emit:
        emit({"event": "start"})
    cpu0, t0 = time.process_time(), time.monotonic()
    end = t0 + duration
    while time.monotonic() < end:
        for _ in range(500):
            try:
                produce(topic, *pool[sent % n_pool])
            except BufferError:  # queue.buffering.max.* reached: wait for reports
                full += 1
                poll(0.001)
                break
            sent += 1
        poll(0)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    out: dict[str, Any] = {
        "settings": {k: v for k, v in settings.items() if k != "bootstrap.servers"},
        "payload_bytes": payload, "clients": clients, "seconds": round(wall, 3),
        "produced": sent, "delivered": delivered, "failed": failed, "queue_full": full,
        "produced_per_s": round(sent / wall, 1), "delivered_per_s": round(delivered / wall, 1),
        # process_time counts every thread: Python's and librdkafka's.
        "producer_cpu_seconds": round(cpu, 3), "producer_cpu_cores": round(cpu / wall, 2),
        "producer_cpu_us_per_delivered": round(cpu / delivered * 1e6, 2) if delivered else None,
    }
    if emit:
        emit({"event": "result", **out})
    producer.purge(in_queue=True, in_flight=False)  # what is left is not measured
    producer.flush(10.0)
    return out


def burn(cores: float, seconds: float) -> float:
    """Use `cores` of one CPU for `seconds` of wall time; returns the CPU seconds used."""
    cpu0, t0 = time.process_time(), time.monotonic()
    while (now := time.monotonic()) - t0 < seconds:
        if time.process_time() - cpu0 < cores * (now - t0):
            stop = now + 0.001
            while time.monotonic() < stop:
                pass
        else:
            time.sleep(0.001)
    return time.process_time() - cpu0


def fsync_floor(directory: str, count: int = 2000, size: int = 2048) -> dict[str, Any]:
    data = os.urandom(size)
    lat: list[float] = []
    with tempfile.TemporaryDirectory(dir=directory, prefix="fsync-floor-") as tmp:
        fd = os.open(os.path.join(tmp, "seg"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for _ in range(count):
                t = time.perf_counter()
                os.write(fd, data)
                os.fdatasync(fd)
                lat.append(time.perf_counter() - t)
        finally:
            os.close(fd)
    return {"append_bytes": size, "fdatasync_ms": summarize(lat, 1000.0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.floors", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", help="Kafka for the Kafka floor (default: a new tansu)")
    ap.add_argument("--rate", type=float, default=20_000.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the fsync floor writes")
    ap.add_argument("--fsync-only", action="store_true")
    ap.add_argument("--max", action="store_true",
                    help="the Kafka intake floor: as fast as possible (needs --bootstrap)")
    ap.add_argument("--burn", type=float, metavar="CORES",
                    help="take CORES (0 < CORES <= 1) of CPU for --duration seconds")
    a = ap.parse_args(argv)
    if a.duration <= 0:
        ap.error("--duration must be > 0")
    if a.burn is not None:
        if not 0 < a.burn <= 1:
            ap.error("--burn takes 0 < CORES <= 1 (start one process per core)")
        print(json.dumps({"burn_cores": a.burn, "cpu_seconds": round(burn(a.burn, a.duration), 3)}))
        return 0
    if a.max:
        if not a.bootstrap:
            ap.error("--max needs --bootstrap")

        def emit(obj: dict[str, Any]) -> None:
            print(json.dumps(obj), flush=True)

        kafka_max(a.bootstrap, a.duration, emit=emit)
        return 0
    out: dict[str, Any] = {"fsync": fsync_floor(a.dir)}
    if a.fsync_only:
        pass
    elif a.bootstrap:
        out["kafka"] = kafka_floor(a.bootstrap, a.rate, a.duration)
    else:
        from pathlib import Path

        from benchmarks.servers import Tansu

        with tempfile.TemporaryDirectory(prefix="floors-") as tmp:
            broker = Tansu(Path(tmp))
            broker.start()
            try:
                out["kafka"] = kafka_floor(broker.bootstrap, a.rate, a.duration)
            finally:
                broker.stop()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
