"""Which librdkafka compression for the sink: none, lz4 or zstd (not a test).

Produces the same records (100-byte JSON-ish telemetry, keyed by 100 devices)
with each codec to a fresh tansu broker and reports delivered records/s and
the producer's CPU seconds. Run: python -m benchmarks.bench_compression
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from confluent_kafka import Producer

from tests.helpers import Broker


def payload(i: int) -> bytes:
    body = {"device": f"dev-{i % 100}", "seq": i, "temp": 20 + (i % 37) / 10, "ok": True}
    return json.dumps(body).encode().ljust(100, b" ")


def run(bootstrap: str, codec: str, count: int) -> dict[str, float]:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 5,
                         "compression.type": codec, "statistics.interval.ms": 200,
                         "stats_cb": lambda raw: stats.append(json.loads(raw))})
    done = 0
    stats: list[dict[str, object]] = []

    def on_delivery(err: object, _msg: object) -> None:
        nonlocal done
        if err is None:
            done += 1

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(f"compression-{codec}", payload(i), key=b"dev-%d" % (i % 100),
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(60)
    time.sleep(0.3)
    producer.poll(0.1)
    elapsed_end = time.perf_counter()
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    del elapsed_end
    tx_bytes = float(stats[-1]["tx_bytes"]) if stats else 0.0  # type: ignore[arg-type]
    return {"records_per_s": done / elapsed, "cpu_s": cpu, "delivered": done,
            "wire_bytes_per_record": tx_bytes / max(done, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200_000)
    args = parser.parse_args()
    broker = Broker().start()
    try:
        for codec in ("none", "lz4", "zstd", "lz4", "zstd"):
            result = run(broker.bootstrap, codec, args.count)
            print(f"{codec:5s} {result['records_per_s']:10,.0f} rec/s  "
                  f"cpu {result['cpu_s']:.2f}s  wire {result['wire_bytes_per_record']:.1f} B/rec  "
                  f"delivered {result['delivered']:.0f}")
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
