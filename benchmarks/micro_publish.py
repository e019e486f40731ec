"""The gateway's Python cost per QoS 1 (or 0) message, in process: no sockets, no broker.

    PYTHONPATH=TREE python -m benchmarks.micro_publish [--per-read 1] [--per-poll 20] [--qos 0]

Runs the real path of ``lastmile serve`` in spool ``kafka`` mode: an
``MqttConnection`` (with a transport that only counts what it is given) decodes
a PUBLISH, the pipeline routes it with ``bridge-rules/``, the priority spool
buffer hands it to a ``KafkaSink`` whose librdkafka producer is replaced by a
stand-in that keeps the delivery callbacks and runs them in ``poll`` (as
librdkafka does), the sink's poll dispatches them and the server writes the
PUBACKs.  What it leaves out is what the kernel, uvloop and librdkafka do:
the read and write syscalls, the C produce and the report objects.

``--per-read``: PUBLISHes per ``data_received`` chunk (1 at 20,000 msg/s over
100 connections); ``--per-poll``: reports per poll batch (about 20 at
20,000 msg/s with the 1 ms poll).  Prints CPU µs per message (thread time),
best of ``--repeat``, split into "in" (``data_received`` to the produce call)
and "out" (the poll's reports to the PUBACK written); the clock calls
themselves add about 0.1 µs.
It works on any tree with the same module layout (``--tree`` A/B via PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.buffer.priority import PrioritySpoolBuffer
from gateway.config.schema import Buffer, Cluster, Spool
from gateway.pipeline import Pipeline, tune_gc
from gateway.routing.load import load_rules
from gateway.routing.router import Router
from gateway.sinks.kafka import KafkaSink, admission
from gateway.sources.mqtt_server import MqttConnection, MqttServer

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 100
PAYLOAD = b"x" * 100


class _Msg:
    __slots__ = ("_topic",)

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 1


class _Producer:
    """librdkafka's producer as the sink sees it: callbacks run inside ``poll``."""

    def __init__(self) -> None:
        self.pending: list[Callable[[Any, Any], None]] = []
        self.msg = _Msg("bench")

    def produce(self, topic: str, value: bytes, key: bytes | None, partition: int, *,
                on_delivery: Callable[[Any, Any], None], headers: Any) -> None:
        self.pending.append(on_delivery)

    def poll(self, timeout: float) -> int:
        pending, self.pending = self.pending, []
        msg = self.msg
        for cb in pending:
            cb(None, msg)
        return len(pending)

    def __len__(self) -> int:
        return len(self.pending)


class _Transport:
    def __init__(self) -> None:
        self.written = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def close(self) -> None: ...


def _connect(cid: str) -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid.encode()
    return bytes([0x10, len(body)]) + body


def _publish(topic: str, packet_id: int, qos: int) -> bytes:
    t = topic.encode()
    pid = packet_id.to_bytes(2, "big") if qos else b""
    body = len(t).to_bytes(2, "big") + t + pid + PAYLOAD
    return bytes([0x30 | qos << 1, len(body)]) + body


def _poll(sink: KafkaSink) -> None:
    """One turn of the sink's poll timer, called by hand (one timer chain, not many)."""
    if sink._poll_handle is not None:
        sink._poll_handle.cancel()
    sink._poll()


async def run(messages: int, per_read: int, per_poll: int, repeat: int,
              qos: int = 1) -> list[tuple[float, float]]:
    tmp = tempfile.mkdtemp(prefix="lm-micro-")
    sink = KafkaSink("default", Cluster(bootstrap_servers="127.0.0.1:1"))
    producer = _Producer()
    sink._producer = producer  # type: ignore[assignment]
    sink._loop = asyncio.get_running_loop()
    sink._running = True
    sinks = {"default": sink}
    buffer = PrioritySpoolBuffer(sinks, Spool(dir=tmp), Buffer(), tmp)
    await buffer.start()
    router = Router(load_rules(ROOT / "bridge-rules", frozenset(sinks)))
    pipeline = Pipeline(router, buffer, admission(sinks, 1 << 20, lambda: buffer.via_spool))
    server = MqttServer(pipeline)
    conns = []
    for i in range(CONNECTIONS):
        conn = MqttConnection(server)
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        cid = f"c{i:04d}"
        conn.data_received(_connect(cid))
        conns.append((conn, f"bench/{cid}/data"))
    await asyncio.sleep(0)
    results = []
    for _ in range(repeat):
        # Every chunk prebuilt: packet ids 1..65535 cycle per connection.
        chunks = []
        ids = [0] * CONNECTIONS
        for n in range(messages // per_read):
            idx = n % CONNECTIONS
            conn, topic = conns[idx]
            parts = []
            for _ in range(per_read):
                ids[idx] = ids[idx] % 65535 + 1
                parts.append(_publish(topic, ids[idx], qos))
            chunks.append((conn, b"".join(parts)))
        gc.collect()
        gc.freeze()  # the prebuilt chunks are not the gateway's live set
        done = 0
        clock = time.thread_time  # CPU time: the box is shared
        t_in = t_out = 0.0  # data_received ... produce; poll ... PUBACK written
        for conn, data in chunks:
            t0 = clock()
            conn.data_received(data)
            t_in += clock() - t0
            done += per_read
            if done >= per_poll:
                done = 0
                t0 = clock()
                _poll(sink)  # the reports of one poll are one batch
                await asyncio.sleep(0)  # the ack flush (call_soon)
                t_out += clock() - t0
        t0 = clock()
        _poll(sink)
        await asyncio.sleep(0)
        t_out += clock() - t0
        count = len(chunks) * per_read
        results.append((t_in / count * 1e6, t_out / count * 1e6))
        del chunks
        gc.unfreeze()
        if sink._poll_handle is not None:
            sink._poll_handle.cancel()
    sink._running = False
    await buffer.close(1.0)
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--per-read", type=int, default=1)
    ap.add_argument("--per-poll", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--qos", type=int, choices=(0, 1), default=1)
    args = ap.parse_args()
    import logging

    import structlog
    import uvloop

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tune_gc()  # as in a worker
    out = uvloop.run(run(args.messages, args.per_read, args.per_poll, args.repeat, args.qos))
    best = min(out, key=sum)
    print(f"CPU us/msg qos={args.qos} per_read={args.per_read} per_poll={args.per_poll}: "
          f"best {sum(best):.2f} (in {best[0]:.2f} + out {best[1]:.2f}); all "
          + " ".join(f"{a + b:.2f}" for a, b in out))

if __name__ == "__main__":
    main()
