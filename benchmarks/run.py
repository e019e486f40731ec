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
import math
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
from benchmarks.stats import box_busy_seconds, cpu_seconds, cpu_seconds_reaped


@dataclass
class Scenario:
    name: str
    mode: str
    args: dict[str, Any]
    kafka: bool = False  # Lastmile only: check loss/dup/order in Kafka afterwards
    workers: int | None = None  # Lastmile's workers; None: the plan's for this mode


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
            # The connect rate where both sides accept every client: Mosquitto is one
            # process and cannot hold more than its 20,000 open files (the hard limit
            # here, and raising it needs CAP_SYS_RESOURCE), so at 40,000 it resets half
            # of them. Lastmile on one worker per core, as the publish scenarios.
            *([] if quick else [Scenario(
                "connect",
                "connect",
                {"connections": 19_000, "procs": 2, "source-ips": 2, "hold": 2.0,
                 "mqtt": mqtt},
                workers=2,
            )]),
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


def _cpu_sample(server: Server, loadgen: int, others: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of the server (its process tree), the load generator (with its
    joined workers), each of `others` (e.g. tansu) and the whole machine."""
    out = {"server": cpu_seconds(server.pid), "loadgen": cpu_seconds_reaped(loadgen),
           "box": box_busy_seconds(), "t": time.monotonic()}
    out.update({name: cpu_seconds(pid) for name, pid in others.items()})
    return out


def cpu_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Cores used between two samples, per process group; "other" is what the machine
    was busy with besides them (other users of a shared box)."""
    wall = after["t"] - before["t"]
    if wall <= 0:
        return {}
    out = {k: round((after[k] - before[k]) / wall, 2) for k in after if k != "t"}
    out["other"] = round(out["box"] - sum(v for k, v in out.items() if k != "box"), 2)
    out["wall_s"] = round(wall, 2)
    return out


def run_loadgen(
    sc: Scenario, server: Server, run_id: int, clients_out: Path | None, log=print,
    others: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run one load-generator scenario against server; sample its RSS and CPU, and the
    CPU of the load generator and of `others` (name -> pid) over the same window."""
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
    cpu_start = cpu_seconds(server.pid)
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
                samples["cpu0"] = _cpu_sample(server, proc.pid, others or {})
                if sc.mode == "connect":
                    samples["server_cpu_connect"] = cpu_at_conn - cpu_start
                    time.sleep(min(2.0, float(sc.args.get("hold", 2)) / 2))
                    samples["rss_held"] = server.rss()
            elif ev.get("event") == "result":
                result = ev
                if "cpu0" in samples:  # before the load generator exits and is reaped
                    samples["cpu1"] = _cpu_sample(server, proc.pid, others or {})
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
        # CPU per connect, server (from the load generator's start to its "connected")
        # and load generator (its processes' own CPU while connecting)
        n = result["connect"]["requested"]
        if n and "server_cpu_connect" in samples:
            result["server_cpu_us_per_connect"] = round(samples["server_cpu_connect"] / n * 1e6)
        lg = result["connect"].get("loadgen_cpu_s")
        result["loadgen_cpu_us_per_connect"] = round(lg / n * 1e6) if n and lg else None
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
        if "cpu1" in samples:
            result["cpu_cores"] = cpu_split(samples["cpu0"], samples["cpu1"])
    log(f"  {server.name} {sc.name}: " + report.one_line(sc.name, result))
    if "cpu_cores" in result:
        log(f"    cpu cores: {json.dumps(result['cpu_cores'])}")
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
    server: Server, plan: Plan, workdir: Path, bootstrap: str | None, log=print,
    others: dict[str, int] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sc in plan.scenarios:
        waited = settle(server)
        run_id = random.randrange(1, 2**31)
        clients = workdir / f"clients-{sc.name}.json" if sc.mode == "publish" else None
        try:
            res = run_loadgen(sc, server, run_id, clients, log, others)
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
    # A fresh gateway per worker count and kind (connects apart from publishes).
    groups: dict[tuple[int, bool], list[Scenario]] = {}
    for sc in plan.scenarios:
        pub = sc.mode == "publish"
        workers = sc.workers or (plan.publish_workers if pub else plan.gateway_workers)
        groups.setdefault((workers, pub), []).append(sc)
    res: dict[str, Any] = {}
    for (workers, _), scenarios in groups.items():
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
            res.update(measure(g, sub, workdir, t.bootstrap, log, {"tansu": t.pid}))
        finally:
            g.stop()
            t.stop()
    return {"status": "measured", "workers": plan.gateway_workers,
            "publish_workers": plan.publish_workers, "results": res}


def kafka_intake(tansu: Tansu, duration: float, burn: float = 0.0,
                 log=print) -> dict[str, Any]:
    """The bare producer at its maximum into `tansu` (`floors.py --max`, a process of
    its own), optionally beside burners taking `burn` cores (a load generator's share);
    the CPU of the producer, tansu, the burners and the machine over its timed window."""
    n = math.ceil(burn - 1e-9) if burn > 0 else 0
    burners = [subprocess.Popen([sys.executable, "-m", "benchmarks.floors", "--burn",
                                 f"{burn / n:.3f}", "--duration", str(duration + 30)],
                                stdout=subprocess.DEVNULL, cwd=ROOT) for _ in range(n)]
    argv = [sys.executable, "-m", "benchmarks.floors", "--max", "--bootstrap",
            tansu.bootstrap, "--duration", str(duration)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    timer = threading.Timer(duration + 90.0, proc.kill)  # bounded, even if stuck
    timer.start()
    res: dict[str, Any] = {}
    samples: list[dict[str, float]] = []

    def sample() -> dict[str, float]:
        s = {"producer": cpu_seconds(proc.pid), "tansu": cpu_seconds(tansu.pid),
             "burn": sum(cpu_seconds(b.pid) for b in burners), "box": box_busy_seconds(),
             "t": time.monotonic()}
        return s if burners else {k: v for k, v in s.items() if k != "burn"}

    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            ev = json.loads(line)
            if ev.get("event") in ("start", "result"):
                samples.append(sample())
            if ev.get("event") == "result":
                res = ev
        proc.wait()
    finally:
        timer.cancel()
        for b in burners:
            b.terminate()
        for b in burners:
            b.wait(10)
    if not res or len(samples) != 2:
        return {"error": f"bare producer exited with {proc.returncode} and no result"}
    res.pop("event", None)
    res["burn_target_cores"] = round(burn, 2)
    res["cpu_cores"] = cpu_split(samples[0], samples[1])
    log(f"  bare producer max, burning {burn:.2f} cores: {res['delivered_per_s']:,.0f} "
        f"delivered/s, cpu cores {json.dumps(res['cpu_cores'])}")
    return res


def bench_floors(plan: Plan, workdir: Path, log=print,
                 lastmile: dict[str, Any] | None = None) -> dict[str, Any]:
    """The physical floors: beside the qos1_rate figures a bare producer at the same
    rate on a fresh tansu, and fdatasync of 2 KB appends where the spool writes; beside
    the max scenarios the bare producer's maximum into the same tansu (the Kafka intake
    floor), alone and beside a burner taking the CPU the load generator took in
    Lastmile's qos1_max and qos0_max runs."""
    rate = next(sc for sc in plan.scenarios if sc.name == "qos1_rate").args
    dur = float(next(sc for sc in plan.scenarios if sc.name == "qos1_max").args["duration"])
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
        lm = (lastmile or {}).get("results") or {}
        intake: dict[str, Any] = {"alone": kafka_intake(t, dur, 0.0, log)}
        for sc in ("qos1_max", "qos0_max"):
            share = report._get(lm, sc, "cpu_cores", "loadgen")
            intake[f"beside_{sc}_loadgen"] = (
                kafka_intake(t, dur, float(share), log) if isinstance(share, int | float)
                else {"error": f"not measured: no load generator CPU from Lastmile {sc}"})
        out["kafka_max"] = intake
    except (StartError, OSError) as e:
        out["kafka"] = {"error": f"not measured: {e}"}
    finally:
        t.stop()
    log(f"  floors: {json.dumps({k: v for k, v in out.items() if k != 'kafka_max'})}")
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
    ap.add_argument("--scenario", action="append", default=None,
                    help="run only this scenario (repeatable), e.g. --scenario idle")
    a = ap.parse_args(argv)
    plan = make_plan(a.quick, a.mqtt)
    if a.scenario:
        plan.scenarios = [sc for sc in plan.scenarios if sc.name in a.scenario]
        if not plan.scenarios:
            ap.error(f"no scenario named {a.scenario}")
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
        if a.only != "mosquitto" and {"qos1_rate", "qos1_max"} <= {
                sc.name for sc in plan.scenarios}:  # the floors stand beside these
            print("== floors (bare Kafka producer, fsync)", flush=True)
            data["floors"] = bench_floors(plan, Path(tmp), lastmile=data.get("lastmile"))
    data["seconds"] = round(time.monotonic() - t0, 1)
    data["loadavg_end"] = report.loadavg()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(data, indent=2) + "\n")
    if a.scenario:  # a partial run: the JSON only (the report needs every scenario)
        print(f"wrote {a.json} in {data['seconds']}s")
        return 0
    Path(a.out).write_text(report.markdown(data))
    print(f"wrote {a.out} and {a.json} in {data['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
