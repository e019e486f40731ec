"""The gateway's Python cost per HTTP batch record, in process: no sockets, no broker.

    PYTHONPATH=TREE python -m benchmarks.micro_batch [--spool off|kafka] [--batch 100]

What ``POST /v1/batch`` runs after aiohttp has the body: ``parse_batch``,
``produce_batch`` (pipeline, routing with ``benchmarks.bench_http``'s rule, the
buffer, a ``KafkaSink`` whose producer is ``micro_publish``'s stand-in that runs
the delivery callbacks in ``poll``), and the JSON answer.  ``--inflight``
batches are parsed and submitted before one poll reports them all, as under
``wrk -c32``.  Prints CPU µs per record (thread time), best of ``--repeat``.
What it leaves out: aiohttp, the sockets, librdkafka's C produce and report
objects.  Works on any tree with the same module layout (A/B via PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import tempfile
import time
from pathlib import Path

import msgspec

from benchmarks.bench_http import BATCH_SIZE, EVENT, RULES
from benchmarks.micro_publish import _poll, _Producer
from gateway.buffer.priority import PrioritySpoolBuffer
from gateway.buffer.queue import MemoryBuffer
from gateway.config.schema import Buffer, Cluster, Spool
from gateway.pipeline import Pipeline, tune_gc
from gateway.routing.load import load_rules
from gateway.routing.router import Router
from gateway.sinks.kafka import KafkaSink, admission
from gateway.sources.http_auth import Caller
from gateway.sources.http_batch import parse_batch, produce_batch

_encode = msgspec.json.Encoder().encode


def _caller() -> Caller:
    from gateway.auth import Identity

    return Caller(Identity(method="anonymous"), "", "127.0.0.1")


async def run(batch: int, batches: int, inflight: int, repeat: int, spool: str) -> list[float]:
    tmp = Path(tempfile.mkdtemp(prefix="lm-micro-batch-"))
    sink = KafkaSink("default", Cluster(bootstrap_servers="127.0.0.1:1"))
    sink._producer = _Producer()  # type: ignore[assignment]
    sink._loop = asyncio.get_running_loop()
    sink._running = True
    sinks = {"default": sink}
    buffer: MemoryBuffer | PrioritySpoolBuffer
    if spool == "off":
        buffer = MemoryBuffer(sinks, Buffer().high_water_bytes, Buffer().low_water_bytes)
    else:
        buffer = PrioritySpoolBuffer(sinks, Spool(dir=str(tmp)), Buffer(), tmp)
    await buffer.start()
    (tmp / "rules").mkdir()
    (tmp / "rules" / "00-bench.yaml").write_text(RULES)
    router = Router(load_rules(tmp / "rules", frozenset(sinks)))
    pipeline = Pipeline(router, buffer, admission(sinks, 1 << 20, lambda: buffer.via_spool))
    body = msgspec.json.encode([{"topic": "bench/batch", "payload": EVENT}] * batch)
    caller = _caller()
    statuses: dict[int, int] = {}

    async def one() -> None:
        messages = parse_batch(body, "application/json", caller, 10_000)
        status, answer, _settled = await produce_batch(pipeline, messages)
        _encode(answer)
        statuses[status] = statuses.get(status, 0) + 1

    results = []
    clock = time.thread_time  # CPU time: the box is shared
    for _ in range(repeat):
        gc.collect()
        spent = 0.0
        for _ in range(batches // inflight):
            t0 = clock()
            tasks = [asyncio.ensure_future(one()) for _ in range(inflight)]
            await asyncio.sleep(0)  # each parses and submits, then waits
            _poll(sink)  # every report of the round in one poll batch
            await asyncio.gather(*tasks)
            spent += clock() - t0
        results.append(spent / ((batches // inflight) * inflight * batch) * 1e6)
    if sink._poll_handle is not None:
        sink._poll_handle.cancel()
    sink._running = False
    await buffer.close(1.0)
    shutil.rmtree(tmp, ignore_errors=True)
    if set(statuses) != {200}:
        raise SystemExit(f"not every batch answered 200: {statuses}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=BATCH_SIZE)
    ap.add_argument("--batches", type=int, default=3_200)
    ap.add_argument("--inflight", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--spool", choices=("off", "kafka"), default="off")
    args = ap.parse_args()
    import logging

    import structlog
    import uvloop

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tune_gc()  # as in a worker
    out = uvloop.run(run(args.batch, args.batches, args.inflight, args.repeat, args.spool))
    print(f"CPU us/record spool={args.spool} batch={args.batch}: best {min(out):.2f}; all "
          + " ".join(f"{v:.2f}" for v in out))


if __name__ == "__main__":
    main()
