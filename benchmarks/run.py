"""Benchmark runner: Lastmile next to Mosquitto, same load generator, same run.

    python -m benchmarks.run            # full: ~10 min, 40,000 idle connections
    python -m benchmarks.run --quick    # ~3 min, 10,000 idle connections

Starts Mosquitto (Debian's binary, temporary config on 127.0.0.1) and measures
every scenario; then tansu + Lastmile end to end, the same scenarios plus a
Kafka-side check; writes docs/benchmarks.md and benchmarks/results/latest.json.
A system that cannot be started is reported as "not measured".
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import floors, kafka_check, report
from benchmarks.modes import bench_modes
from benchmarks.servers import (
    ROOT,
    Lastmile,
    Mosquitto,
    Server,
    StartError,
    Tansu,
    lastmile_available,
)
from benchmarks.stats import cpu_seconds


@dataclass
class Scenario:
    name: str
    mode: str
    args: dict[str, Any]
    kafka: bool = False  # Lastmile only: check loss/dup/order in Kafka afterwards


@dataclass
class Plan:
    quick: bool
    idle_connections: int
    gateway_workers: int
    publish_workers: int = 2
    scenarios: list[Scenario] = field(default_factory=list)


def make_plan(quick: bool, mqtt: int = 4) -> Plan:
    n_idle = 10_000 if quick else 40_000
    dur = 5.0 if quick else 15.0
    rate = 5_000 if quick else 20_000
    procs = 2 if quick else 4  # 40,000 / 4 = 10,000 fds per loadgen process (limit 20,000)
    pub = {
        "connections": 100,
        "payload-size": 100,
        "procs": 2,
        "duration": dur,
        "source-ips": 1,
        "inflight": 20,
        "mqtt": mqtt,
    }
    return Plan(
        quick=quick,
        idle_connections=n_idle,
        gateway_workers=2 if quick else 4,  # 10,000 connections per worker at most
        publish_workers=2,  # one per core
        scenarios=[
            Scenario(
                "idle",
                "connect",
                {
                    "connections": n_idle,
                    "procs": procs,
                    "source-ips": 2 if quick else 4,
                    "hold": 5.0 if quick else 10.0,
                    "mqtt": mqtt,
                },
            ),
            Scenario("qos1_max", "publish", {**pub, "qos": 1}, kafka=True),
            # Capped: a slower server drains what sits in socket buffers and its own
            # buffer before the run counts as done; the cap keeps that bounded.
            Scenario(
                "qos0_max",
                "publish",
                {**pub, "qos": 0, "max-messages": 500_000 if quick else 1_500_000},
                kafka=True,
            ),
            Scenario("qos1_rate", "publish", {**pub, "qos": 1, "rate": rate}, kafka=True),
        ],
    )


def run_loadgen(
    sc: Scenario, server: Server, run_id: int, clients_out: Path | None, log=print
) -> dict[str, Any]:
    """Run one load-generator scenario against server; sample its RSS and CPU."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        sc.mode,
        "--port",
        str(server.port),
        "--run-id",
        str(run_id),
    ]
    for k, v in sc.args.items():
        argv += [f"--{k}", str(v)]
    if clients_out is not None:
        argv += ["--clients-out", str(clients_out)]
    rss_before = server.rss()
    samples: dict[str, Any] = {}
    bound = 210.0 + float(sc.args.get("duration", 0)) + float(sc.args.get("hold", 0))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    timer = threading.Timer(bound, proc.kill)  # every run is bounded, even a stuck one
    timer.start()
    result: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            ev = json.loads(line)
            if ev.get("event") == "connected":
                samples["connected"] = ev
                t_conn = time.monotonic()
                cpu_at_conn = cpu_seconds(server.pid)
                if sc.mode == "connect":
                    time.sleep(min(2.0, float(sc.args.get("hold", 2)) / 2))
                    samples["rss_held"] = server.rss()
            elif ev.get("event") == "result":
                result = ev
        proc.wait()
    finally:
        timer.cancel()
    if not result:
        return {"error": f"loadgen exited with {proc.returncode} and no result"}
    result.pop("settings", None)
    result["server_rss_before"] = rss_before
    result["server_alive_after"] = server.alive()
    if sc.mode == "connect":
        held = result["connect"]["connected"]
        grow = samples.get("rss_held", 0) - rss_before
        result["server_rss_held"] = samples.get("rss_held")
        result["rss_per_connection"] = round(grow / held, 1) if held else None
    elif "connected" in samples:
        secs = result.get("publish_seconds") or 0
        used = cpu_seconds(server.pid) - cpu_at_conn
        wall = time.monotonic() - t_conn
        result["server_cpu_cores"] = round(used / wall, 2) if wall > 0 else None
        result["publish_wall_seconds"] = round(wall, 2)
        result["server_cpu_seconds_per_msg_us"] = (
            round(used / result["sent"] * 1e6, 2) if result.get("sent") and secs else None
        )
        # Per message the server finished with: acked for QoS 1, accepted for QoS 0.
        done = result.get("acked") if int(sc.args.get("qos", 0)) else result.get("sent")
        result["server_cpu_us_per_msg"] = round(used / done * 1e6, 2) if done and secs else None
    log(f"  {server.name} {sc.name}: " + report.one_line(sc.name, result))
    return result


def settle(server: Server, below: float = 0.05, timeout: float = 60.0) -> float:
    """Wait until the server is idle (CPU < `below` cores over 0.5 s); returns seconds."""
    t0 = time.monotonic()
    while server.alive() and time.monotonic() - t0 < timeout:
        c0 = cpu_seconds(server.pid)
        time.sleep(0.5)
        if (cpu_seconds(server.pid) - c0) / 0.5 < below:
            break
    return round(time.monotonic() - t0, 1)


def measure(
    server: Server, plan: Plan, workdir: Path, bootstrap: str | None, log=print
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sc in plan.scenarios:
        waited = settle(server)
        run_id = random.randrange(1, 2**31)
        clients = workdir / f"clients-{sc.name}.json" if sc.mode == "publish" else None
        try:
            res = run_loadgen(sc, server, run_id, clients, log)
        except Exception as e:  # a broken scenario must not hide the others
            res = {"error": f"{type(e).__name__}: {e}"}
        if sc.kafka and bootstrap and clients is not None and clients.exists():
            res["kafka"] = kafka_check.check(bootstrap, str(clients), idle=10.0, timeout=180.0)
            log(
                f"  kafka {sc.name}: "
                + json.dumps(
                    {
                        k: res["kafka"][k]
                        for k in (
                            "expected",
                            "unique",
                            "missing",
                            "lost_acked",
                            "duplicates",
                            "order_violations",
                        )
                    }
                )
            )
        res["settled_before_s"] = waited
        out[sc.name] = res
        if not server.alive():
            out["crashed"] = f"{server.name} died during {sc.name}: {server.log_tail()}"
            break
    return out


def bench_mosquitto(plan: Plan, workdir: Path, log=print) -> dict[str, Any]:
    m = Mosquitto(workdir)
    try:
        m.start()
    except StartError as e:
        return {"status": "not measured", "reason": str(e)}
    try:
        return {"status": "measured", "results": measure(m, plan, workdir, None, log)}
    finally:
        m.stop()


def bench_lastmile(plan: Plan, workdir: Path, log=print) -> dict[str, Any]:
    why = lastmile_available()
    if why:
        return {"status": "not measured", "reason": why}
    # Idle connections need several workers (20,000 open files per process); the
    # publish scenarios run on one worker per core, as an operator would deploy it.
    groups = [
        (plan.gateway_workers, [sc for sc in plan.scenarios if sc.mode != "publish"]),
        (plan.publish_workers, [sc for sc in plan.scenarios if sc.mode == "publish"]),
    ]
    res: dict[str, Any] = {}
    for workers, scenarios in groups:
        if not scenarios:
            continue
        t, g = Tansu(workdir), Lastmile(workdir)
        try:
            t.start()
            g.start(t.bootstrap, workers)
        except (StartError, OSError) as e:
            g.stop()
            t.stop()
            return {"status": "not measured", "reason": str(e)}
        try:
            sub = Plan(plan.quick, plan.idle_connections, workers, workers, scenarios)
            res.update(measure(g, sub, workdir, t.bootstrap, log))
        finally:
            g.stop()
            t.stop()
    return {"status": "measured", "workers": plan.gateway_workers,
            "publish_workers": plan.publish_workers, "results": res}


def bench_floors(plan: Plan, workdir: Path, log=print) -> dict[str, Any]:
    """The physical floors beside the qos1_rate figures: a bare producer at the same
    rate on a fresh tansu, and fdatasync of 2 KB appends where the spool writes."""
    rate = next(sc for sc in plan.scenarios if sc.name == "qos1_rate").args
    out: dict[str, Any] = {"fsync": floors.fsync_floor(str(workdir))}
    sub = workdir / "floors"
    sub.mkdir()
    t = Tansu(sub)
    try:
        t.start()
        out["kafka"] = floors.kafka_floor(t.bootstrap, float(rate["rate"]),
                                          float(rate["duration"]),
                                          payload=int(rate["payload-size"]),
                                          clients=int(rate["connections"]))
    except (StartError, OSError) as e:
        out["kafka"] = {"error": f"not measured: {e}"}
    finally:
        t.stop()
    log(f"  floors: {json.dumps(out)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="smaller, ~3 minutes")
    ap.add_argument("--only", choices=["mosquitto", "lastmile"], help="measure one system")
    ap.add_argument("--mqtt", type=int, choices=[4, 5], default=4, help="protocol level")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    ap.add_argument("--skip-modes", action="store_true",
                    help="skip the spool-mode and Kafka-outage variants")
    a = ap.parse_args(argv)
    plan = make_plan(a.quick, a.mqtt)
    t0 = time.monotonic()
    data: dict[str, Any] = {
        "quick": a.quick,
        "machine": report.machine_info(),
        "versions": report.versions(),
        "plan": report.plan_dict(plan),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-") as tmp:
        for name, fn in (("mosquitto", bench_mosquitto), ("lastmile", bench_lastmile)):
            if a.only and a.only != name:
                data[name] = {"status": "not measured", "reason": "skipped (--only)"}
                continue
            print(f"== {name}", flush=True)
            sub = Path(tmp) / name
            sub.mkdir()
            data[name] = fn(plan, sub)
            if data[name]["status"] != "measured":
                print(f"  not measured: {data[name]['reason']}", flush=True)
        if not a.only and not a.skip_modes and data["lastmile"]["status"] == "measured":
            print("== lastmile delivery modes", flush=True)
            sub = Path(tmp) / "modes"
            sub.mkdir()
            rate = next(sc for sc in plan.scenarios if sc.name == "qos1_rate")
            data["modes"] = bench_modes(plan, rate, sub, run_loadgen)
        if a.only != "mosquitto":
            print("== floors (bare Kafka producer, fsync)", flush=True)
            data["floors"] = bench_floors(plan, Path(tmp))
    data["seconds"] = round(time.monotonic() - t0, 1)
    data["loadavg_end"] = report.loadavg()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(data, indent=2) + "\n")
    Path(a.out).write_text(report.markdown(data))
    print(f"wrote {a.out} and {a.json} in {data['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
