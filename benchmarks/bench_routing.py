"""Routing throughput against 10, 100 and 1,000 rules (not a test; run by hand).

    .venv/bin/python benchmarks/bench_routing.py [--messages N] [--write FILE]

Each rule set is realistic rather than trivial: every rule has a filter with
two named captures and a '#' tail, a topic template, a key template and a
header; one in four checks a JSON payload; the set ends with a catch-all.
Topics are drawn over all rules so the trie, not a lucky first rule, does the
work.  Figures are single-core, one process, no I/O: the cost routing adds to
each message, to compare with the per-message budget of the MQTT path.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from gateway.model import Message
from gateway.routing import Router, load_rules

PAYLOAD = b'{"device": {"id": "d-17"}, "temp": 21.5, "ok": true}'


def write_rules(directory: Path, count: int) -> None:
    lines = ["dead_letter: {topic: lastmile.dead-letter}", "rules:"]
    for i in range(count - 1):
        json_rule = i % 4 == 0
        lines += [
            f"  - name: site{i}",
            f'    match: "site{i}/{{area}}/{{device}}/#"',
            *(["    payload: {format: json, max_bytes: 4096}"] if json_rule else []),
            "    kafka:",
            f'      topic: "edge.site{i}.{{area}}"',
            '      key: "{json:/device/id}"' if json_rule else '      key: "{device}"',
            '      headers: {mqtt-topic: "{topic}"}',
        ]
    lines += ['  - {name: rest, match: "#", kafka: {topic: rest}}']
    (directory / "rules.yaml").write_text("\n".join(lines) + "\n")


def messages(count: int, n: int, rng: random.Random, topics: int = 0) -> list[Message]:
    """``n`` messages; with ``topics``, drawn from that many distinct topics (devices repeat)."""
    if topics:
        pool = messages(count, topics, rng)
        return [rng.choice(pool) for _ in range(n)]
    out = []
    for _ in range(n):
        site = rng.randrange(count)  # count-1 is unmatched by a site rule: the catch-all
        topic = f"site{site}/area{rng.randrange(8)}/dev{rng.randrange(1000)}/telemetry/temp"
        out.append(Message(source="mqtt", topic=topic, payload=PAYLOAD, client_id="c1", qos=1))
    return out


def bench(count: int, n: int, repeats: int, topics: int = 0) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        write_rules(Path(tmp), count)
        started = time.perf_counter()
        table = load_rules(tmp)
        load_ms = (time.perf_counter() - started) * 1000
    router = Router(table)
    batch = messages(count, n, random.Random(count), topics)
    route = router.route
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for message in batch:
            route(message)
        rates.append(n / (time.perf_counter() - started))
    assert not router.refused_by_reason, router.refused_by_reason
    return statistics.median(rates), load_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", help="write a Markdown section to this file")
    parser.add_argument("--topics", type=int, default=0,
                        help="distinct topics to draw from (0: a fresh random topic each)")
    args = parser.parse_args()
    rows = []
    for count in (10, 100, 1000):
        rate, load_ms = bench(count, args.messages, args.repeats, args.topics)
        rows.append(f"| {count:>5} | {rate:>12,.0f} | {1e6 / rate:>8.2f} | {load_ms:>8.1f} |")
        print(rows[-1], flush=True)
    section = "\n".join(
        [
            "## Routing (rules -> Kafka records)",
            "",
            f"`benchmarks/bench_routing.py --messages {args.messages}`, median of "
            f"{args.repeats} runs, one core, Python {platform.python_version()} on "
            f"{platform.machine()}; no I/O, so no Mosquitto column: this is the cost",
            "routing adds per message. Each rule: two captures, topic/key/header templates;",
            "one in four parses and validates a JSON payload and keys by a JSON pointer.",
            "",
            "| rules | routes/second | us/route | load ms |",
            "| ----: | ------------: | -------: | ------: |",
            *rows,
            "",
        ]
    )
    print(section)
    if args.write:
        Path(args.write).write_text(section)


if __name__ == "__main__":
    main()
