"""One load-generator worker process: a uvloop loop driving many connections.

The parent (benchmarks.loadgen) hands each worker a range of client indices and
two events: `start` (begin publishing / holding) and `stop` (close and report).
Reports go back on a multiprocessing queue as plain dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from array import array
from typing import Any

from benchmarks import mqttwire as w
from benchmarks.stats import raise_nofile

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Conn(asyncio.Protocol):
    """One MQTT client connection; parses CONNACK/PUBACK/PINGRESP inline."""

    __slots__ = (
        "acked",
        "buf",
        "closing",
        "connack",
        "enc",
        "inflight",
        "lat",
        "lost",
        "next_pid",
        "paused",
        "pongs",
        "seq",
        "transport",
        "version",
        "wake",
        "wg",
    )

    def __init__(self, wg: WorkerState, enc: w.PublishEncoder | None, version: int) -> None:
        self.wg = wg
        self.enc = enc
        self.version = version
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.inflight: dict[int, tuple[int, int]] = {}  # pid -> (send monotonic ns, seq)
        self.next_pid = 1
        self.seq = 0
        self.acked = 0
        self.paused = False
        self.pongs = 0
        self.closing = False
        self.lost = False
        self.lat = wg.lat

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        now = 0
        freed = False
        while pos + 2 <= n:
            if buf[pos] == 0x40 and buf[pos + 1] == 2 and pos + 4 <= n:  # 3.1.1 / short v5
                ent = self.inflight.pop((buf[pos + 2] << 8) | buf[pos + 3], None)
                if ent is not None:
                    now = now or time.monotonic_ns()
                    self.lat.append((now - ent[0]) // 1000)
                    self.acked += 1
                    freed = True
                else:
                    self.wg.err("puback_unknown_pid")
                pos += 4
                continue
            pkts, used = w.parse_packets(buf[pos:])
            if not pkts:
                break
            for typ, _flags, body in pkts:
                freed |= self._packet(typ, body)
            pos += used
        if pos:
            del buf[:pos]
        if freed:
            self.wg.wake()

    def _packet(self, typ: int, body: bytes) -> bool:
        if typ == w.CONNACK:
            if not self.connack.done():
                self.connack.set_result(w.connack_result(body, self.version))
        elif typ == w.PUBACK:
            pid, reason = w.puback_result(body)
            ent = self.inflight.pop(pid, None)
            if ent is None:
                self.wg.err("puback_unknown_pid")
            elif reason >= 0x80:
                self.wg.err(f"puback_reason_{reason:#x}")
            else:
                self.lat.append((time.monotonic_ns() - ent[0]) // 1000)
                self.acked += 1
            return True
        elif typ == w.DISCONNECT:
            self.wg.err(f"server_disconnect_{body[:1].hex() or '00'}")
        elif typ == w.PINGRESP:
            self.pongs += 1
            return True
        else:
            self.wg.err(f"unexpected_packet_{typ}")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.connack.done():  # a failed connect: counted by _connect, not here
            self.connack.set_exception(ConnectionResetError("closed before CONNACK"))
        elif not self.closing:
            self.wg.err("connection_lost")
        self.wg.wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.wg.wake()

    def send(self, n: int, now_ns: int, wall_ns: int) -> int:
        """Write n PUBLISH packets in one write; returns n."""
        enc, qos, seq = self.enc, self.enc.qos, self.seq  # type: ignore[union-attr]
        parts = []
        for _ in range(n):
            pid = 0
            if qos:
                pid = self.next_pid
                self.next_pid = pid + 1 if pid < 65535 else 1
                self.inflight[pid] = (now_ns, seq)
            parts.append(enc.encode(pid, seq, wall_ns))  # type: ignore[union-attr]
            seq += 1
        self.seq = seq
        self.transport.write(b"".join(parts))  # type: ignore[union-attr]
        return n


class WorkerState:
    __slots__ = ("errors", "event", "last_ok", "lat")

    def __init__(self) -> None:
        self.errors: dict[str, int] = {}
        self.last_ok = 0.0  # monotonic time of the last successful CONNACK
        self.lat = array("q")
        self.event = asyncio.Event()

    def err(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def wake(self) -> None:
        self.event.set()


async def _connect(
    s: dict[str, Any], idx: int, wg: WorkerState, sem: asyncio.Semaphore, lat: array
) -> Conn | None:
    loop = asyncio.get_running_loop()
    n_ips = s["source_ips"]
    enc = None
    if s["mode"] == "publish":
        enc = w.PublishEncoder(
            f"bench/{s['client_prefix']}-{s['run_id']}-{idx}/data",
            s["qos"],
            s["payload_size"],
            s["version"],
            s["run_id"],
            idx,
        )
    async with sem:
        t0 = time.monotonic_ns()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if enc is not None and s["sndbuf"]:  # bound what queues up unread (QoS 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, s["sndbuf"])
            if n_ips:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((f"127.0.0.{2 + idx % n_ips}", 0))
            async with asyncio.timeout(s["connect_timeout"]):
                await loop.sock_connect(sock, (s["host"], s["port"]))
                _, proto = await loop.create_connection(
                    lambda: Conn(wg, enc, s["version"]), sock=sock
                )
                cid = f"{s['client_prefix']}-{s['run_id']}-{idx}"
                user, password = s["username"], s["password"]
                if "_creds" in s:
                    user, password = s["_creds"][idx % len(s["_creds"])]
                proto.transport.write(w.encode_connect(
                    cid, s["version"], s["keepalive"], user, password))
                rc = await proto.connack
        except (OSError, TimeoutError, w.ProtocolError) as e:
            sock.close()
            wg.err(f"connect_{type(e).__name__}")
            return None
        if rc != 0:
            wg.err(f"connack_rc_{rc}")
            proto.closing = True
            proto.transport.close()
            return None
        lat.append((time.monotonic_ns() - t0) // 1000)
        wg.last_ok = time.monotonic()
        return proto


async def _wait_event(ev: Any, poll: float = 0.05) -> None:
    """Wait for a multiprocessing.Event without blocking the loop."""
    while not ev.is_set():  # noqa: ASYNC110 (a process-shared event, not an asyncio one)
        await asyncio.sleep(poll)


async def _hold(s: dict[str, Any], conns: list[Conn], stop: Any) -> None:
    """Keep idle connections alive (one PINGREQ sweep, not a timer each)."""
    interval = max(1.0, s["keepalive"] / 2) if s["keepalive"] else 3600.0
    next_ping = time.monotonic() + interval
    while not stop.is_set():
        await asyncio.sleep(0.1)
        if time.monotonic() >= next_ping:
            next_ping += interval
            for c in conns:
                if not c.lost:
                    c.transport.write(w.PINGREQ_BYTES)  # type: ignore[union-attr]


async def _publish(
    s: dict[str, Any], conns: list[Conn], wg: WorkerState, share: float, cap: int
) -> float:
    """Publish for the configured duration; returns the publishing seconds."""
    qos, window = s["qos"], max(1, s["inflight"])
    rate = s["rate"] * share
    t0 = time.monotonic()
    deadline = t0 + s["duration"]
    sent, rr, n = 0, 0, len(conns)
    batch = 16 if qos == 0 else window
    while sent < cap:
        now = time.monotonic()
        if now >= deadline:
            break
        budget = cap - sent
        if rate:
            budget = min(budget, int(rate * (now - t0)) + 1 - sent)
        progressed = False
        now_ns, wall_ns = time.monotonic_ns(), time.time_ns()
        for i in range(n):
            if budget <= 0:
                break
            c = conns[(rr + i) % n]
            if c.paused or c.lost:
                continue
            room = batch if qos == 0 else window - len(c.inflight)
            if rate:
                room = min(room, 1 + budget // n)
            k = min(room, budget)
            if k > 0:
                sent += c.send(k, now_ns, wall_ns)
                budget -= k
                progressed = True
        rr = (rr + 1) % n
        if rate:
            await asyncio.sleep(0.002)
        elif not progressed:
            wg.event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await wg.event.wait()
        else:
            await asyncio.sleep(0)
    return time.monotonic() - t0


async def _drain(conns: list[Conn], wg: WorkerState, timeout: float) -> None:
    """PINGREQ on every connection, wait for every PINGRESP: the server answers in
    order, so then it has read everything sent (not merely queued in socket buffers)."""
    for c in conns:
        if not c.lost:
            c.pongs = 0
            c.transport.write(w.PINGREQ_BYTES)  # type: ignore[union-attr]
    end = time.monotonic() + timeout
    while any(c.pongs == 0 and not c.lost for c in conns) and time.monotonic() < end:
        wg.event.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await wg.event.wait()
    wg.errors["drain_timeout"] = sum(1 for c in conns if c.pongs == 0 and not c.lost) or 0
    if not wg.errors["drain_timeout"]:
        del wg.errors["drain_timeout"]


async def _worker(
    s: dict[str, Any], wid: int, lo: int, hi: int, q: Any, start: Any, stop: Any
) -> None:
    wg = WorkerState()
    sem = asyncio.Semaphore(s["connect_concurrency"])
    clat = array("q")
    t0, cpu0 = time.monotonic(), time.process_time()
    res = await asyncio.gather(*(_connect(s, i, wg, sem, clat) for i in range(lo, hi)))
    conns = [c for c in res if c is not None]
    idx = [i for i, c in zip(range(lo, hi), res, strict=True) if c is not None]
    q.put(
        {
            "phase": "connected",
            "wid": wid,
            "ok": len(conns),
            "elapsed": (wg.last_ok or t0) - t0,  # to the last success, not the last timeout
            "all_done": time.monotonic() - t0,
            "cpu_s": time.process_time() - cpu0,  # this process's CPU for its connects
            "lat_us": clat.tobytes(),
            "errors": dict(wg.errors),
        }
    )
    wg.errors.clear()
    await _wait_event(start, 0.01)
    final: dict[str, Any] = {"phase": "final", "wid": wid}
    if s["mode"] == "connect":
        await _hold(s, conns, stop)
        final["lost"] = sum(c.lost for c in conns)
        final["open"] = len(conns) - final["lost"]
    elif conns:
        share = (hi - lo) / s["connections"]
        cap = int(s["max_messages"] * share) or 1
        final["pub_seconds"] = await _publish(s, conns, wg, share, cap)
        t_drain = time.monotonic()
        await _drain(conns, wg, s["drain_timeout"])
        final["drain_seconds"] = time.monotonic() - t_drain
        grace_end = time.monotonic() + s["grace"]
        while any(c.inflight and not c.lost for c in conns) and time.monotonic() < grace_end:
            wg.event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await wg.event.wait()
    for c in conns:
        c.closing = True
        if not c.lost:
            c.transport.write(w.DISCONNECT_BYTES)  # type: ignore[union-attr]
            c.transport.close()  # type: ignore[union-attr]
    if s["mode"] == "publish":
        final["pub_seconds"] = final.get("pub_seconds", 0.0)
        final["sent"] = sum(c.seq for c in conns)
        final["acked"] = sum(c.acked for c in conns)
        final["lat_us"] = wg.lat.tobytes()
        final["clients"] = {
            str(i): [c.seq, sorted(e[1] for e in c.inflight.values())]
            for i, c in zip(idx, conns, strict=True)
        }
    await asyncio.sleep(0.2)
    final["errors"] = dict(wg.errors)
    q.put(final)


def worker_main(
    s: dict[str, Any], wid: int, lo: int, hi: int, q: Any, start: Any, stop: Any
) -> None:
    raise_nofile()
    if s.get("credentials"):
        # One "username<TAB>password" line per device; connection i uses line i.
        with open(s["credentials"]) as f:
            s["_creds"] = [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]
    import uvloop

    uvloop.run(_worker(s, wid, lo, hi, q, start, stop))
