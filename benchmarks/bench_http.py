"""HTTP ingest throughput and latency with ``wrk`` on loopback: single and batch POSTs.

    .venv/bin/python -m benchmarks.bench_http [--duration 10] [--connections 32]

Starts a tansu broker and one ``lastmile serve`` worker (spool off, so every
200 means Kafka acknowledged the records), runs ``wrk`` against each endpoint
for a bounded time, and writes docs/benchmarks-http.md.  Not a test: nothing
here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import Broker, GatewayProcess, running, write_config

ROOT = Path(__file__).resolve().parent.parent
RULES = """
unmatched: reject
rules:
  - {name: bench-http, match: {topic: "bench/#", source: http}, kafka: {topic: bench-http}}
"""
EVENT = {"device": "phone-123", "ts": 1732240000, "reading": 21.5, "tags": ["a", "b"]}
BATCH_SIZE = 100

# (name, path, content type, body): each is one wrk run.
CASES = [
    ("single POST (wait for Kafka)", "/v1/publish/bench/one", "application/json",
     json.dumps(EVENT)),
    ("single POST ?async=true", "/v1/publish/bench/one?async=true", "application/json",
     json.dumps(EVENT)),
    (f"batch POST, {BATCH_SIZE} records", "/v1/batch", "application/json",
     json.dumps([{"topic": "bench/batch", "payload": EVENT}] * BATCH_SIZE)),
]


def _lua(path: Path, content_type: str, body: str) -> None:
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
        f"wrk.body = {json.dumps(body)}\n"
    )


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def run_wrk(url: str, script: Path, duration: int, connections: int,
            threads: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _seconds(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
            "non_2xx": float(bad.group(1)) if bad else 0.0,
            "socket_errors": 1.0 if errors else 0.0}


def report(rows: list[tuple[str, dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [
        "# HTTP ingest benchmark",
        "",
        f"`python -m benchmarks.bench_http --duration {args.duration} "
        f"--connections {args.connections}` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()} {platform.python_version()}, one worker, spool off "
        "(a 200 means Kafka acknowledged), tansu broker on loopback, "
        f"`wrk -t{args.threads} -c{args.connections} -d{args.duration}s`.",
        "",
        "| case | requests/s | records/s | p50 ms | p99 ms | non-2xx |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        per = BATCH_SIZE if name.startswith("batch") else 1
        lines.append(f"| {name} | {r['rps']:,.0f} | {r['rps'] * per:,.0f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non_2xx']:.0f} |")
    lines += ["", "No Mosquitto column: it has no HTTP ingest to compare with.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per case (max 60)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-http.md"))
    args = parser.parse_args()
    args.duration = min(args.duration, 60)
    if shutil.which("wrk") is None:
        print("bench_http: wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    broker = Broker().start()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            (tmp / "rules").mkdir()
            (tmp / "rules" / "00-bench.yaml").write_text(RULES)
            ports = write_config(tmp / "gw.yaml", bootstrap=broker.bootstrap,
                                 rules_dir=tmp / "rules", spool_dir=tmp / "spool",
                                 spool__enabled=False, rules__watch=False,
                                 log__level="warning")
            gateway = GatewayProcess(tmp / "gw.yaml", tmp / "gw.log")
            rows = []
            with running(gateway, ("127.0.0.1", ports["mqtt"])):
                for name, path, content_type, body in CASES:
                    script = tmp / "post.lua"
                    _lua(script, content_type, body)
                    url = f"http://127.0.0.1:{ports['http']}{path}"
                    result = run_wrk(url, script, args.duration, args.connections,
                                     args.threads)
                    print(f"{name}: {result}", flush=True)
                    rows.append((name, result))
    finally:
        broker.stop()
    Path(args.out).write_text(report(rows, args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
