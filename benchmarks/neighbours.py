"""Hostile neighbours for benchmarks.bench_neighbours: one misbehaving client each.

    python -m benchmarks.neighbours never_reading --port 1883 --max-seconds 30
    python -m benchmarks.neighbours session_churn --port 1883 --cycles 5000
    python -m benchmarks.neighbours alias_table --port 1883
    python -m benchmarks.neighbours slow_heads --http-port 8080 --connections 2000

Prints ``{"event": "ready", ...}`` once it is under way, then runs until a line
(or end of file) on stdin or --max-seconds, and prints ``{"event": "result", ...}``.
Loopback only, bounded in connections, bytes and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from typing import Any

from benchmarks import mqttwire as w
from benchmarks.stats import raise_nofile, summarize

CASES = ("never_reading", "session_churn", "alias_table", "slow_heads")


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _utf8(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id: bytes, version: int, clean: bool, keepalive: int = 60,
                   props: bytes = b"") -> bytes:
    var = _utf8(b"MQTT") + bytes([version, 0x02 if clean else 0x00])
    var += keepalive.to_bytes(2, "big")
    if version == w.MQTT5:
        var += w.encode_varint(len(props)) + props
    body = var + _utf8(client_id)
    return b"\x10" + w.encode_varint(len(body)) + body


def publish_packet(topic: bytes, pid: int, payload: bytes, version: int = w.MQTT311,
                   alias: int = 0) -> bytes:
    """QoS 1 PUBLISH; with MQTT 5 an alias property when alias > 0 (topic may be empty)."""
    body = _utf8(topic) + pid.to_bytes(2, "big")
    if version == w.MQTT5:
        props = b"\x23" + alias.to_bytes(2, "big") if alias else b""
        body += w.encode_varint(len(props)) + props
    body += payload
    return b"\x32" + w.encode_varint(len(body)) + body


# CONNACK property id -> encoding (MQTT 5.0, 2.2.2.2): bytes of a fixed width,
# "s" (two-byte length then data) or "p" (a pair of those).
_PROP_KIND: dict[int, int | str] = {
    0x11: 4, 0x12: "s", 0x13: 2, 0x15: "s", 0x16: "s", 0x1A: "s", 0x1C: "s", 0x1F: "s",
    0x21: 2, 0x22: 2, 0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}


def connack_properties(body: bytes) -> dict[int, int | bytes]:
    """The properties of an MQTT 5 CONNACK (integers; strings as bytes)."""
    pos, length, mult = 2, 0, 1
    while True:
        b = body[pos]
        pos += 1
        length += (b & 0x7F) * mult
        mult <<= 7
        if not b & 0x80:
            break
    end, out = pos + length, {}
    while pos < end:
        pid = body[pos]
        pos += 1
        kind = _PROP_KIND.get(pid)
        if isinstance(kind, int):
            out[pid] = int.from_bytes(body[pos:pos + kind], "big")
            pos += kind
        elif kind == "s":
            n = int.from_bytes(body[pos:pos + 2], "big")
            out[pid] = body[pos + 2:pos + 2 + n]
            pos += 2 + n
        elif kind == "p":
            for _ in range(2):
                pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
        else:
            raise w.ProtocolError(f"unknown CONNACK property 0x{pid:02x}")
    return out


class Stop:
    """Set by a line or end of file on stdin, or by the time bound."""

    def __init__(self, max_seconds: float) -> None:
        self.event = asyncio.Event()
        self.deadline = time.monotonic() + max_seconds
        loop = asyncio.get_running_loop()

        def watch() -> None:
            sys.stdin.readline()
            loop.call_soon_threadsafe(self.event.set)

        threading.Thread(target=watch, daemon=True).start()
        loop.call_later(max_seconds, self.event.set)

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        return self.event.is_set()


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(type, body) of the next MQTT packet."""
    first = (await reader.readexactly(1))[0]
    length, mult = 0, 1
    while True:
        b = (await reader.readexactly(1))[0]
        length += (b & 0x7F) * mult
        mult <<= 7
        if not b & 0x80:
            break
    return first >> 4, await reader.readexactly(length)


# -- (a) a client that writes and never reads -----------------------------------------------

async def never_reading(a: argparse.Namespace, stop: Stop) -> dict[str, Any]:
    """PINGREQs with a QoS 1 PUBLISH every a.pings (none if a.no_publish), written as fast
    as the socket takes them; nothing is ever read (SO_RCVBUF 4 KiB).  A connection the
    server closes is replaced."""
    ping_batch = w.PINGREQ_BYTES * a.pings
    payload = bytes(64)
    topic = f"bench/nbr-a-{a.run_id}/data".encode()
    out: dict[str, Any] = {"connections": 0, "closed_by_server": 0, "bytes_sent": 0,
                           "pingreq_sent": 0, "publish_sent": 0, "blocked_seconds": 0.0}
    t0 = time.monotonic()
    emit({"event": "ready"})
    while not stop:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            s.bind((a.source_ip, 0))
            s.settimeout(10)
            s.connect((a.host, a.port))
            s.sendall(connect_packet(f"nbr-a-{a.run_id}-{out['connections']}".encode(),
                                     w.MQTT311, True))
            s.setblocking(False)
        except OSError as e:
            out.setdefault("connect_errors", []).append(str(e))
            s.close()
            if await stop.wait(0.5):
                break
            continue
        out["connections"] += 1
        pid, pending = 0, b""
        try:
            while not stop:
                if not pending:
                    pid = pid % 65535 + 1
                    pending = ping_batch
                    if not a.no_publish:
                        pending += publish_packet(topic, pid, payload)
                        out["publish_sent"] += 1
                    out["pingreq_sent"] += a.pings
                    out["batches"] = out.get("batches", 0) + 1
                try:
                    n = s.send(pending)
                except BlockingIOError:
                    b0 = time.monotonic()
                    await stop.wait(0.01)
                    out["blocked_seconds"] += time.monotonic() - b0
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, "socket error") from None
                    continue
                out["bytes_sent"] += n
                pending = pending[n:]
                if out["batches"] % 64 == 0:
                    await asyncio.sleep(0)
        except OSError as e:
            out["closed_by_server"] += 1
            out.setdefault("close_after_s", []).append(round(time.monotonic() - t0, 2))
            out["last_close"] = f"{type(e).__name__}: {e}"
            await stop.wait(0.2)
        finally:
            s.close()
    out["blocked_seconds"] = round(out["blocked_seconds"], 2)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


# -- (b) persistent-session churn ------------------------------------------------------------

async def session_churn(a: argparse.Namespace, stop: Stop) -> dict[str, Any]:
    """CONNECT clean session 0 with a new 64-byte client id, DISCONNECT, repeat: paced to
    spread a.cycles over a.spread seconds, a.concurrency at a time."""
    out: dict[str, Any] = {"cycles": a.cycles, "ok": 0, "refused": {}, "errors": {}}
    lat: list[float] = []
    sem = asyncio.Semaphore(a.concurrency)
    interval = a.spread / a.cycles if a.cycles else 0.0

    async def one(i: int) -> None:
        cid = f"nbr-b-{a.run_id}-{i:07d}-".encode().ljust(64, b"x")
        t = time.monotonic()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(a.host, a.port, local_addr=(a.source_ip, 0)), 10)
            writer.write(connect_packet(cid, w.MQTT311, clean=False))
            kind, body = await asyncio.wait_for(read_packet(reader), 10)
            rc = body[1] if kind == w.CONNACK and len(body) > 1 else -1
            if rc == 0:
                out["ok"] += 1
                lat.append(time.monotonic() - t)
                writer.write(w.DISCONNECT_BYTES)
                await writer.drain()
            else:
                out["refused"][str(rc)] = out["refused"].get(str(rc), 0) + 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            k = type(e).__name__
            out["errors"][k] = out["errors"].get(k, 0) + 1
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            sem.release()

    emit({"event": "ready"})
    t0 = time.monotonic()
    tasks = set()
    out["started"] = 0
    for i in range(a.cycles):
        if stop:
            break
        await sem.acquire()
        out["started"] += 1
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        ahead = t0 + (i + 1) * interval - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    out["churn_seconds"] = round(time.monotonic() - t0, 2)
    out["cycles_per_s"] = round(out["ok"] / out["churn_seconds"], 1) if out["ok"] else None
    out["connack_ms"] = summarize(lat, 1000.0)
    await stop.event.wait()
    return out


# -- (c) a full topic alias table of 1 KB topic names ---------------------------------------

async def alias_table(a: argparse.Namespace, stop: Stop) -> dict[str, Any]:
    """One MQTT 5 client: reads Topic Alias Maximum from the CONNACK, registers every alias
    with its own 1 KB topic name (QoS 1), then publishes by alias alone at a.alias_rate."""
    out: dict[str, Any] = {"topic_bytes": a.topic_bytes, "registered": 0, "acked": 0,
                           "registrations_acked": 0, "alias_publishes": 0}
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(a.host, a.port, local_addr=(a.source_ip, 0)), 10)
    writer.write(connect_packet(f"nbr-c-{a.run_id}".encode(), w.MQTT5, True))
    kind, body = await asyncio.wait_for(read_packet(reader), 10)
    if kind != w.CONNACK or body[1] != 0:
        emit({"event": "ready"})
        writer.close()
        return {**out, "error": f"CONNACK type {kind} code {body[1] if len(body) > 1 else '?'}"}
    props = connack_properties(body)
    alias_max = min(int(props.get(0x22, 0)), a.alias_cap)
    window = min(int(props.get(0x21, 65535)), 64)
    out.update(topic_alias_maximum=props.get(0x22, 0), receive_maximum=props.get(0x21),
               window=window)
    inflight: dict[int, bool] = {}  # packet id -> a registration (topic name + alias)
    free = asyncio.Event()
    free.set()

    async def read_acks() -> None:
        try:
            while True:
                kind, body = await read_packet(reader)
                if kind == w.PUBACK:
                    if inflight.pop(int.from_bytes(body[:2], "big"), False):
                        out["registrations_acked"] += 1
                    out["acked"] += 1
                    free.set()
                elif kind == w.DISCONNECT:
                    out["server_disconnect"] = f"0x{body[0]:02x}" if body else "0x00"
                    out["disconnect_after"] = out["registered"]
                    return
        except (OSError, asyncio.IncompleteReadError) as e:
            out["closed_on_read"] = type(e).__name__
            out.setdefault("disconnect_after", out["registered"])
        finally:
            free.set()

    acks = asyncio.create_task(read_acks())
    pid = 0

    async def send(topic: bytes, alias: int) -> bool:
        nonlocal pid
        while len(inflight) >= window and not acks.done():
            free.clear()
            await free.wait()
        if acks.done():
            return False
        pid = pid % 65535 + 1
        inflight[pid] = bool(topic)
        writer.write(publish_packet(topic, pid, b"x" * 32, w.MQTT5, alias))
        await writer.drain()
        return True

    emit({"event": "ready"})
    t0 = time.monotonic()
    try:
        for alias in range(1, alias_max + 1):
            if stop:
                break
            name = f"bench/nbr-c-{a.run_id}/{alias:05d}/".encode()
            if not await send(name.ljust(a.topic_bytes, b"t"), alias):
                break
            out["registered"] += 1
        out["register_seconds"] = round(time.monotonic() - t0, 2)
        out["alias_name_bytes"] = out["registered"] * a.topic_bytes
        if out["registered"]:
            k, interval = 0, 1.0 / a.alias_rate
            nxt = time.monotonic()
            while not stop:
                if not await send(b"", k % out["registered"] + 1):
                    break
                k += 1
                out["alias_publishes"] += 1
                nxt += interval
                if nxt > time.monotonic():
                    await stop.wait(nxt - time.monotonic())
    except OSError as e:
        out["closed_on_write"] = type(e).__name__
    out.setdefault("register_seconds", round(time.monotonic() - t0, 2))
    out.setdefault("alias_name_bytes", out["registered"] * a.topic_bytes)
    await stop.event.wait()
    acks.cancel()
    writer.close()
    return out


# -- (d) slow HTTP request heads -------------------------------------------------------------

async def slow_heads(a: argparse.Namespace, stop: Stop) -> dict[str, Any]:
    """a.connections HTTP connections, each sending a request head a few bytes at a time
    (a.chunk bytes every a.interval s) and never finishing it; records when the gateway
    closes each one and what it answered."""
    head = (b"POST /v1/publish/bench/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n")
    opened: list[float] = []
    closes: list[float] = []
    out: dict[str, Any] = {"requested": a.connections, "open_errors": {}, "answers": {},
                           "closed_by_gateway": 0}
    sem = asyncio.Semaphore(64)
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        try:
            async with sem:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    a.host, a.http_port, local_addr=(a.source_ip, 0)), 10)
        except (OSError, TimeoutError) as e:
            k = type(e).__name__
            out["open_errors"][k] = out["open_errors"].get(k, 0) + 1
            return
        t_open = time.monotonic()
        opened.append(t_open)
        writers.append(writer)

        async def dribble() -> None:
            k, pos = 0, 0
            await asyncio.sleep((i % 10) * a.interval / 10)
            while True:
                data = head if pos == 0 else b""
                pos += 1
                while len(data) < a.chunk:
                    data += f"X-Slow-{k}: {'a' * 16}\r\n".encode()
                    k += 1
                for j in range(0, len(data), a.chunk):
                    writer.write(data[j:j + a.chunk])
                    await asyncio.sleep(a.interval)

        sender = asyncio.create_task(dribble())
        first = b""
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                first = first or data
        except OSError:
            pass
        finally:
            sender.cancel()
        if stop:
            return  # closed by us at the end
        closes.append(time.monotonic() - t_open)
        out["closed_by_gateway"] += 1
        status = first.split(b"\r\n", 1)[0].decode(errors="replace")[:40] or "no answer"
        out["answers"][status] = out["answers"].get(status, 0) + 1

    emit({"event": "ready"})
    t0 = time.monotonic()
    tasks = []
    for i in range(a.connections):
        if stop:
            break
        tasks.append(asyncio.create_task(one(i)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # open at most ~1,000 a second
    out["open_seconds"] = round(time.monotonic() - t0, 2)
    while not stop and (len(closes) < len(opened) or not opened):
        if await stop.wait(0.2) or all(t.done() for t in tasks):
            break
    out["opened"] = len(opened)
    out["still_open_at_stop"] = len(opened) - len(closes)
    out["close_after_open_s"] = summarize(closes, 1.0, 2)
    if a.head_timeout:
        out["head_timeout_s"] = a.head_timeout
        out["closed_within_timeout"] = sum(c <= a.head_timeout + a.tolerance for c in closes)
        out["closed_before_timeout"] = sum(c < a.head_timeout - a.tolerance for c in closes)
    await stop.event.wait()
    for wr in writers:
        wr.close()
    if tasks:
        await asyncio.wait(tasks, timeout=5)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


async def amain(a: argparse.Namespace) -> dict[str, Any]:
    stop = Stop(a.max_seconds)
    fn = {"never_reading": never_reading, "session_churn": session_churn,
          "alias_table": alias_table, "slow_heads": slow_heads}[a.case]
    try:
        res = await fn(a, stop)
    except Exception as e:  # report, do not hang the runner
        emit({"event": "ready"})
        res = {"error": f"{type(e).__name__}: {e}"}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.neighbours", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=CASES)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--source-ip", default="127.0.0.50")
    ap.add_argument("--run-id", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--pings", type=int, default=16, help="never_reading: PINGREQs per PUBLISH")
    ap.add_argument("--no-publish", action="store_true", help="never_reading: PINGREQs only")
    ap.add_argument("--cycles", type=int, default=5000, help="session_churn")
    ap.add_argument("--spread", type=float, default=10.0, help="session_churn: seconds")
    ap.add_argument("--concurrency", type=int, default=8, help="session_churn")
    ap.add_argument("--topic-bytes", type=int, default=1024, help="alias_table")
    ap.add_argument("--alias-cap", type=int, default=65535, help="alias_table")
    ap.add_argument("--alias-rate", type=float, default=500.0, help="alias_table: msg/s")
    ap.add_argument("--connections", type=int, default=2000, help="slow_heads")
    ap.add_argument("--chunk", type=int, default=3, help="slow_heads: bytes per write")
    ap.add_argument("--interval", type=float, default=1.0, help="slow_heads: s between writes")
    ap.add_argument("--head-timeout", type=float, default=0.0,
                    help="slow_heads: the gateway's head timeout, 0 = none")
    ap.add_argument("--tolerance", type=float, default=2.0, help="slow_heads: s")
    a = ap.parse_args(argv)
    if not a.host.startswith("127.") or not a.source_ip.startswith("127."):
        raise SystemExit("neighbours: loopback only")
    raise_nofile()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    res = runner(amain(a))
    emit({"event": "result", "case": a.case, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
