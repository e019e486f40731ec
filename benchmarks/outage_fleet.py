"""A paced QoS 1 MQTT fleet for outage runs (``bench_outage.py`` and the outage test).

Runs on its own thread and event loop.  Each client publishes at its share of
the offered rate with a window of ``inflight`` unacknowledged messages; a
message that comes due while the window is full is *not sent* and counted in
``skipped`` (a device that samples only when it can send): that is what
backpressure looks like from the device side.  Every PUBACK is timed.

Clients ``0 .. clients-1`` publish on ``tele/<id>`` (telemetry), the next
``alarm_clients`` on ``alarm/<id>`` (alarms).  The client id is the Kafka key
under the shipped default key, so per-key order is per-client order.  The
payload is ``benchmarks.mqttwire``'s header: run id, client index, sequence
number, send time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from array import array
from dataclasses import dataclass, field

from benchmarks import mqttwire as w


@dataclass
class Acked:
    """What one client was told: seqs PUBACKed with success, in ack order, and when."""

    seqs: list[int] = field(default_factory=list)
    at: list[float] = field(default_factory=list)  # monotonic time of each PUBACK
    count: int = 0  # PUBACKs when seqs are not kept (track_acks=False)
    failed: int = 0


class _Client(asyncio.Protocol):
    def __init__(self, fleet: Fleet, idx: int, topic: str) -> None:
        self.fleet = fleet
        self.idx = idx
        self.enc = w.PublishEncoder(topic, 1, fleet.payload_size, w.MQTT311, fleet.run_id, idx)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.connected = asyncio.get_running_loop().create_future()
        self.open: dict[int, tuple[int, float]] = {}  # pid -> (seq, sent monotonic)
        self.next_pid = 1
        self.seq = 0
        self.acked = Acked()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(w.encode_connect(f"{self.fleet.prefix}-{self.idx}", w.MQTT311, 60))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        packets, used = w.parse_packets(self.buf)
        del self.buf[:used]
        now = time.monotonic()
        for kind, _flags, body in packets:
            if kind == w.CONNACK and not self.connected.done():
                self.connected.set_result(w.connack_result(body, w.MQTT311))
            elif kind == w.PUBACK:
                pid, reason = w.puback_result(body)
                sent = self.open.pop(pid, None)
                if sent is None:
                    continue
                seq, at = sent
                if reason < 0x80:
                    if self.fleet.track_acks:
                        self.acked.seqs.append(seq)
                        self.acked.at.append(now)
                    else:
                        self.acked.count += 1
                    fleet = self.fleet
                    fleet.lat_at.append(now)
                    fleet.lat.append(now - at)
                    fleet.lat_alarm.append(self.idx >= fleet.clients)
                else:
                    self.acked.failed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = not self.fleet.closing  # closed by the server, not by us
        if not self.connected.done():
            self.connected.set_result(-1)

    def send(self) -> bool:
        transport = self.transport
        if (transport is None or self.lost or transport.is_closing()
                or len(self.open) >= self.fleet.inflight):
            return False
        pid = self.next_pid
        while pid in self.open:
            pid = pid % 65535 + 1
        self.next_pid = pid % 65535 + 1
        self.open[pid] = (self.seq, time.monotonic())
        transport.write(self.enc.encode(pid, self.seq, time.time_ns()))
        self.seq += 1
        return True


class Fleet:
    """``Fleet(port, clients=20, rate=2000, alarm_clients=2, alarm_rate=50).start()``."""

    def __init__(self, port: int, *, clients: int, rate: float, alarm_clients: int = 0,
                 alarm_rate: float = 0.0, payload_size: int = 100, inflight: int = 100,
                 prefix: str = "fleet", run_id: int = 1, track_acks: bool = True) -> None:
        self.port = port
        self.clients = clients
        self.rate = rate
        self.alarm_clients = alarm_clients
        self.alarm_rate = alarm_rate
        self.payload_size = payload_size
        self.inflight = inflight
        self.prefix = prefix
        self.run_id = run_id
        self.track_acks = track_acks  # keep every PUBACKed seq (tests), or count only
        # Per PUBACK, appended on the fleet's thread: monotonic time, latency s, is alarm.
        self.lat_at = array("d")
        self.lat = array("d")
        self.lat_alarm = array("b")
        self.sent = 0
        self.skipped = 0
        self._clients: list[_Client] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._grace = 30.0
        self.closing = False
        self._ready = threading.Event()
        self.error: BaseException | None = None

    # --- control (caller's thread) ---------------------------------------------------

    def start(self, timeout: float = 30.0) -> Fleet:
        self._thread = threading.Thread(target=self._main, name="fleet", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self.error is not None:
            raise RuntimeError(f"fleet did not connect: {self.error!r}")
        return self

    def stop(self, grace: float = 30.0) -> None:
        """Stop sending; wait up to ``grace`` for open PUBACKs; close."""
        self._grace = grace
        self._stop.set()
        if self._thread is not None:
            self._thread.join(grace + 10)

    def acked(self) -> dict[str, list[int]]:
        """client id -> seqs PUBACKed with success."""
        return {f"{self.prefix}-{c.idx}": list(c.acked.seqs) for c in self._clients}

    def acked_before(self, when: float) -> dict[str, set[int]]:
        """client id -> seqs PUBACKed before monotonic time ``when``."""
        return {f"{self.prefix}-{c.idx}": {s for s, t in zip(c.acked.seqs, c.acked.at,
                                                            strict=True) if t < when}
                for c in self._clients}

    def alarm_ids(self) -> set[str]:
        return {f"{self.prefix}-{c.idx}" for c in self._clients if c.idx >= self.clients}

    def failed(self) -> int:
        return sum(c.acked.failed for c in self._clients)

    def lost_connections(self) -> int:
        return sum(1 for c in self._clients if c.lost)

    def open_count(self) -> int:
        return sum(len(c.open) for c in self._clients)

    def acked_count(self) -> int:
        return sum(len(c.acked.seqs) + c.acked.count for c in self._clients)

    @property
    def latencies(self) -> list[tuple[float, float, bool]]:
        """(PUBACK monotonic time, latency s, is alarm) of every PUBACK so far."""
        n = min(len(self.lat_at), len(self.lat), len(self.lat_alarm))
        return list(zip(self.lat_at[:n], self.lat[:n], map(bool, self.lat_alarm[:n]),
                        strict=True))

    # --- the fleet's thread ------------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported to the caller through start()/error
            self.error = exc
            self._ready.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        total = self.clients + self.alarm_clients
        for idx in range(total):
            topic = f"tele/{idx}" if idx < self.clients else f"alarm/{idx}"
            client = _Client(self, idx, topic)
            await loop.create_connection(lambda c=client: c, "127.0.0.1", self.port)  # type: ignore[misc]
            code = await asyncio.wait_for(client.connected, 30)
            if code != 0:
                raise RuntimeError(f"CONNACK {code} for client {idx}")
            self._clients.append(client)
        self._ready.set()
        normal = self._clients[: self.clients]
        alarms = self._clients[self.clients:]
        t0 = time.monotonic()
        due = {c.idx: 0 for c in self._clients}
        while not self._stop.is_set():
            await asyncio.sleep(0.005)
            elapsed = time.monotonic() - t0
            for group, rate in ((normal, self.rate), (alarms, self.alarm_rate)):
                if not group or rate <= 0:
                    continue
                per = rate / len(group)
                for client in group:
                    target = int(elapsed * per)
                    while due[client.idx] < target:
                        due[client.idx] += 1
                        if client.send():
                            self.sent += 1
                        else:
                            self.skipped += 1
        deadline = time.monotonic() + self._grace
        for _ in range(int(self._grace / 0.05)):  # bounded wait for the open PUBACKs
            if not self.open_count() or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        self.closing = True
        for client in self._clients:
            if client.transport is not None and not client.lost:
                client.transport.write(w.DISCONNECT_BYTES)
                client.transport.close()
        await asyncio.sleep(0.1)


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
