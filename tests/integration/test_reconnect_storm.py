"""A reconnect storm (issue 14): 5,000 clients cut at once, then all reconnect together.

A real ``lastmile serve`` (2 workers, the shared session registry) with the connect-rate
limit on, the tansu broker, raw MQTT 5 clients in two processes (benchmarks/storm.py)
spread over source addresses 127.0.0.2..9.  Every socket is reset at once (SO_LINGER 0,
a cell going away); all 5,000 then reconnect at the same instant: those over the rate
get CONNACK 0x9F and retry after a jittered backoff, and in the end every one is served.
Meanwhile a separate connected QoS 1 publisher gets every PUBACK, is never disconnected,
and every message it had acked is in Kafka.  Its PUBACK p99 is reported, not asserted
(no speed assertions: "bounded" is a generous deadline).  The gateway's per-connection
structures (``lastmile_mqtt_state``) return to their pre-storm levels, then to zero.

Nothing is decided by a fixed sleep: every verdict polls /metrics with a deadline.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from benchmarks.storm import Publisher, Storm
from tests.helpers import Broker, running, wait_until

pytestmark = pytest.mark.integration

CLIENTS = 5_000
# Per worker: 500 at once, then 1,000 a second; a storm of 5,000 meets the limit.
RATE, BURST = 1_000, 500
PUBACK_DEADLINE_S = 30.0  # "bounded": generous, decides only "it never came"
_STATE = re.compile(r'^lastmile_mqtt_state\{name="(\w+)"\} ([0-9.eE+-]+)$', re.M)
_LAG = re.compile(r"^lastmile_event_loop_lag_seconds(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)


def levels(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {name: float(value) for name, value in _STATE.findall(text)}


def lag(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return max((float(v) for v in _LAG.findall(text)), default=-1.0)


def settled(port: int, want: dict[str, float]) -> dict[str, float] | None:
    got = levels(port)
    return got if all(got.get(k) == v for k, v in want.items()) else None


def test_reconnect_storm_serves_all_and_keeps_acks_flowing(
        gateway_factory: Any, broker: Broker, rules_dir: Path,
        record_property: Any) -> None:
    topic = f"storm-{uuid.uuid4().hex[:8]}"
    (rules_dir / "60-storm.yaml").write_text(
        f'rules:\n  - {{name: storm, match: "storm/#", kafka: {{topic: {topic}, '
        f'key: "{{client_id}}"}}}}\n')
    gw, ports = gateway_factory(workers=2, limits__connect_rate_per_s=RATE,
                                limits__connect_burst=BURST)
    with running(gw, ("127.0.0.1", ports["mqtt"])):
        metrics = ports["metrics"]
        empty = wait_until(lambda: settled(metrics, {"connections": 0}), 30,
                           what="/metrics with lastmile_mqtt_state")
        storm = Storm("127.0.0.1", ports["mqtt"], CLIENTS, procs=2, source_ips=8,
                      deadline=120.0, prefix=f"st-{topic}")
        storm.start()
        try:
            first = storm.connect()
            assert first["connected"] == CLIENTS, first
            pub = Publisher("127.0.0.1", ports["mqtt"], rate=50.0, topic="storm/pub",
                            client_id=f"pub-{topic}", grace=PUBACK_DEADLINE_S)
            pub.start()
            # Before the cut: every client and the publisher connected, nothing waiting.
            before = wait_until(lambda: settled(metrics, {
                "connections": CLIENTS + 1, "registry": CLIENTS + 1,
                "sessions_live": CLIENTS + 1, "write_paused": 0, "auth_pending": 0,
                "connects_waiting": 0, "handovers": 0}), 60, what="pre-storm levels")

            assert storm.cut() == CLIENTS
            again = storm.reconnect()
            # Every client is served in the end; some were told 0x9F first and retried.
            assert again["reconnected"] == CLIENTS and again["gave_up"] == 0, again
            assert again["failures"].get("0x9F", 0) > 0, again
            worst_lag = lag(metrics)
            # The structures come back to their pre-storm size (the cut's sessions gone).
            wait_until(lambda: settled(metrics, before), 60, what=f"levels back to {before}")
            result = pub.stop(timeout=PUBACK_DEADLINE_S + 60)
        finally:
            storm.close()
        assert "error" not in result, result
        assert result["disconnected"] is None, result  # never cut off by the storm
        assert result["late"] == 0 and result["refused"] == 0, result  # every PUBACK came
        assert result["max_s"] < PUBACK_DEADLINE_S, result
        p99 = result["p99_s"]
        record_property("storm_puback_p99_s", p99)
        record_property("storm_reconnect_all_in_s", again["all_in_s"])
        print(f"\nstorm of {CLIENTS}: all reconnected in {again['all_in_s']:.2f} s, "
              f"{again['failures']} retried; publisher {len(result['acked'])} PUBACKs, "
              f"p50 {result['p50_s'] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"max {result['max_s'] * 1000:.0f} ms; loop lag (last second) {worst_lag:.3f} s")

        # Every message the publisher was told is received is in Kafka.
        acked = set(result["acked"])
        records = broker.read(topic, len(acked), timeout=60)
        seen = {int(m.value().split(b":")[-1]) for m in records}
        assert acked <= seen, sorted(acked - seen)[:20]

        # Everyone gone: every structure back to empty (what it was before the first client).
        assert all(v == 0 for v in empty.values()), empty
        wait_until(lambda: settled(metrics, empty), 60, what=f"levels back to {empty}")
