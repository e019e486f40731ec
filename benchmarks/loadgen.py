"""Lastmile's MQTT load generator: raw asyncio Protocols on uvloop.

    python -m benchmarks.loadgen connect --connections 10000 --hold 10
    python -m benchmarks.loadgen publish --connections 100 --qos 1 --duration 10

Several worker processes (multiprocessing), many connections each, spread over
source addresses 127.0.0.2.. (loopback only). Writes JSON lines on stdout: an
`{"event": "connected", ...}` line once every connection is up (the runner
samples broker memory then), and a final `{"event": "result", ...}` line.
Every run is bounded: connect timeout, duration or hold, message cap, grace.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import sys
import time
from array import array
from dataclasses import asdict, dataclass

from benchmarks import mqttwire as w
from benchmarks.stats import summarize
from benchmarks.worker import worker_main


@dataclass
class Settings:
    mode: str = "publish"  # connect | publish
    host: str = "127.0.0.1"
    port: int = 1883
    connections: int = 100
    procs: int = 1
    source_ips: int = 1  # 127.0.0.2 .. 127.0.0.(1+N)
    qos: int = 1
    rate: float = 0.0  # total msg/s over all connections; 0 = as fast as possible
    duration: float = 10.0  # publish mode
    hold: float = 10.0  # connect mode
    payload_size: int = 100
    version: int = w.MQTT311
    keepalive: int = 60
    inflight: int = 100  # QoS 1 window per connection
    connect_concurrency: int = 32  # in-flight connects per process
    connect_timeout: float = 30.0
    grace: float = 5.0  # wait for outstanding PUBACKs after the run
    drain_timeout: float = 90.0  # wait for the server to read what is queued (PINGRESP)
    max_messages: int = 50_000_000
    sndbuf: int = 65536  # SO_SNDBUF of publishing sockets; 0 = kernel autotuning
    run_id: int = 0
    client_prefix: str = "lmb"
    username: str = ""  # CONNECT credentials (every connection the same)
    password: str = ""
    credentials: str = ""  # file of "username<TAB>password" lines, one per connection

    def client_id(self, idx: int) -> str:
        return f"{self.client_prefix}-{self.run_id}-{idx}"

    def topic(self, idx: int) -> str:
        return f"bench/{self.client_id(idx)}/data"

    def source_ip(self, idx: int) -> str:
        if self.source_ips <= 0:
            return ""
        return f"127.0.0.{2 + idx % self.source_ips}"

    def check(self) -> None:
        if not self.host.startswith("127.") and self.host != "localhost":
            raise SystemExit("loadgen: loopback targets only")
        if not 0 <= self.source_ips <= 250:
            raise SystemExit("loadgen: --source-ips must be 0..250")
        if self.qos not in (0, 1) or self.version not in (w.MQTT311, w.MQTT5):
            raise SystemExit("loadgen: --qos 0|1, --mqtt 4|5")
        self.procs = max(1, min(self.procs, self.connections))


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _collect(q: mp.Queue, phase: str, n: int, deadline: float) -> list[dict]:
    got: list[dict] = []
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            msg = q.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if msg.get("phase") == phase:
            got.append(msg)
    return got


def _merge_errors(reports: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reports:
        for k, v in r.get("errors", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def _connect_summary(s: Settings, conn: list[dict]) -> dict[str, object]:
    ok = sum(r["ok"] for r in conn)
    lat: list[float] = []
    for r in conn:
        lat.extend(array("q", r["lat_us"]))
    wall = max((r["elapsed"] for r in conn), default=0.0)
    return {
        "requested": s.connections,
        "connected": ok,
        "failed": s.connections - ok,
        "connect_seconds": round(wall, 3),
        "connect_rate": round(ok / wall, 1) if wall > 0 else None,
        "connect_latency_ms": summarize(lat, 0.001),
        "workers_reporting": len(conn),
        # the load generator's own CPU for the connects (all its processes)
        "loadgen_cpu_s": round(sum(r.get("cpu_s", 0.0) for r in conn), 3),
    }


def run(s: Settings, clients_out: str | None = None) -> dict[str, object]:
    s.check()
    if not s.run_id:
        s.run_id = random.randrange(1, 2**31)
    # "spawn", not "fork": a forked child inherits its parent's state, and inside
    # pytest that includes confluent-kafka clients and their threads from earlier
    # tests; the child's garbage collector then crashed on them (SIGSEGV, seen on CI's
    # kind of box).  Each worker times its connects from its own start.
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    start, stop = ctx.Event(), ctx.Event()
    per = [
        s.connections // s.procs + (1 if i < s.connections % s.procs else 0) for i in range(s.procs)
    ]
    procs, first = [], 0
    for wid, n in enumerate(per):
        p = ctx.Process(
            target=worker_main, args=(asdict(s), wid, first, first + n, q, start, stop), daemon=True
        )
        p.start()
        procs.append(p)
        first += n
    try:
        t_conn = time.monotonic() + s.connect_timeout + 10
        conn = _collect(q, "connected", len(procs), t_conn)
        summary = _connect_summary(s, conn)
        _emit({"event": "connected", **summary})
        if s.mode == "connect":
            start.set()
            time.sleep(s.hold)
            stop.set()
            bound = 30.0
        else:
            start.set()
            bound = s.duration + s.drain_timeout + s.grace + 30.0
        final = _collect(q, "final", len(procs), time.monotonic() + bound)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    result: dict[str, object] = {
        "event": "result",
        "mode": s.mode,
        "settings": {**asdict(s), "password": "***" if s.password else ""},
        "connect": summary,
    }
    errors = _merge_errors(conn + final)
    result["errors"] = errors
    result["error_count"] = sum(errors.values())
    result["workers_finished"] = len(final)
    if s.mode == "connect":
        result["lost_during_hold"] = sum(r.get("lost", 0) for r in final)
        result["held_at_end"] = sum(r.get("open", 0) for r in final)
    else:
        result.update(_publish_summary(s, final, clients_out))
    return result


def _publish_summary(s: Settings, final: list[dict], clients_out: str | None) -> dict:
    sent = sum(r["sent"] for r in final)
    acked = sum(r["acked"] for r in final)
    # Publishing time plus the time the server took to read what was still queued
    # in socket buffers (PINGREQ/PINGRESP round trip on every connection).
    secs = max((r["pub_seconds"] + r.get("drain_seconds", 0.0) for r in final), default=0.0)
    drained = len(final) > 0 and not any(r["errors"].get("drain_timeout") for r in final)
    lat: list[float] = []
    clients: dict[str, object] = {}
    for r in final:
        lat.extend(array("q", r["lat_us"]))
        clients.update(r["clients"])
    if clients_out:
        with open(clients_out, "w") as f:
            json.dump({"run_id": s.run_id, "qos": s.qos, "clients": clients}, f)
    out: dict[str, object] = {
        "sent": sent,
        "acked": acked if s.qos else None,
        "unacked": (sent - acked) if s.qos else None,
        "publish_seconds": round(secs, 3),
        "drain_seconds": round(max((r.get("drain_seconds", 0.0) for r in final), default=0), 3),
        "offered_rate": s.rate or "max",
        # Unknown if the server had not read everything by the drain timeout.
        "drained": drained,
        "sent_per_s": round(sent / secs, 1) if secs and drained else None,
        "acked_per_s": round(acked / secs, 1) if secs and s.qos else None,
        "puback_latency_ms": summarize(lat, 0.001) if s.qos else None,
    }
    return out


def parse_args(argv: list[str] | None = None) -> tuple[Settings, str | None]:
    d = Settings()
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("mode", choices=["connect", "publish"])
    ap.add_argument("--host", default=d.host)
    ap.add_argument("--port", type=int, default=d.port)
    ap.add_argument("--connections", "-c", type=int, default=d.connections)
    ap.add_argument("--procs", "-p", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument(
        "--source-ips",
        type=int,
        default=d.source_ips,
        help="bind to 127.0.0.2..(1+N); 0 = let the kernel choose",
    )
    ap.add_argument("--qos", type=int, default=d.qos)
    ap.add_argument("--rate", type=float, default=d.rate, help="total msg/s; 0 = max")
    ap.add_argument("--duration", type=float, default=d.duration)
    ap.add_argument("--hold", type=float, default=d.hold)
    ap.add_argument("--payload-size", type=int, default=d.payload_size)
    ap.add_argument("--mqtt", type=int, default=d.version, choices=[4, 5], dest="version")
    ap.add_argument("--keepalive", type=int, default=d.keepalive)
    ap.add_argument("--inflight", type=int, default=d.inflight)
    ap.add_argument("--connect-concurrency", type=int, default=d.connect_concurrency)
    ap.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    ap.add_argument("--grace", type=float, default=d.grace)
    ap.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    ap.add_argument("--max-messages", type=int, default=d.max_messages)
    ap.add_argument("--sndbuf", type=int, default=d.sndbuf)
    ap.add_argument("--run-id", type=int, default=0)
    ap.add_argument("--client-prefix", default=d.client_prefix)
    ap.add_argument("--username", default=d.username)
    ap.add_argument("--password", default=d.password, help="a password or a JWT")
    ap.add_argument("--credentials", default=d.credentials,
                    help="file of username<TAB>password lines; connection i uses line i")
    ap.add_argument(
        "--clients-out",
        default=None,
        help="write per-client sent counts and unacked seqs (for kafka_check)",
    )
    a = vars(ap.parse_args(argv))
    clients_out = a.pop("clients_out")
    return Settings(**a), clients_out


def main(argv: list[str] | None = None) -> int:
    s, clients_out = parse_args(argv)
    res = run(s, clients_out)
    _emit(res)
    return 0 if res["error_count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
