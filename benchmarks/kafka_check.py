"""Check what a load-generator run left in Kafka: loss, duplicates, order, latency.

    python -m benchmarks.kafka_check --bootstrap 127.0.0.1:19092 --clients clients.json

Reads topic `bench` on every partition with Consumer.assign (no consumer
group), keeps the records of this run (the payload header carries run id,
client index, sequence number and send time), and compares them with what the
load generator says it sent (`loadgen --clients-out`). A QoS 1 message that
got a PUBACK and is not in Kafka is `lost_acked`: a broken delivery contract.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from benchmarks.mqttwire import PAYLOAD_MAGIC, decode_payload
from benchmarks.stats import summarize

Record = tuple[int, bytes | None, float]  # partition, value, timestamp ms (or read time)


def analyze(records: Iterable[Record], run_id: int, clients: dict[str, Any]) -> dict[str, Any]:
    """Pure accounting over records, in offset order within each partition.

    clients maps str(client index) -> [sent count, [seqs still unacked at the end]].
    """
    sent = {int(k): int(v[0]) for k, v in clients.items()}
    unacked = {int(k): set(v[1]) for k, v in clients.items()}
    seen: dict[int, bytearray] = {c: bytearray(n) for c, n in sent.items()}
    last: dict[int, int] = {}
    partitions: dict[int, set[int]] = {}
    total = foreign = other_run = dups = unexpected = order = 0
    lat_ms = array("d")
    for part, value, ts_ms in records:
        total += 1
        head = decode_payload(value or b"")
        if head is None:
            foreign += 1
            continue
        rid, client, seq, send_ns = head
        if rid != run_id:
            other_run += 1
            continue
        bitmap = seen.get(client)
        if bitmap is None or seq >= len(bitmap):
            unexpected += 1
            continue
        partitions.setdefault(client, set()).add(part)
        if bitmap[seq]:
            dups += 1
            continue
        bitmap[seq] = 1
        if seq < last.get(client, -1):
            order += 1
        else:
            last[client] = seq
        lat_ms.append(ts_ms - send_ns / 1e6)
    expected = sum(sent.values())
    unique = sum(sum(b) for b in seen.values())
    missing = expected - unique
    lost_acked = 0
    for c, bitmap in seen.items():
        if sum(bitmap) == len(bitmap):
            continue
        ua = unacked[c]
        lost_acked += sum(1 for s, got in enumerate(bitmap) if not got and s not in ua)
    return {
        "records_read": total,
        "run_records": total - foreign - other_run,
        "foreign_records": foreign,
        "other_run_records": other_run,
        "expected": expected,
        "unique": unique,
        "missing": missing,
        "lost_acked": lost_acked,
        "duplicates": dups,
        "unexpected": unexpected,
        "order_violations": order,
        "clients_on_several_partitions": sum(1 for p in partitions.values() if len(p) > 1),
        "e2e_latency_ms": summarize(lat_ms, 1.0, 2),
    }


def read_topic(
    bootstrap: str, topic: str, expected: int, run_id: int, idle: float, timeout: float
) -> Iterator[Record]:
    """Records of topic from offset 0 (streamed, in offset order per partition),
    until `expected` records of run_id were read, nothing new came for `idle`
    seconds, or `timeout`."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"lastmile-bench-check-{run_id}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 100,
            "log_level": 3,
        }
    )
    try:
        deadline = time.monotonic() + timeout
        parts: list[int] = []
        while not parts and time.monotonic() < deadline:
            md = c.list_topics(topic, timeout=5)
            tmd = md.topics.get(topic)
            if tmd is not None and not tmd.error and tmd.partitions:
                parts = sorted(tmd.partitions)
            else:
                time.sleep(0.5)
        if not parts:
            return
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        mine = 0
        last_new = time.monotonic()
        while mine < expected and time.monotonic() < deadline:
            if time.monotonic() - last_new > idle:
                break
            msgs = c.consume(num_messages=10_000, timeout=0.5)
            now_ms = time.time() * 1000
            for m in msgs:
                if m.error():
                    continue
                ttype, ts = m.timestamp()
                v = m.value()
                if v is not None and v[4:8] == run_tag(run_id) and v[:4] == PAYLOAD_MAGIC:
                    mine += 1
                yield m.partition(), v, ts if ttype and ts > 0 else now_ms
            if msgs:
                last_new = time.monotonic()
    finally:
        c.close()


def run_tag(run_id: int) -> bytes:
    return run_id.to_bytes(4, "big")


def check(
    bootstrap: str,
    clients_file: str,
    topic: str = "bench",
    idle: float = 10.0,
    timeout: float = 120.0,
) -> dict[str, Any]:
    with open(clients_file) as f:
        info = json.load(f)
    run_id, clients = int(info["run_id"]), info["clients"]
    expected = sum(int(v[0]) for v in clients.values())
    t0 = time.monotonic()
    records = read_topic(bootstrap, topic, expected, run_id, idle, timeout)
    res = analyze(records, run_id, clients)
    res["read_seconds"] = round(time.monotonic() - t0, 2)
    res["run_id"] = run_id
    res["qos"] = info.get("qos")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kafka_check", description=__doc__)
    ap.add_argument("--bootstrap", default="127.0.0.1:19092")
    ap.add_argument("--topic", default="bench")
    ap.add_argument("--clients", required=True, help="file written by loadgen --clients-out")
    ap.add_argument("--idle", type=float, default=10.0, help="stop after this long with no news")
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args(argv)
    res = check(a.bootstrap, a.clients, a.topic, a.idle, a.timeout)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0 if res["lost_acked"] == 0 and res["unexpected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
