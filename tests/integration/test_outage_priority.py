"""A Kafka outage under a QoS 1 fleet, with a small spool and high-priority alarms.

``lastmile serve`` with its own tansu broker, which is paused (SIGSTOP) for
``OUTAGE_S`` while ``benchmarks/outage_fleet.Fleet`` publishes telemetry
(``tele/<id>``) and alarms (``alarm/<id>``, a rule with ``priority: high``):

- backpressure: the spool (``spool.max_bytes`` 4 MiB) fills, sources pause
  (/readyz 503, ``paused``), the spool never exceeds its bound, and every
  PUBACKed message is in Kafka afterwards (nothing acknowledged is dropped);
- per-key order: each client's messages reach Kafka in the order sent
  (duplicates allowed, at least once);
- priority drain: every alarm PUBACKed from the spool during the outage was
  handed to Kafka before any telemetry record PUBACKed from the spool during
  the outage.  Compared by Kafka CreateTime, which librdkafka stamps when the
  gateway hands the record over (a replayed record: at replay): the normal
  replay hands nothing over until Kafka has confirmed every high record, so a
  smaller CreateTime here means "in Kafka first";
- /readyz and /metrics show the oldest spooled record's age growing during
  the outage and a drain rate above 0 after it.

2,000 msg/s telemetry plus 300 msg/s alarms offered and a 60 s outage, as the
issue asks (the spool is full ~10 s in; from then on sources stay paused).  On
the loaded 2-core box the fleet sends what the windows allow; the rest is
counted as "not sent".
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from benchmarks import mqttwire as w
from benchmarks.outage_fleet import Fleet
from tests.helpers import Broker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE = 2_000
ALARM_RATE = 300  # a fifth of the traffic: a high backlog of several replay turns
OUTAGE_S = 60.0
MAX_BYTES = 4 << 20
RULES = """\
rules:
  - name: alarms
    match: "alarm/#"
    priority: high
    kafka: {topic: alarms}
  - name: telemetry
    match: "tele/#"
    kafka: {topic: telemetry}
"""


def readyz(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:  # 503 while paused: the body says why
        return json.loads(exc.read())  # type: ignore[no-any-return]


def metric(port: int, name: str, priority: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{priority="{priority}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{priority={priority}}} not in /metrics")


@pytest.mark.timeout(420)
def test_outage_backpressure_order_and_priority_drain(
        gateway_factory: Any, fresh_broker: Broker, rules_dir: Path) -> None:
    for old in rules_dir.glob("*.yaml"):
        old.unlink()
    (rules_dir / "rules.yaml").write_text(RULES)
    proc, ports = gateway_factory(bootstrap=fresh_broker.bootstrap, spool__max_bytes=MAX_BYTES,
                                  spool__spill_after_ms=1000)
    proc.start(("127.0.0.1", ports["mqtt"]))
    mport = ports["metrics"]
    fleet = Fleet(ports["mqtt"], clients=20, rate=RATE, alarm_clients=4,
                  alarm_rate=ALARM_RATE, payload_size=100).start()
    try:
        wait_until(lambda: fleet.acked_count() >= 3_000, 60)  # Kafka takes them
        fresh_broker.pause()
        paused_at = time.monotonic()
        spool = lambda: readyz(mport)["spool"]  # noqa: E731
        # Both priorities go through their spools from here on.
        wait_until(lambda: all(s["draining"] for s in spool().values()), 30)
        spooling_ns = time.time_ns() + 500_000_000
        age_1 = spool()["normal"]["oldest_record_age_seconds"]
        wait_until(lambda: spool()["normal"]["oldest_record_age_seconds"] >= age_1 + 2, 30)
        assert metric(mport, "lastmile_spool_oldest_record_age_seconds", "normal") > 0
        # The spool fills: sources pause; it never goes past max_bytes.
        most = 0
        backpressure = False
        while time.monotonic() - paused_at < OUTAGE_S:
            state = readyz(mport)
            most = max(most, state["buffer"]["spool_bytes"])
            backpressure = backpressure or state["paused"]
            time.sleep(0.2)
        assert backpressure, "the spool never filled: sources were never paused"
        assert most <= MAX_BYTES, f"spool at {most} bytes, over max_bytes {MAX_BYTES}"
        skipped_in_outage = fleet.skipped
        fresh_broker.resume()
        resumed = time.monotonic()
        acked_in_outage = fleet.acked_before(resumed)
        rates: list[float] = []

        def drained() -> bool:
            s = spool()
            rates.append(s["normal"]["drain_records_per_second"])
            return all(p["backlog_records"] == 0 and not p["draining"] for p in s.values())

        wait_until(drained, 180, interval=0.5)
        drain_s = time.monotonic() - resumed
        # The rate is over the last 10 s, sampled once a second: a short drain shows after.
        def rate_shown() -> bool:
            rates.append(spool()["normal"]["drain_records_per_second"])
            return max(rates) > 0

        wait_until(rate_shown, 15)
        assert max(rates) > 0, "no drain rate shown after the backlog drained"
        assert metric(mport, "lastmile_spool_replayed_records_total", "normal") > 0
        # /metrics is refreshed once a second.
        wait_until(lambda: metric(mport, "lastmile_spool_oldest_record_age_seconds",
                                  "normal") == 0, 10)
    finally:
        fleet.stop(grace=60)
        lat = [x for _, x, _ in fleet.latencies]
        print(f"sent {fleet.sent}, acked {fleet.acked_count()}, not sent (window full) "
              f"{fleet.skipped}, failed {fleet.failed()}, lost conns {fleet.lost_connections()}"
              f", PUBACK p50 {sorted(lat)[len(lat) // 2] * 1e3 if lat else 0:.1f} ms")
    print(f"skipped during the outage {skipped_in_outage}, drain {drain_s:.1f} s")
    assert fleet.failed() == 0 and fleet.lost_connections() == 0

    acked = fleet.acked()
    alarm_ids = fleet.alarm_ids()
    total = sum(len(v) for v in acked.values())
    records = fresh_broker.read("telemetry", total - sum(len(acked[a]) for a in alarm_ids),
                                timeout=90)
    records += fresh_broker.read("alarms", sum(len(acked[a]) for a in alarm_ids), timeout=60)
    got: dict[str, list[int]] = {}
    sent_ns: dict[tuple[str, int], int] = {}
    created: dict[tuple[str, int], int] = {}
    for msg in records:
        decoded = w.decode_payload(msg.value())
        assert decoded is not None
        _, idx, seq, send_ns = decoded
        cid = f"fleet-{idx}"
        assert msg.key() == cid.encode()
        got.setdefault(cid, []).append(seq)
        sent_ns[(cid, seq)] = send_ns
        created.setdefault((cid, seq), msg.timestamp()[1])  # first copy
    # Nothing acknowledged is dropped; per-key order holds (first copies).
    for cid, seqs in acked.items():
        missing = set(seqs) - set(got.get(cid, []))
        assert not missing, f"{cid}: {len(missing)} PUBACKed messages not in Kafka"
        first: list[int] = []
        seen: set[int] = set()
        for seq in got[cid]:
            if seq not in seen:
                seen.add(seq)
                first.append(seq)
        assert first == sorted(first), f"{cid}: order broken in Kafka"
    # Priority: spooled during the outage (sent once both spools were in use, PUBACKed
    # before Kafka came back), every alarm handed over before any telemetry record.
    highs, normals = [], []
    for cid, seqs in acked_in_outage.items():
        for seq in seqs:
            if sent_ns[(cid, seq)] >= spooling_ns:
                (highs if cid in alarm_ids else normals).append(created[(cid, seq)])
    print(f"spooled during the outage: {len(highs)} alarms, {len(normals)} telemetry")
    assert len(highs) >= 10 and len(normals) >= 1_000
    assert max(highs) <= min(normals), (
        f"{sum(1 for h in highs if h > min(normals))} of {len(highs)} alarms reached Kafka "
        "after telemetry that waited in the spool with them")
