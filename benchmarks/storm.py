"""A reconnect storm driver: many raw-MQTT clients, cut all at once, reconnect together.

    storm = Storm(host, port, connections=5000, procs=2, source_ips=8)
    storm.start()                      # spawn the client processes
    storm.connect()                    # every client connected (retrying 0x9F)
    pub = Publisher(host, port, rate=50); pub.start()   # a connected QoS 1 publisher
    storm.cut()                        # every client socket reset (SO_LINGER 0, RST)
    result = storm.reconnect()         # all reconnect at the same instant; retry 0x9F
    pub.stop()                         # its PUBACK latencies, acked sequence numbers
    storm.close()

Client processes (``procs``) each own a slice of the clients and one asyncio
loop (uvloop when installed); commands go over a pipe.  Sockets carry
SO_LINGER 0, so every close is a reset (no TIME_WAIT on the client ports) and
the cut is what a cell going away looks like to the server.  Sources are
spread over 127.0.0.2.. (``source_ips``) to stay clear of port exhaustion.
A refused CONNECT (CONNACK >= 0x80: 0x9F when the connect rate says so) or a
failed TCP connect is retried after a backoff with jitter (seeded).  Used by
benchmarks/bench_storm.py and tests/integration/test_reconnect_storm.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
import socket
import struct
import time
from multiprocessing.connection import Connection
from typing import Any

from benchmarks import mqttwire as w

IP_BIND_ADDRESS_NO_PORT = 24
_LINGER0 = struct.pack("ii", 1, 0)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _Client(asyncio.Protocol):
    """One client: CONNECT, wait for the CONNACK, then sit idle (no keep alive traffic)."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            packets, used = w.parse_packets(self.buf)
        except w.ProtocolError:
            return
        del self.buf[:used]
        for typ, _flags, body in packets:
            if typ == w.CONNACK and not self.connack.done():
                self.connack.set_result(w.connack_result(body, self.version))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionResetError("closed before CONNACK"))
        if not self.lost.done():
            self.lost.set_result(None)


class _Slice:
    """The clients of one process."""

    def __init__(self, s: dict[str, Any], indexes: list[int]) -> None:
        self.s = s
        self.indexes = indexes
        self.conns: dict[int, _Client] = {}
        self.rng = random.Random(s["seed"] * 7919 + indexes[0] if indexes else 0)

    async def _once(self, idx: int) -> tuple[_Client | None, str]:
        s = self.s
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            if s["source_ips"]:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((f"127.0.0.{2 + idx % s['source_ips']}", 0))
            async with asyncio.timeout(s["attempt_timeout"]):
                await loop.sock_connect(sock, (s["host"], s["port"]))
                _, proto = await loop.create_connection(
                    lambda: _Client(s["version"]), sock=sock)
                assert proto.transport is not None
                proto.transport.write(w.encode_connect(
                    f"{s['prefix']}-{idx}", s["version"], s["keepalive"]))
                rc = await proto.connack
        except (OSError, TimeoutError, w.ProtocolError) as e:
            sock.close()
            return None, type(e).__name__
        if rc != 0:
            assert proto.transport is not None
            proto.transport.abort()
            return None, f"0x{rc:02X}"
        return proto, "ok"

    async def _client(self, idx: int, t0: float, out: dict[str, Any]) -> None:
        s = self.s
        delay = s["backoff"]
        while time.monotonic() < t0 + s["deadline"]:
            proto, what = await self._once(idx)
            if proto is not None:
                self.conns[idx] = proto
                out["times"].append(time.monotonic() - t0)
                return
            out["failures"][what] = out["failures"].get(what, 0) + 1
            # Backoff with full jitter, capped: what a fleet's firmware should do.
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(delay * 2, s["max_backoff"])
        out["gave_up"] += 1

    async def connect(self, start_at: float) -> dict[str, Any]:
        """Connect every client not connected, all at once from ``start_at`` (monotonic)."""
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic()
        out: dict[str, Any] = {"times": [], "failures": {}, "gave_up": 0}
        todo = [i for i in self.indexes if i not in self.conns]
        await asyncio.gather(*(self._client(i, t0, out) for i in todo))
        out["connected"] = len(self.conns)
        out["t0"] = t0
        return out

    def cut(self) -> int:
        """Reset every connection at once (SO_LINGER 0: the close sends RST)."""
        n = 0
        for proto in self.conns.values():
            if proto.transport is not None:
                proto.transport.abort()
                n += 1
        self.conns.clear()
        return n

    async def close(self) -> int:
        """A clean end: DISCONNECT, then wait for the server to close (bounded)."""
        conns = list(self.conns.values())
        self.conns.clear()
        for proto in conns:
            if proto.transport is not None and not proto.transport.is_closing():
                proto.transport.write(w.DISCONNECT_BYTES)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(*(p.lost for p in conns))
        for proto in conns:
            if proto.transport is not None:
                proto.transport.abort()
        return len(conns)


def _slice_main(s: dict[str, Any], indexes: list[int], pipe: Connection) -> None:
    loop = _new_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        sl = _Slice(s, indexes)
        while True:
            cmd, arg = await loop.run_in_executor(None, pipe.recv)
            if cmd == "connect":
                pipe.send(await sl.connect(arg))
            elif cmd == "cut":
                pipe.send(sl.cut())
            elif cmd == "close":
                pipe.send(await sl.close())
            else:
                pipe.send(None)
                return

    loop.run_until_complete(main())
    loop.close()


class Storm:
    """Client processes driven in lock step (see the module doc)."""

    def __init__(self, host: str, port: int, connections: int, *, procs: int = 1,
                 source_ips: int = 8, version: int = w.MQTT5, keepalive: int = 600,
                 backoff: float = 0.5, max_backoff: float = 4.0, deadline: float = 120.0,
                 attempt_timeout: float = 15.0, prefix: str = "storm", seed: int = 1) -> None:
        self.settings = {"host": host, "port": port, "source_ips": source_ips,
                         "version": version, "keepalive": keepalive, "backoff": backoff,
                         "max_backoff": max_backoff, "deadline": deadline,
                         "attempt_timeout": attempt_timeout, "prefix": prefix, "seed": seed}
        self.connections = connections
        self.procs = procs
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        for p in range(self.procs):
            mine, theirs = ctx.Pipe()
            idx = list(range(p, self.connections, self.procs))
            proc = ctx.Process(target=_slice_main, args=(self.settings, idx, theirs),
                               daemon=True)
            proc.start()
            self._pipes.append(mine)
            self._procs.append(proc)

    def _all(self, cmd: str, arg: Any = None, timeout: float = 600) -> list[Any]:
        for pipe in self._pipes:
            pipe.send((cmd, arg))
        out = []
        for pipe in self._pipes:
            if not pipe.poll(timeout):
                raise TimeoutError(f"storm client process: no answer to {cmd}")
            out.append(pipe.recv())
        return out

    def connect(self, lead: float = 0.5) -> dict[str, Any]:
        """Connect every client (all processes start at the same instant); merged stats."""
        parts = self._all("connect", time.monotonic() + lead)
        times = sorted(t for part in parts for t in part["times"])
        failures: dict[str, int] = {}
        for part in parts:
            for k, v in part["failures"].items():
                failures[k] = failures.get(k, 0) + v
        return {"connected": sum(p["connected"] for p in parts),
                "reconnected": len(times),
                "gave_up": sum(p["gave_up"] for p in parts),
                "all_in_s": times[-1] if times else None,
                "p50_s": times[len(times) // 2] if times else None,
                "failures": failures}

    def cut(self) -> int:
        return sum(self._all("cut"))

    def reconnect(self) -> dict[str, Any]:
        return self.connect()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._all("close", timeout=60)
        with contextlib.suppress(Exception):
            self._all("stop", timeout=10)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def _publisher_main(s: dict[str, Any], pipe: Connection) -> None:
    """One QoS 1 publisher (MQTT 5), one message in flight every 1 / rate seconds."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)

    async def main() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(s["host"], s["port"])
        writer.write(w.encode_connect(s["client_id"], w.MQTT5, 60))
        lat: list[float] = []
        acked: list[int] = []
        result: dict[str, Any] = {"disconnected": None, "refused": 0, "late": 0}
        buf = bytearray()
        pending: dict[int, tuple[int, float]] = {}
        got_connack = asyncio.Event()

        async def read() -> None:
            while True:
                data = await reader.read(65536)
                if not data:
                    result["disconnected"] = "closed by the server"
                    return
                buf.extend(data)
                packets, used = w.parse_packets(buf)
                del buf[:used]
                for typ, _flags, body in packets:
                    if typ == w.CONNACK:
                        got_connack.set()
                    elif typ == w.PUBACK:
                        pid, rc = w.puback_result(body)
                        seq, sent = pending.pop(pid, (-1, 0.0))
                        if rc < 0x80 and seq >= 0:
                            lat.append(time.monotonic() - sent)
                            acked.append(seq)
                        else:
                            result["refused"] += 1
                    elif typ == w.DISCONNECT:
                        result["disconnected"] = f"DISCONNECT {body[:1].hex()}"

        reading = asyncio.create_task(read())
        await asyncio.wait_for(got_connack.wait(), 30)
        pipe.send("ready")
        seq = 0
        interval = 1.0 / s["rate"]
        next_at = time.monotonic()
        while not pipe.poll() and result["disconnected"] is None:
            if len(pending) < 100:
                pid = seq % 65535 + 1
                payload = f"{s['client_id']}:{seq}".encode()
                topic = s["topic"].encode()
                var = len(topic).to_bytes(2, "big") + topic + pid.to_bytes(2, "big") + b"\x00"
                body = var + payload
                writer.write(b"\x32" + w.encode_varint(len(body)) + body)
                pending[pid] = (seq, time.monotonic())
                seq += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        end = time.monotonic() + s["grace"]
        while pending and time.monotonic() < end and result["disconnected"] is None:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        result["late"] = len(pending)
        reading.cancel()
        writer.write(w.DISCONNECT_BYTES)
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
        lat.sort()
        result.update(sent=seq, acked=acked, latencies=lat,
                      max_s=lat[-1] if lat else None,
                      p50_s=lat[len(lat) // 2] if lat else None,
                      p99_s=lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None)
        return result

    try:
        pipe.send(loop.run_until_complete(main()))
    except Exception as e:  # the caller asserts on it
        pipe.send({"error": repr(e)})
    loop.close()


class Publisher:
    """A connected QoS 1 publisher in its own process, timing every PUBACK."""

    def __init__(self, host: str, port: int, *, rate: float = 50.0, topic: str = "storm/pub",
                 client_id: str = "storm-publisher", grace: float = 60.0) -> None:
        self.settings = {"host": host, "port": port, "rate": rate, "topic": topic,
                         "client_id": client_id, "grace": grace}
        self._pipe: Connection | None = None
        self._proc: Any = None

    def start(self, timeout: float = 30) -> None:
        ctx = mp.get_context("spawn")
        self._pipe, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_publisher_main, args=(self.settings, theirs),
                                 daemon=True)
        self._proc.start()
        if not self._pipe.poll(timeout):
            raise TimeoutError("publisher not connected")
        first = self._pipe.recv()
        if first != "ready":
            raise RuntimeError(f"publisher: {first}")

    def stop(self, timeout: float = 120) -> dict[str, Any]:
        assert self._pipe is not None
        self._pipe.send("stop")
        if not self._pipe.poll(timeout):
            raise TimeoutError("publisher: no result")
        result: dict[str, Any] = self._pipe.recv()
        self._proc.join(5)
        return result
