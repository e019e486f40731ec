"""The physical floors the gateway's ack latency is judged against (issue 15).

    python -m benchmarks.floors [--bootstrap HOST:PORT] [--rate 20000 --duration 5]
    python -m benchmarks.floors --fsync-only [--dir DIR]

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
import sys
import tempfile
import time
from functools import partial
from typing import Any

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
    a = ap.parse_args(argv)
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
