"""A lightweight asyncio MQTT 3.1.1 publisher for fleets of hundreds (no thread per client).

Each ``FleetClient`` keeps one connection at a time, publishes QoS 1 or QoS 2 at a steady
rate with a small window, and on any loss of the connection reconnects with clean session
0 and the same client id, then resends what was not acknowledged as a device must:

- QoS 1: every PUBLISH without a PUBACK again, with DUP and the same packet id;
- QoS 2: a PUBLISH without a PUBREC again with DUP and the same packet id; one that got
  its PUBREC is answered with PUBREL again (never published again).

``acked`` holds the payloads the gateway acknowledged (PUBACK, or PUBCOMP for QoS 2): the
gateway's promise, which the test checks against Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct

from benchmarks.mqttwire import encode_varint

_CONNECT_FLAGS_CLEAN0 = 0x00


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def connect(client_id: str, keep_alive: int, clean: bool = False) -> bytes:
    body = _str("MQTT") + bytes([4, 0x02 if clean else _CONNECT_FLAGS_CLEAN0])
    body += struct.pack(">H", keep_alive) + _str(client_id)
    return b"\x10" + encode_varint(len(body)) + body


def publish(topic: str, payload: bytes, qos: int, packet_id: int, dup: bool) -> bytes:
    body = _str(topic) + struct.pack(">H", packet_id) + payload
    return bytes([0x30 | (0x08 if dup else 0) | qos << 1]) + encode_varint(len(body)) + body


def pubrel(packet_id: int) -> bytes:
    return b"\x62\x02" + struct.pack(">H", packet_id)


DISCONNECT = b"\xe0\x00"


def split_packets(buf: bytearray) -> list[tuple[int, bytes]]:
    """Complete packets off the front of ``buf`` (removed from it): (first byte, body)."""
    out: list[tuple[int, bytes]] = []
    pos, n = 0, len(buf)
    while pos + 2 <= n:
        length, mult, i = 0, 1, pos + 1
        while True:
            if i >= n:
                del buf[:pos]
                return out
            b = buf[i]
            length += (b & 0x7F) * mult
            mult <<= 7
            i += 1
            if not b & 0x80:
                break
        if i + length > n:
            break
        out.append((buf[pos], bytes(buf[i:i + length])))
        pos = i + length
    del buf[:pos]
    return out


class _Pending:
    __slots__ = ("payload", "released")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.released = False  # QoS 2: PUBREC received, PUBREL (re)sent


class FleetStats:
    def __init__(self) -> None:
        self.connects = 0
        self.connection_losses = 0
        self.resent = 0            # PUBLISH resent with DUP
        self.pubrel_resent = 0
        self.session_present = 0   # CONNACKs with session present = 1
        self.refused = 0           # CONNACKs with a non-zero return code


class FleetClient:
    def __init__(self, index: int, client_id: str, topic: str, qos: int, port: int,
                 stats: FleetStats, rng: random.Random, rate: float = 1.0, window: int = 8,
                 keep_alive: int = 60) -> None:
        self.index = index
        self.client_id = client_id
        self.topic = topic
        self.qos = qos
        self.port = port
        self.stats = stats
        self.rng = rng
        self.interval = 1.0 / rate
        self.window = window
        self.keep_alive = keep_alive
        self.pending: dict[int, _Pending] = {}
        self.acked: set[bytes] = set()
        self.sent: list[bytes] = []
        self._next_pid = 0
        self.publishing = True  # cleared by the test: finish what is pending, then stop

    def _pid(self) -> int:
        while True:
            self._next_pid = self._next_pid % 65535 + 1
            if self._next_pid not in self.pending:
                return self._next_pid

    @property
    def done(self) -> bool:
        return not self.publishing and not self.pending

    async def run(self, stop_at: float) -> None:
        """Publish until ``publishing`` is cleared and nothing is pending, or ``stop_at``."""
        loop = asyncio.get_running_loop()
        while not self.done and loop.time() < stop_at:
            try:
                await self._connection(stop_at)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                self.stats.connection_losses += 1
            if not self.done:
                await asyncio.sleep(self.rng.uniform(0.05, 0.5))  # a device's backoff

    async def _connection(self, stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), 30)
        try:
            writer.write(connect(self.client_id, self.keep_alive))
            buf = bytearray()
            packets: list[tuple[int, bytes]] = []
            while not packets:
                chunk = await asyncio.wait_for(reader.read(65536), 30)
                if not chunk:
                    raise ConnectionError("closed before CONNACK")
                buf += chunk
                packets = split_packets(buf)
            first, body = packets.pop(0)
            if first != 0x20 or body[1] != 0:
                self.stats.refused += 1
                raise ConnectionError(f"CONNACK {body!r}")
            self.stats.connects += 1
            if body[0] & 1:
                self.stats.session_present += 1
            for pid in sorted(self.pending):  # resend in the order first sent
                entry = self.pending[pid]
                if entry.released:
                    writer.write(pubrel(pid))
                    self.stats.pubrel_resent += 1
                else:
                    writer.write(publish(self.topic, entry.payload, self.qos, pid, dup=True))
                    self.stats.resent += 1
            self._handle(packets, writer)
            next_send = loop.time()
            while not self.done and loop.time() < stop_at:
                now = loop.time()
                if self.publishing and now >= next_send and len(self.pending) < self.window:
                    payload = f"{self.client_id}:{len(self.sent)}".encode()
                    self.sent.append(payload)
                    pid = self._pid()
                    self.pending[pid] = _Pending(payload)
                    writer.write(publish(self.topic, payload, self.qos, pid, dup=False))
                    next_send = now + self.interval
                wait = max(0.01, next_send - loop.time()) if self.publishing else 5.0
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), wait)
                except TimeoutError:
                    continue
                if not chunk:
                    raise ConnectionError("closed by the gateway")
                buf += chunk
                self._handle(split_packets(buf), writer)
            if self.done:
                writer.write(DISCONNECT)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.read(1), 10)  # the gateway closes first
        finally:
            writer.transport.abort()

    def _handle(self, packets: list[tuple[int, bytes]], writer: asyncio.StreamWriter) -> None:
        for first, body in packets:
            kind = first >> 4
            pid = body[0] << 8 | body[1] if len(body) >= 2 else 0
            if kind == 4 and self.qos == 1:        # PUBACK
                entry = self.pending.pop(pid, None)
                if entry is not None:
                    self.acked.add(entry.payload)
            elif kind == 5 and self.qos == 2:      # PUBREC
                rec = self.pending.get(pid)
                if rec is not None:
                    rec.released = True
                    writer.write(pubrel(pid))
            elif kind == 7 and self.qos == 2:      # PUBCOMP
                comp = self.pending.get(pid)
                if comp is not None and comp.released:
                    del self.pending[pid]
                    self.acked.add(comp.payload)
            elif kind == 13:                       # PINGRESP
                pass
            else:
                raise ConnectionError(f"unexpected packet 0x{first:02X}")
