"""A long Kafka outage under load: spool bytes, time to drain, live PUBACK p99 during it.

    python -m benchmarks.bench_outage [--outage-s 600] [--rate 5000] [--workers 2]

``lastmile serve`` (shipped spool limits: ``spool.max_bytes`` 1 GiB per worker,
hand-off mode) in front of a tansu broker; ``benchmarks/outage_fleet.Fleet``
offers ``--rate`` msg/s QoS 1 telemetry plus ``--alarm-rate`` alarms (a rule
with ``priority: high``).  After a warm-up the broker is paused (SIGSTOP) for
``--outage-s``, then resumed; the fleet keeps publishing throughout.  Measured
from ``/metrics`` (summed over workers) once a second:

- spool bytes at the end of the outage (``lastmile_spool_backlog_bytes``) and
  the records owed (``lastmile_spool_backlog_records``);
- time to drain: from the resume until no record is owed in either priority;
- drain rate: spooled records confirmed by Kafka per second during the drain
  (``lastmile_spool_replayed_records_total``), against the live rate (PUBACKs
  per second during the drain); target: at least 3x;
- live PUBACK p99 during the drain (telemetry; alarms apart); target < 250 ms.

Writes ``benchmarks/results/outage.json`` and re-renders ``docs/benchmarks.md``
(its "Kafka outage" section).  Not a test: one run, figures as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.outage_fleet import Fleet, p99
from benchmarks.servers import Lastmile, StartError, Tansu, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
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
SERIES = ("lastmile_spool_backlog_records", "lastmile_spool_backlog_bytes",
          "lastmile_spool_replayed_records_total", "lastmile_spool_oldest_record_age_seconds",
          "lastmile_spool_drain_records_per_second", "lastmile_backpressure_paused")


def scrape(port: int) -> dict[str, float]:
    """Selected series, summed over priorities ("name") and per priority ("name/high")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in SERIES:
            if line.startswith(name + "{") or line.startswith(name + " "):
                value = float(line.rsplit(" ", 1)[1])
                if 'priority="' in line:
                    prio = line.split('priority="', 1)[1].split('"', 1)[0]
                    out[f"{name}/{prio}"] = out.get(f"{name}/{prio}", 0.0) + value
                if name == "lastmile_spool_oldest_record_age_seconds":
                    out[name] = max(out.get(name, 0.0), value)
                else:
                    out[name] = out.get(name, 0.0) + value
    return out


def run(a: argparse.Namespace, work: Path, log: Any = print) -> dict[str, Any]:
    rules = work / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(RULES)
    mport = free_port()
    t, g = Tansu(work), Lastmile(work)
    t.start()
    samples: list[dict[str, float]] = []
    try:
        g.start(t.bootstrap, a.workers, {
            "listeners": {"metrics": {"host": "127.0.0.1", "port": mport}},
            "rules": {"dir": str(rules), "watch": False}})
        fleet = Fleet(g.port, clients=a.clients, rate=a.rate, alarm_clients=a.alarm_clients,
                      alarm_rate=a.alarm_rate, payload_size=a.payload_size,
                      track_acks=False).start()
        t0 = time.monotonic()

        def sample(phase: str) -> dict[str, float]:
            s = scrape(mport)
            s.update(t=round(time.monotonic() - t0, 2), acked=fleet.acked_count(),
                     skipped=fleet.skipped)
            s["phase"] = phase  # type: ignore[assignment]
            samples.append(s)
            return s

        time.sleep(a.warm_s)
        sample("warm")
        os.kill(t.pid, signal.SIGSTOP)
        paused = time.monotonic()
        log(f"broker paused for {a.outage_s:g} s")
        while time.monotonic() - paused < a.outage_s:
            time.sleep(1.0)
            s = sample("outage")
            if int(s["t"]) % 30 == 0:
                log(f"  outage +{time.monotonic() - paused:.0f} s: owed "
                    f"{s.get('lastmile_spool_backlog_records', 0):,.0f} records, "
                    f"{s.get('lastmile_spool_backlog_bytes', 0) / 1e6:,.1f} MB")
        at_resume = sample("outage")
        skipped_outage = fleet.skipped - samples[0]["skipped"]
        os.kill(t.pid, signal.SIGCONT)
        resumed = time.monotonic()
        log("broker resumed")
        drained_at = None
        while time.monotonic() - resumed < a.max_drain_s:
            time.sleep(1.0)
            s = sample("drain")
            if s.get("lastmile_spool_backlog_records", 1) == 0 and time.monotonic() - resumed > 2:
                drained_at = time.monotonic()
                break
        end = sample("after")
        time.sleep(a.tail_s)
        fleet.stop(grace=60)
        lats = fleet.latencies
        drain = [x for at, x, alarm in lats
                 if resumed <= at <= (drained_at or time.monotonic()) and not alarm]
        drain_alarm = [x for at, x, alarm in lats
                       if resumed <= at <= (drained_at or time.monotonic()) and alarm]
        outage = [x for at, x, alarm in lats
                  if paused <= at <= resumed and not alarm]
        before = [x for at, x, alarm in lats if at < paused and not alarm]
        acked_drain = len(drain) + len(drain_alarm)
        drain_s = (drained_at - resumed) if drained_at else None
        replayed = (end.get("lastmile_spool_replayed_records_total", 0)
                    - at_resume.get("lastmile_spool_replayed_records_total", 0))
        live_rate = acked_drain / drain_s if drain_s else None
        drain_rate = replayed / drain_s if drain_s else None
        peak_bytes = max(s.get("lastmile_spool_backlog_bytes", 0) for s in samples)
        return {
            "backlog_records_at_resume": at_resume.get("lastmile_spool_backlog_records"),
            "backlog_high_at_resume": at_resume.get("lastmile_spool_backlog_records/high"),
            "spool_bytes_at_resume": at_resume.get("lastmile_spool_backlog_bytes"),
            "spool_bytes_peak": peak_bytes,
            "oldest_age_at_resume_s": at_resume.get("lastmile_spool_oldest_record_age_seconds"),
            "backpressure_during_outage": any(s.get("lastmile_backpressure_paused", 0) > 0
                                              for s in samples if s["phase"] == "outage"),
            "not_sent_window_full_during_outage": skipped_outage,
            "drain_s": round(drain_s, 1) if drain_s else None,
            "replayed_during_drain": replayed,
            "drain_records_per_s": round(drain_rate) if drain_rate else None,
            "live_acked_per_s_during_drain": round(live_rate) if live_rate else None,
            "drain_over_live": round(drain_rate / live_rate, 2)
            if drain_rate and live_rate else None,
            "puback_p99_ms": {
                "before_outage": round(p99(before) * 1e3, 1),
                "during_outage": round(p99(outage) * 1e3, 1),
                "during_drain": round(p99(drain) * 1e3, 1),
                "during_drain_alarms": round(p99(drain_alarm) * 1e3, 1),
            },
            "acked": fleet.acked_count(), "sent": fleet.sent, "failed": fleet.failed(),
            "lost_connections": fleet.lost_connections(),
            # Every 10th sample of the outage, every 5th of the drain (1 s apart when taken).
            "samples": [x for i, x in enumerate(samples)
                        if x["phase"] not in ("outage", "drain")
                        or i % (10 if x["phase"] == "outage" else 5) == 0],
        }
    finally:
        if t.alive():
            os.kill(t.pid, signal.SIGCONT)
        g.stop(60)
        t.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_outage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage-s", type=float, default=600.0)
    ap.add_argument("--rate", type=float, default=5_000.0, help="telemetry msg/s offered")
    ap.add_argument("--alarm-rate", type=float, default=50.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--alarm-clients", type=int, default=5)
    ap.add_argument("--payload-size", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--warm-s", type=float, default=10.0)
    ap.add_argument("--tail-s", type=float, default=5.0)
    ap.add_argument("--max-drain-s", type=float, default=1_800.0)
    a = ap.parse_args(argv)
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                           "settings": vars(a), "loadavg_start": report.loadavg(),
                           "machine": report.machine_info()}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-outage-") as tmp:
        try:
            out["result"] = run(a, Path(tmp))
        except StartError as e:
            out["result"] = {"error": str(e)}
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["loadavg_end"] = report.loadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "outage.json").write_text(json.dumps(out, indent=2) + "\n")
    res = {k: v for k, v in out["result"].items() if k != "samples"}
    print(json.dumps(res, indent=2))
    latest = RESULTS / "latest.json"
    if latest.exists():
        (ROOT / "docs" / "benchmarks.md").write_text(report.markdown(json.loads(
            latest.read_text())))
    print(f"wrote {RESULTS / 'outage.json'} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
