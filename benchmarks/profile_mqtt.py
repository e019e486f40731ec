"""Profile one `lastmile serve` process: memory per idle MQTT connection, publish rate.

    python -m benchmarks.profile_mqtt idle --connections 10000
    python -m benchmarks.profile_mqtt publish --qos 1 --duration 10 --pyspy /tmp/q1
    python -m benchmarks.profile_mqtt publish --qos 0 --tree /tmp/lm-base   # A/B

Starts a tansu broker (or uses ``--bootstrap``) and one gateway process
(``workers: 1``, so the server is that very pid) from ``--tree`` (default: this
checkout), then drives it with ``benchmarks.loadgen``.

idle: a short warm-up (``--warmup`` connections, to load code paths once), then
``--connections`` CONNECTed idle clients (keep alive 60); RSS of the gateway pid
is sampled before and while they are held: growth / connections = bytes per
idle connection.

publish: ``--connections`` publishers of ``--payload-size`` bytes at ``--qos``,
as fast as they are acknowledged.  With ``--pyspy OUT`` py-spy samples the
gateway during the run (``OUT.txt``: collapsed stacks; ``OUT.top``: functions
by own and total samples).  The gateway's own histograms are read from /metrics
around the run (``gw_ack_ms``: receive -> PUBACK queued; ``gw_kafka_delivery_ms``:
produce -> report; p50/p99 as bucket upper bounds), when the tree has them.

Prints one JSON line per measurement.  Speed and memory belong here, never in
a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.stats import collapsed_stacks, cpu_seconds, rss_bytes, tree_rss
from gateway.auth.passwd import hash_password
from tests.helpers import Broker, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent


def gateway_config(path: Path, bootstrap: str, spool: bool, spool_dir: Path,
                   spool_mode: str, tree: Path = ROOT, workers: int = 1,
                   passwd: Path | None = None) -> tuple[int, int]:
    """Write the config; returns the MQTT and metrics ports."""
    mqtt, metrics = free_port(), free_port()
    auth: dict[str, Any] = {"allow_anonymous": True}
    if passwd is not None:
        auth = {"allow_anonymous": False, "password_file": str(passwd)}
    cfg: dict[str, Any] = {
        "workers": workers,
        "listeners": {
            "mqtt": {"host": "127.0.0.1", "port": mqtt},
            "http": {"host": "127.0.0.1", "port": free_port()},
            "metrics": {"host": "127.0.0.1", "port": metrics},
        },
        "kafka": {"clusters": {"default": {"bootstrap_servers": bootstrap,
                                           "connect_timeout_s": 10}}},
        "rules": {"dir": str(tree / "bridge-rules"), "watch": False},  # the tree's own rules
        "spool": {"enabled": spool, "dir": str(spool_dir), "mode": spool_mode},
        "log": {"level": "warning", "format": "json"},
        "auth": auth,
    }
    path.write_text(yaml.safe_dump(cfg))
    return mqtt, metrics


# lastmile_ack_latency_seconds{listener="mqtt"}, lastmile_kafka_delivery_latency_seconds:
# the gateway's own view of where a PUBACK's time went (trees without them: absent).
HISTOGRAMS = {"gw_ack_ms": ("lastmile_ack_latency_seconds", 'listener="mqtt"'),
              "gw_kafka_delivery_ms": ("lastmile_kafka_delivery_latency_seconds",
                                       'cluster="default"')}


def scrape_histograms(metrics_port: int) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts by upper bound, per histogram of HISTOGRAMS."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, dict[float, float]] = {}
    for key, (name, label) in HISTOGRAMS.items():
        for line in text.splitlines():
            if line.startswith(name + "_bucket{") and label in line:
                le = re.search(r'le="([^"]+)"', line)
                if le is not None:
                    out.setdefault(key, {})[float(le.group(1))] = float(line.rsplit(" ", 1)[1])
    return out


def histogram_quantiles(before: dict[str, dict[float, float]],
                        after: dict[str, dict[float, float]]) -> dict[str, Any]:
    """p50 / p99 of what was observed between two scrapes, as bucket upper bounds (ms)."""
    out: dict[str, Any] = {}
    for key, buckets in after.items():
        base = before.get(key, {})
        diff = sorted((le, n - base.get(le, 0.0)) for le, n in buckets.items())
        total = diff[-1][1] if diff else 0.0
        if not total:
            continue
        q = {}
        for name, p in (("p50", 0.5), ("p99", 0.99)):
            le = next(le for le, n in diff if n >= p * total)
            q[name + "_le"] = round(le * 1000, 2) if le != float("inf") else "inf"
        out[key] = {"count": int(total), **q}
    return out


class Gateway:
    def __init__(self, tree: Path, config: Path, log: Path) -> None:
        self.tree, self.config, self.log = tree, config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
                cwd=self.tree, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(self.tree)},
            )
        wait_port("127.0.0.1", port, timeout=60, proc=self.proc)
        time.sleep(0.5)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def loadgen(mode: str, port: int, args: dict[str, Any],
            on_connected: Any = None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.loadgen", mode, "--port", str(port)]
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    result: dict[str, Any] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        ev = json.loads(line)
        if ev.get("event") == "connected" and on_connected is not None:
            on_connected(ev)
        elif ev.get("event") == "result":
            result = ev
    proc.wait()
    result.pop("settings", None)
    return result


def start_pyspy(gw: Gateway, a: argparse.Namespace, seconds: float) -> subprocess.Popen[bytes]:
    raw = Path(a.pyspy + ".txt")
    return subprocess.Popen(
        [str(pyspy_bin()), "record", "--pid", str(gw.pid), "--format", "raw", "--rate", "200",
         *(["--gil"] if a.gil else []), *(["--subprocesses"] if a.workers > 1 else []),
         "--nonblocking", "--output", str(raw),
         "--duration", str(int(seconds))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def finish_pyspy(spy: subprocess.Popen[bytes] | None, a: argparse.Namespace,
                 out: dict[str, Any]) -> None:
    if spy is None:
        return
    spy.wait()
    raw = Path(a.pyspy + ".txt")
    if raw.exists():
        Path(a.pyspy + ".top").write_text(pyspy_top(raw))
        out["pyspy"] = a.pyspy + ".top"


def measure_idle(gw: Gateway, port: int, a: argparse.Namespace) -> dict[str, Any]:
    creds = {"username": a.username, "password": a.password} if a.password_file else {}
    if a.warmup:
        loadgen("connect", port, {"connections": a.warmup, "procs": 1, "hold": 1,
                                  "source-ips": 1, **creds})
        time.sleep(2.0)  # let the sweep and the allocator settle
    rss = rss_bytes if a.workers == 1 else tree_rss  # several workers: the process tree
    before = rss(gw.pid)
    spy = start_pyspy(gw, a, a.pyspy_seconds) if a.pyspy else None
    cpu0 = cpu_seconds(gw.pid)
    held: dict[str, Any] = {}

    def sample(ev: dict[str, Any]) -> None:
        held["cpu"] = cpu_seconds(gw.pid) - cpu0  # CONNECT handling, all threads
        time.sleep(a.settle)
        held["rss"] = rss(gw.pid)
        held["connected"] = ev["connected"]

    procs = max(2, a.procs)  # as benchmarks.run: one source address per process
    res = loadgen("connect", port, {"connections": a.connections, "procs": procs,
                                    "source-ips": procs, "hold": a.settle + 3,
                                    "keepalive": 60, **creds}, sample)
    n = held.get("connected", 0)
    connect = res.get("connect") or {}
    out = {
        "mode": "idle", "workers": a.workers,
        "auth": "password" if a.password_file else "anonymous",
        "connections": n, "rss_before": before, "rss_held": held.get("rss"),
        "bytes_per_connection": round((held.get("rss", 0) - before) / n, 1) if n else None,
        "connect_rate": connect.get("connect_rate"),
        "gateway_cpu_us_per_connect": round(held["cpu"] / n * 1e6, 1) if n else None,
        "errors": res.get("errors"),
    }
    finish_pyspy(spy, a, out)
    return out


def log_events(path: Path) -> dict[str, int]:
    """Warning and error events in the gateway log so far (e.g. spool_spill), counted."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            counts[json.loads(line).get("event", "?")] += 1
        except ValueError:
            counts["(not json)"] += 1
    return dict(counts)


def pyspy_top(raw: Path, limit: int = 25) -> str:
    """Own and total samples per function (all its lines) from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for frames, n in collapsed_stacks(raw):
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    out = [f"{samples} samples", "", "own%   total%  function"]
    for f, n in own.most_common(limit):
        out.append(f"{100 * n / samples:5.1f}  {100 * total[f] / samples:6.1f}  {f}")
    out += ["", "total% (inclusive), top:"]
    for f, n in total.most_common(limit):
        out.append(f"{100 * n / samples:6.1f}  {f}")
    return "\n".join(out) + "\n"


def pyspy_bin() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def measure_publish(gw: Gateway, port: int, a: argparse.Namespace,
                    metrics_port: int = 0) -> dict[str, Any]:
    before = scrape_histograms(metrics_port) if metrics_port else {}
    spy = start_pyspy(gw, a, int(a.duration) + 2) if a.pyspy else None
    cpu0 = cpu_seconds(gw.pid)
    res = loadgen("publish", port, {
        "connections": a.connections, "qos": a.qos, "payload-size": a.payload_size,
        "duration": a.duration, "procs": a.procs, "inflight": a.inflight, "source-ips": 1,
        "rate": a.rate,
    })
    cpu = cpu_seconds(gw.pid) - cpu0  # every thread of the gateway (librdkafka's too)
    sent = res.get("sent") or 0
    out = {"mode": "publish", "qos": a.qos, "connections": a.connections,
           "gateway_cpu_us_per_msg": round(cpu / sent * 1e6, 1) if sent else None,
           "sent_per_s": res.get("sent_per_s"), "acked_per_s": res.get("acked_per_s"),
           "sent": res.get("sent"), "acked": res.get("acked"),
           "puback_ms": res.get("puback_latency_ms"), "errors": res.get("errors")}
    if metrics_port:
        time.sleep(1.5)  # the pump copies the counts once a second
        out.update(histogram_quantiles(before, scrape_histograms(metrics_port)))
    finish_pyspy(spy, a, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_mqtt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["idle", "publish"])
    ap.add_argument("--tree", default=str(ROOT), help="source tree to run the gateway from")
    ap.add_argument("--bootstrap", default=None, help="use this Kafka instead of a new tansu")
    ap.add_argument("--spool", choices=["on", "off"], default="on")
    ap.add_argument("--spool-mode", default="kafka", choices=["kafka", "write-ahead"])
    ap.add_argument("--connections", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--payload-size", type=int, default=100)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--inflight", type=int, default=20)
    ap.add_argument("--rate", type=float, default=0.0, help="publish: total msg/s; 0 = max")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1,
                    help="gateway workers (> 1: the shared session registry; RSS and py-spy "
                         "cover the process tree)")
    ap.add_argument("--password-file", action="store_true",
                    help="idle: auth by a password file of one user, every client with the "
                         "same credentials (cached after the warm-up's first check)")
    ap.add_argument("--username", default="bench")
    ap.add_argument("--password", default="bench-password")
    ap.add_argument("--pyspy", default=None, help="output prefix for py-spy samples")
    ap.add_argument("--gil", action="store_true", help="py-spy: only the thread holding the GIL")
    ap.add_argument("--pyspy-seconds", type=float, default=4.0,
                    help="idle: py-spy sampling time from the start of the connects")
    a = ap.parse_args(argv)
    if a.connections is None:
        a.connections = 10_000 if a.mode == "idle" else 100
    if a.pyspy and not pyspy_bin():
        ap.error("py-spy is not on PATH (pip install py-spy)")
    broker = None
    with tempfile.TemporaryDirectory(prefix="lastmile-profile-") as tmp:
        bootstrap = a.bootstrap
        if bootstrap is None:
            broker = Broker().start()
            bootstrap = broker.bootstrap
        cfg = Path(tmp) / "gateway.yaml"
        passwd = None
        if a.password_file:
            passwd = Path(tmp) / "passwd"
            passwd.write_text(f"{a.username}:{hash_password(a.password.encode()).encode()}\n")
        port, metrics_port = gateway_config(cfg, bootstrap, a.spool == "on",
                                            Path(tmp) / "spool", a.spool_mode, Path(a.tree),
                                            a.workers, passwd)
        gw = Gateway(Path(a.tree), cfg, Path(tmp) / "gateway.log")
        try:
            gw.start(port)
            for _ in range(a.repeat):
                res = measure_idle(gw, port, a) if a.mode == "idle" else measure_publish(
                    gw, port, a, metrics_port)
                res.update(tree=a.tree, spool=a.spool if a.spool == "off" else a.spool_mode,
                           log_events=log_events(gw.log))
                print(json.dumps(res), flush=True)
        finally:
            gw.stop()
            if broker is not None:
                broker.stop()
            if gw.proc is not None and gw.proc.returncode not in (0, None):
                sys.stderr.write(Path(tmp, "gateway.log").read_text()[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
