"""Lastmile's delivery modes on the same QoS 1 load, with and without a Kafka hang.

Each variant gets a fresh tansu broker and gateway; the load is the plan's
``qos1_rate`` scenario (same load generator as every other figure). The
outage variant SIGSTOPs the broker for a while in the middle of the run; the
Kafka check afterwards counts what was PUBACKed but is missing.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

from benchmarks import kafka_check
from benchmarks.servers import Lastmile, StartError, Tansu

# (label, gateway config overrides, seconds of Kafka hang in the middle of the run)
VARIANTS: list[tuple[str, dict[str, Any], float]] = [
    ("spool off (ack on Kafka report)", {"spool": {"enabled": False}}, 0.0),
    ("spool kafka mode (default)", {}, 0.0),
    ("spool write-ahead", {"spool": {"mode": "write-ahead"}}, 0.0),
    ("spool kafka mode, Kafka hung mid-run", {"spool": {"spill_after_ms": 1000}}, 5.0),
    ("spool off, Kafka hung mid-run", {"spool": {"enabled": False}}, 5.0),
]


def _hang(tansu: Tansu, after: float, seconds: float) -> threading.Timer:
    def stop_then_continue() -> None:
        os.kill(tansu.pid, signal.SIGSTOP)
        threading.Timer(seconds, lambda: os.kill(tansu.pid, signal.SIGCONT)).start()

    timer = threading.Timer(after, stop_then_continue)
    timer.start()
    return timer


def bench_modes(plan: Any, scenario: Any, workdir: Path, run_loadgen: Any,
                log: Any = print) -> dict[str, Any]:
    out: dict[str, Any] = {}
    duration = float(scenario.args.get("duration", 10))
    for i, (label, overrides, hang) in enumerate(VARIANTS):
        sub = workdir / f"mode-{i}"
        sub.mkdir()
        t, g = Tansu(sub), Lastmile(sub)
        try:
            t.start()
            g.start(t.bootstrap, plan.publish_workers, overrides)
        except (StartError, OSError) as e:
            g.stop()
            t.stop()
            out[label] = {"error": f"not measured: {e}"}
            continue
        try:
            timer = _hang(t, duration / 3, hang) if hang else None
            clients = sub / "clients.json"
            res = run_loadgen(scenario, g, random.randrange(1, 2**31), clients, log)
            if timer is not None:
                timer.join()
            if clients.exists():
                res["kafka"] = kafka_check.check(t.bootstrap, str(clients), idle=10.0,
                                                 timeout=180.0)
            res["kafka_hang_s"] = hang
            out[label] = res
        except Exception as e:  # one broken variant must not hide the others
            out[label] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            g.stop()
            t.stop()
    return out
