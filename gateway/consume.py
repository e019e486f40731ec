"""``lastmile consume``: print what reached a Kafka topic (for walkthroughs and checks).

Reads every partition from the start with ``assign`` (no consumer group), so it
works against the embedded dev broker too, where Debian's kcat cannot connect.
"""

from __future__ import annotations

import sys
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition


def _text(raw: str | bytes | None) -> str:
    if raw is None:
        return "-"
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.hex()


def consume(bootstrap: str, topic: str, timeout: float, headers: bool) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "lastmile-consume",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        try:
            md = consumer.list_topics(topic, timeout=10)
        except KafkaException as exc:
            print(f"lastmile: cannot reach Kafka at {bootstrap}: {exc}", file=sys.stderr)
            return 1
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            print(f"lastmile: no topic '{topic}' at {bootstrap}", file=sys.stderr)
            return 1
        consumer.assign([TopicPartition(topic, p, 0) for p in sorted(meta.partitions)])
        idle_until = time.monotonic() + timeout
        while time.monotonic() < idle_until:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is not None:
                    continue
                idle_until = time.monotonic() + timeout
                line = f"{msg.partition()}:{msg.offset()} {_text(msg.key())} {_text(msg.value())}"
                pairs = msg.headers() or []
                if headers and isinstance(pairs, list):
                    line += " " + " ".join(f"{k}={_text(v)}" for k, v in pairs)
                print(line, flush=True)
        return 0
    finally:
        consumer.close()
