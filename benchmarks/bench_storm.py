"""Reconnect storm after a cut: time until every client is connected again.

    python -m benchmarks.bench_storm [--connections 19500] [--lastmile-max 40000]

N clients (MQTT 5, clean start, benchmarks/storm.py) connect, every socket is
reset at once (a cell going away), then all N reconnect at the same instant,
retrying a refused CONNECT or a failed TCP connect after a jittered backoff
(0.5 s doubling to 4 s).  Measured: seconds from the cut's reconnect start to
the last CONNACK 0, on Lastmile (``--workers``, default 4) and on Mosquitto
(one process: its open-file limit here is 20,000, so it cannot hold 20,000
clients plus its own files; the comparison runs both at 19,500).  During
Lastmile's storms a separate connected QoS 1 publisher (50 msg/s) times its
PUBACKs, and /metrics is polled for the worst ``lastmile_event_loop_lag_seconds``
of any worker.

Writes ``benchmarks/results/storm.json`` and re-renders ``docs/benchmarks.md``
(its "Reconnect storm" section).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.servers import Lastmile, Mosquitto, Server, StartError, Tansu, free_port
from benchmarks.storm import Publisher, Storm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET = (40_000, 30.0)  # issue 14: 40,000 reconnected within 30 s

_LAG = re.compile(r"^lastmile_event_loop_lag_seconds(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)


class LagWatch:
    """Polls /metrics every 0.5 s: the worst event-loop lag any worker reported."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for v in _LAG.findall(text):
                self.worst = max(self.worst, float(v))

    def __enter__(self) -> LagWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def storm(server: Server, n: int, procs: int, metrics: int | None) -> dict[str, Any]:
    s = Storm("127.0.0.1", server.port, n, procs=procs, source_ips=16, deadline=120.0,
              prefix=f"bs{n}")
    s.start()
    out: dict[str, Any] = {"connections": n}
    try:
        first = s.connect()
        out["initial"] = first
        if first["connected"] < n:
            out["error"] = f"only {first['connected']} of {n} connected before the cut"
            return out
        time.sleep(1.0)
        pub = None
        if metrics is not None:
            pub = Publisher("127.0.0.1", server.port, rate=50.0, grace=60.0)
            pub.start()
            time.sleep(1.0)
        lag = LagWatch(metrics) if metrics is not None else None
        if lag is not None:
            lag.__enter__()
        try:
            out["cut"] = s.cut()
            out["storm"] = s.reconnect()
            time.sleep(1.5)  # one more /metrics second after the last CONNACK
        finally:
            if lag is not None:
                lag.__exit__()
                out["loop_lag_max_s"] = round(lag.worst, 4)
        if pub is not None:
            r = pub.stop()
            out["publisher"] = {k: (round(v, 4) if isinstance(v, float) else v)
                                for k, v in r.items() if k not in ("acked", "latencies")}
            out["publisher"]["acked"] = len(r.get("acked", []))
    finally:
        s.close()
    st = out.get("storm", {})
    out["reconnected"] = st.get("reconnected")
    out["all_in_s"] = round(st["all_in_s"], 2) if st.get("all_in_s") is not None else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_storm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=19_500, help="per server, compared")
    ap.add_argument("--lastmile-max", type=int, default=40_000, help="Lastmile alone")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--procs", type=int, default=4, help="client processes")
    ap.add_argument("--skip-mosquitto", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "storm.json"))
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                           "workers": a.workers, "procs": a.procs,
                           "loadavg_start": report.loadavg(), "results": {}}
    res = out["results"]
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-storm-") as tmp:
        work = Path(tmp)
        if not a.skip_mosquitto:
            sub = work / "mosquitto"
            sub.mkdir()
            m = Mosquitto(sub)
            try:
                m.start()
                res[f"mosquitto/{a.connections}"] = storm(m, a.connections, a.procs, None)
            except StartError as e:
                res[f"mosquitto/{a.connections}"] = {"error": str(e)}
            finally:
                m.stop()
            print("mosquitto", json.dumps(res[f"mosquitto/{a.connections}"]), flush=True)
        sizes = sorted({a.connections, a.lastmile_max} - {0})
        for n in sizes:
            sub = work / f"lastmile-{n}"
            sub.mkdir()
            t, g = Tansu(sub), Lastmile(sub)
            metrics = free_port()
            try:
                t.start()
                g.start(t.bootstrap, a.workers, {
                    "listeners": {"metrics": {"host": "127.0.0.1", "port": metrics}},
                    "limits": {"max_connections": 100_000}})
                res[f"lastmile/{n}"] = storm(g, n, a.procs, metrics)
            except StartError as e:
                res[f"lastmile/{n}"] = {"error": str(e)}
            finally:
                g.stop()
                t.stop()
            print(f"lastmile {n}", json.dumps(res[f"lastmile/{n}"]), flush=True)
    big = res.get(f"lastmile/{TARGET[0]}", {})
    out["target"] = {"connections": TARGET[0], "seconds": TARGET[1],
                     "met": bool(big.get("reconnected") == TARGET[0]
                                 and big.get("all_in_s") is not None
                                 and big["all_in_s"] <= TARGET[1])}
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["loadavg_end"] = report.loadavg()
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    latest = RESULTS / "latest.json"
    if latest.exists() and path == RESULTS / "storm.json":
        (ROOT / "docs" / "benchmarks.md").write_text(
            report.markdown(json.loads(latest.read_text())))
    print(f"wrote {path} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
