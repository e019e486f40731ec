"""Fan-out to devices (issue 17): Kafka produce -> Lastmile -> N MQTT subscribers, next
to Mosquitto's fan-out to the same subscribers and Kafka's own consume latency.

    python -m benchmarks.bench_fanout            # 10,000 subscribers (a few minutes)
    python -m benchmarks.bench_fanout --quick    # 500 subscribers (smoke)

One subscriber fleet (raw MQTT 3.1.1 clients in ``--procs`` processes, sources spread
over 127.0.0.2.., as benchmarks/storm.py does) connects to each server in turn.
Every subscriber ``i`` subscribes at QoS 1 to ``cmd/<i>`` and ``cmd/all`` and
answers each PUBLISH with a PUBACK.  Two phases per server:

- unicast (latency): ``--rate`` messages/s for ``--duration`` s, each to one
  subscriber (ids in turn); p50/p99 of send -> receive.
- broadcast (throughput): ``--bursts`` messages to ``cmd/all`` sent back to back;
  deliveries per second from the first send to the last delivery (the target's
  figure), and from the first delivery to the last (the fan-out alone).

For Lastmile the sender is a Kafka producer (record key = the id, rule
``cmd/{key}`` at QoS 1); for Mosquitto an MQTT QoS 1 publisher.  The send time
(ns since the epoch) is in the payload; sender and subscribers share the host clock.
While Lastmile's unicast phase runs, a bare confluent-kafka consumer with the
gateway's consumer settings reads the same topic: Kafka's own produce -> consume
latency, the floor of the target.  Results: benchmarks/results/fanout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks import mqttwire as w
from benchmarks import report
from benchmarks.servers import Lastmile, Mosquitto, Tansu, mosquitto_bin, mosquitto_version
from benchmarks.stats import cpu_seconds, raise_nofile, summarize

RESULTS = Path(__file__).parent / "results" / "fanout.json"
ROOT = Path(__file__).resolve().parent.parent
IP_BIND_ADDRESS_NO_PORT = 24
_LINGER0 = struct.pack("ii", 1, 0)
SUBACK = 9
UNICAST, BROADCAST = 1, 2  # the payload's run id field: the phase
PAYLOAD = 64
LATENCY_TARGET_MS = 20.0
THROUGHPUT_TARGET = 0.5


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def encode_subscribe(pid: int, filters: list[str], qos: int) -> bytes:
    body = pid.to_bytes(2, "big") + b"".join(
        len(f.encode()).to_bytes(2, "big") + f.encode() + bytes([qos]) for f in filters)
    return b"\x82" + w.encode_varint(len(body)) + body


class Stats:
    """What one subscriber process received, per phase."""

    def __init__(self) -> None:
        self.lat_us: dict[int, array[int]] = {UNICAST: array("q"), BROADCAST: array("q")}
        self.first_ns: dict[int, int] = {UNICAST: 0, BROADCAST: 0}
        self.last_ns: dict[int, int] = {UNICAST: 0, BROADCAST: 0}
        self.foreign = 0


class _Sub(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
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
        now = time.time_ns()
        acks = []
        stats = self.stats
        for typ, flags, body in packets:
            if typ == w.PUBLISH:
                tlen = (body[0] << 8) | body[1]
                pos = 2 + tlen
                if flags & 0x06:
                    acks.append(b"\x40\x02" + body[pos:pos + 2])
                    pos += 2
                got = w.decode_payload(body[pos:])
                if got is None or got[0] not in stats.lat_us:
                    stats.foreign += 1
                    continue
                stats.lat_us[got[0]].append((now - got[3]) // 1000)
                stats.last_ns[got[0]] = now
                if not stats.first_ns[got[0]]:
                    stats.first_ns[got[0]] = now
            elif typ == w.CONNACK and not self.ready.done():
                rc = w.connack_result(body, w.MQTT311)
                if rc:
                    self.ready.set_result(rc)
            elif typ == SUBACK and not self.ready.done():
                self.ready.set_result(0 if all(b < 0x80 for b in body[2:]) else 0x80)
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionResetError("closed before SUBACK"))
        if not self.lost.done():
            self.lost.set_result(None)


class _Fleet:
    """The subscribers of one process."""

    def __init__(self, s: dict[str, Any], indexes: list[int]) -> None:
        self.s = s
        self.indexes = indexes
        self.conns: list[_Sub] = []
        self.stats = Stats()

    async def _one(self, port: int, idx: int, gate: asyncio.Semaphore) -> bool:
        loop = asyncio.get_running_loop()
        async with gate:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((f"127.0.0.{2 + idx % self.s['source_ips']}", 0))
                async with asyncio.timeout(60):
                    await loop.sock_connect(sock, ("127.0.0.1", port))
                    _, proto = await loop.create_connection(lambda: _Sub(self.stats), sock=sock)
                    assert proto.transport is not None
                    proto.transport.write(
                        w.encode_connect(f"fan-{idx}", w.MQTT311, 600)
                        + encode_subscribe(1, [f"cmd/{idx}", "cmd/all"], 1))
                    rc = await proto.ready
            except (OSError, TimeoutError, w.ProtocolError):
                sock.close()
                return False
        if rc:
            assert proto.transport is not None
            proto.transport.abort()
            return False
        self.conns.append(proto)
        return True

    async def connect(self, port: int) -> int:
        self.stats = Stats()
        gate = asyncio.Semaphore(64)
        done = await asyncio.gather(*(self._one(port, i, gate) for i in self.indexes))
        return sum(done)

    async def wait(self, phase: int, expected: int, timeout: float) -> dict[str, Any]:
        """Until ``expected`` messages of ``phase`` arrived or nothing came for ``timeout`` s."""
        got = self.stats.lat_us[phase]
        seen, quiet_since = -1, time.monotonic()
        while len(got) < expected:
            if len(got) != seen:
                seen, quiet_since = len(got), time.monotonic()
            elif time.monotonic() - quiet_since > timeout:
                break
            await asyncio.sleep(0.05)
        return {"lat_us": got.tobytes(), "last_ns": self.stats.last_ns[phase],
                "first_ns": self.stats.first_ns[phase],
                "foreign": self.stats.foreign}

    async def close(self) -> None:
        conns, self.conns = self.conns, []
        for proto in conns:
            if proto.transport is not None and not proto.transport.is_closing():
                proto.transport.write(w.DISCONNECT_BYTES)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                await asyncio.gather(*(p.lost for p in conns))
        for proto in conns:
            if proto.transport is not None:
                proto.transport.abort()


def _fleet_main(s: dict[str, Any], indexes: list[int], pipe: Connection) -> None:
    loop = _new_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        fleet = _Fleet(s, indexes)
        while True:
            cmd, arg = await loop.run_in_executor(None, pipe.recv)
            if cmd == "connect":
                pipe.send(await fleet.connect(arg))
            elif cmd == "wait":
                pipe.send(await fleet.wait(*arg))
            elif cmd == "close":
                await fleet.close()
                pipe.send(None)
            else:
                pipe.send(None)
                return

    loop.run_until_complete(main())
    loop.close()


class Fleet:
    """Subscriber processes driven in lock step."""

    def __init__(self, n: int, procs: int, source_ips: int) -> None:
        self.n = n
        self.procs = procs
        self.slices = [list(range(p, n, procs)) for p in range(procs)]
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []
        ctx = mp.get_context("spawn")
        for idx in self.slices:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_fleet_main, args=({"source_ips": source_ips}, idx, theirs),
                               daemon=True)
            proc.start()
            self._pipes.append(mine)
            self._procs.append(proc)

    def _all(self, cmd: str, args: list[Any], timeout: float = 600) -> list[Any]:
        for pipe, arg in zip(self._pipes, args, strict=True):
            pipe.send((cmd, arg))
        out = []
        for pipe in self._pipes:
            if not pipe.poll(timeout):
                raise TimeoutError(f"fan-out subscriber process: no answer to {cmd}")
            out.append(pipe.recv())
        return out

    def connect(self, port: int) -> int:
        return sum(self._all("connect", [port] * self.procs))

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self._procs)

    def wait(self, phase: int, expected: list[int], quiet: float) -> dict[str, Any]:
        parts = self._all("wait", [(phase, e, quiet) for e in expected])
        lat = array("q")
        for part in parts:
            lat.frombytes(part["lat_us"])
        firsts = [p["first_ns"] for p in parts if p["first_ns"]]
        return {"lat_us": lat, "last_ns": max(p["last_ns"] for p in parts),
                "first_ns": min(firsts) if firsts else 0,
                "foreign": sum(p["foreign"] for p in parts)}

    def disconnect(self) -> None:
        self._all("close", [None] * self.procs, timeout=60)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._all("stop", [None] * self.procs, timeout=10)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


# --- senders --------------------------------------------------------------------------

def _paced(count: int, rate: float, send: Any) -> tuple[int, int]:
    """Call ``send(i, send_ns)`` ``count`` times at ``rate``/s (0: back to back);
    (first, last) send time in ns."""
    t0 = time.monotonic()
    first = 0
    for i in range(count):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        now = time.time_ns()
        first = first or now
        send(i, now)
    return first, time.time_ns()


class KafkaSender:
    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all"})

    def run(self, phase: int, count: int, rate: float, key_of: Any) -> tuple[int, int]:
        produce, poll = self.producer.produce, self.producer.poll

        def send(i: int, now: int) -> None:
            produce(self.topic, key=key_of(i).encode(),
                    value=w.make_payload(phase, 0, i, now, PAYLOAD))
            poll(0)

        out = _paced(count, rate, send)
        if self.producer.flush(30):
            raise RuntimeError("kafka producer: records not delivered in 30 s")
        return out


class MqttSender:
    """One QoS 1 publisher; PUBACKs read (and discarded) by a thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(w.encode_connect("fan-publisher", w.MQTT311, 600))
        first = self.sock.recv(4)
        if len(first) < 4 or first[0] != 0x20 or first[3] != 0:
            raise RuntimeError(f"publisher CONNACK: {first!r}")
        self.acked = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError):
            while data := self.sock.recv(65536):
                buf += data
                packets, used = w.parse_packets(buf)
                del buf[:used]
                self.acked += sum(1 for typ, _, _ in packets if typ == w.PUBACK)

    def run(self, phase: int, count: int, rate: float, topic_of: Any) -> tuple[int, int]:
        def send(i: int, now: int) -> None:
            topic = topic_of(i)
            payload = w.make_payload(phase, 0, i, now, PAYLOAD)
            pfx = w.publish_prefix(topic, 1, PAYLOAD, w.MQTT311)
            self.sock.sendall(pfx + (i % 65535 + 1).to_bytes(2, "big") + payload)

        return _paced(count, rate, send)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(w.DISCONNECT_BYTES)
        self.sock.close()


def _floor_main(settings: dict[str, Any], topic: str, seconds: float, pipe: Connection) -> None:
    """A bare consumer with the gateway's settings, one ``poll`` at a time:
    produce -> consume latency (us)."""
    from confluent_kafka import OFFSET_END, Consumer, TopicPartition

    consumer = Consumer(settings)
    consumer.assign([TopicPartition(topic, 0, OFFSET_END)])
    lat = array("q")
    pipe.send("ready")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        # poll returns on the first record; consume(n, t) waits for n records or the
        # timeout (on tansu 50-100 ms more at p50 / p99, measured).
        msg = consumer.poll(0.1)
        if msg is not None and msg.error() is None:
            got = w.decode_payload(msg.value() or b"")
            if got is not None and got[0] == UNICAST:
                lat.append((time.time_ns() - got[3]) // 1000)
        if pipe.poll():
            break
    consumer.close()
    pipe.send(lat.tobytes())


# --- one server ------------------------------------------------------------------------

def phases(fleet: Fleet, sender: Any, args: argparse.Namespace, unicast_name: Any,
           broadcast_name: str, servers: list[int]) -> dict[str, Any]:
    """Both phases; ``servers``: pids whose CPU the broadcast phase reports (with the
    subscribers': whoever is near 1 CPU second per second bounds the throughput)."""
    n = fleet.n
    count = int(args.rate * args.duration)
    per_proc = [0] * fleet.procs
    for i in range(count):
        per_proc[(i % n) % fleet.procs] += 1
    first, _ = sender.run(UNICAST, count, args.rate, lambda i: unicast_name(i % n))
    got = fleet.wait(UNICAST, per_proc, args.quiet)
    lat = got["lat_us"]
    unicast = {"sent": count, "received": len(lat), "rate_per_s": args.rate,
               "latency_ms": summarize(lat, 0.001),
               "deliveries_per_s": round(len(lat) / ((got["last_ns"] - first) / 1e9), 1)
               if got["last_ns"] > first else None}
    bursts = args.bursts
    cpu0 = [cpu_seconds(pid) for pid in servers], fleet.cpu()
    first, _ = sender.run(BROADCAST, bursts, 0, lambda _i: broadcast_name)
    got = fleet.wait(BROADCAST, [bursts * len(sl) for sl in fleet.slices], args.quiet)
    cpu = {"server_s": round(sum(cpu_seconds(pid) for pid in servers) - sum(cpu0[0]), 2),
           "subscribers_s": round(fleet.cpu() - cpu0[1], 2)}
    lat = got["lat_us"]
    # Throughput: deliveries from the first send to the last delivery (what the target
    # compares); from the first delivery to the last too (the fan-out alone, without
    # the one-off transit).
    span = (got["last_ns"] - first) / 1e9 if got["last_ns"] > first else 0.0
    fan = (got["last_ns"] - got["first_ns"]) / 1e9 if got["first_ns"] else 0.0
    broadcast = {"messages": bursts, "expected": bursts * n, "received": len(lat),
                 "seconds": round(span, 3), "first_to_last_s": round(fan, 3),
                 "deliveries_per_s": round(len(lat) / span, 1) if span else None,
                 "fanout_deliveries_per_s": round(len(lat) / fan, 1) if fan else None,
                 "latency_ms": summarize(lat, 0.001), "cpu": cpu}
    return {"unicast": unicast, "broadcast": broadcast, "foreign": got["foreign"]}


def run_lastmile(fleet: Fleet, tansu: Tansu, workdir: Path, args: argparse.Namespace
                 ) -> dict[str, Any]:
    from confluent_kafka.admin import AdminClient, NewTopic

    from gateway.downlink.service import consumer_settings

    topic = f"fanout-{os.getpid()}-{int(time.time())}"
    admin = AdminClient({"bootstrap.servers": tansu.bootstrap})
    for fut in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        fut.result(30)
    rules = workdir / "rules"
    rules.mkdir()
    (rules / "60-fanout.yaml").write_text(
        "downlink:\n  - name: fanout\n"
        f"    kafka: {{topic: {topic}}}\n"
        '    mqtt: {topic: "cmd/{key}", qos: 1}\n')
    (workdir / "lastmile").mkdir()
    server = Lastmile(workdir / "lastmile")
    server.start(tansu.bootstrap, 1, {"rules": {"dir": str(rules), "watch": False},
                                      "limits": {"max_connections": args.subscribers + 100}})
    try:
        t0 = time.monotonic()
        connected = fleet.connect(server.port)
        connect_s = time.monotonic() - t0
        # The floor: a bare consumer, same settings, same topic, during the unicast phase.
        ctx = mp.get_context("spawn")
        mine, theirs = ctx.Pipe()
        floor = ctx.Process(target=_floor_main, daemon=True, args=(
            consumer_settings(tansu.bootstrap, {}, f"fanout-floor-{os.getpid()}"), topic,
            args.duration + 60, theirs))
        floor.start()
        if not mine.poll(60):
            raise RuntimeError("floor consumer did not start")
        mine.recv()
        time.sleep(1.0)  # its assignment resolves OFFSET_END before the first record
        sender = KafkaSender(tansu.bootstrap, topic)
        out = phases(fleet, sender, args, lambda i: f"{i}", "all", [server.pid, tansu.pid])
        mine.send("stop")
        lat = array("q")
        if mine.poll(30):
            lat.frombytes(mine.recv())
        floor.join(10)
        out["kafka_floor_latency_ms"] = summarize(lat, 0.001)
        out["connected"], out["connect_s"] = connected, round(connect_s, 2)
        out["server_alive"] = server.alive()
        fleet.disconnect()
    finally:
        server.stop()
    return out


def run_mosquitto(fleet: Fleet, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    (workdir / "mosquitto").mkdir()
    server = Mosquitto(workdir / "mosquitto")
    server.start()
    try:
        t0 = time.monotonic()
        connected = fleet.connect(server.port)
        connect_s = time.monotonic() - t0
        sender = MqttSender(server.port)
        out = phases(fleet, sender, args, lambda i: f"cmd/{i}", "cmd/all", [server.pid])
        sender.close()
        out["connected"], out["connect_s"] = connected, round(connect_s, 2)
        fleet.disconnect()
    finally:
        server.stop()
    return out


def verdict(res: dict[str, Any]) -> dict[str, Any]:
    lm, mq = res.get("lastmile"), res.get("mosquitto")
    out: dict[str, Any] = {}
    if lm:
        p99 = lm["unicast"]["latency_ms"]["p99"]
        floor = lm["kafka_floor_latency_ms"]["p99"]
        if p99 is not None and floor is not None:
            out["latency_p99_ms"] = p99
            out["latency_target_ms"] = round(floor + LATENCY_TARGET_MS, 3)
            out["latency_met"] = p99 <= floor + LATENCY_TARGET_MS
    if lm and mq:
        a, b = lm["broadcast"]["deliveries_per_s"], mq["broadcast"]["deliveries_per_s"]
        if a and b:
            out["throughput_ratio"] = round(a / b, 3)
            out["throughput_met"] = a >= THROUGHPUT_TARGET * b
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 subscribers, short phases")
    ap.add_argument("--subscribers", type=int, default=10_000)
    ap.add_argument("--procs", type=int, default=2, help="subscriber processes")
    ap.add_argument("--source-ips", type=int, default=40)
    ap.add_argument("--rate", type=float, default=1000.0, help="unicast messages/s")
    ap.add_argument("--duration", type=float, default=10.0, help="unicast seconds")
    ap.add_argument("--bursts", type=int, default=30, help="broadcast messages")
    ap.add_argument("--quiet", type=float, default=15.0,
                    help="give up waiting after this many seconds without a delivery")
    ap.add_argument("--skip-mosquitto", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.subscribers, args.rate, args.duration, args.bursts = 500, 200.0, 3.0, 5
    if args.subscribers < 1 or args.rate <= 0 or args.duration <= 0 or args.bursts < 1:
        ap.error("--subscribers, --rate, --duration and --bursts must be positive")
    if not 1 <= args.source_ips <= 250:
        ap.error("--source-ips must be 1..250")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()
    if nofile < args.subscribers + 500:
        print(f"fanout: open-file limit {nofile} < {args.subscribers + 500}", file=sys.stderr)
        return 2
    res: dict[str, Any] = {
        "scenario": {"subscribers": args.subscribers, "procs": args.procs,
                     "unicast_rate_per_s": args.rate, "unicast_seconds": args.duration,
                     "broadcast_messages": args.bursts, "payload_bytes": PAYLOAD,
                     "subscription_qos": 1, "quick": args.quick},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "loadavg_start": report.loadavg(),
        "lastmile_git": report.versions()["lastmile git"], "nofile": nofile,
        "cpus": os.cpu_count(),
        "mosquitto_version": mosquitto_version(),
    }
    t0 = time.monotonic()
    fleet = Fleet(args.subscribers, args.procs, args.source_ips)
    with tempfile.TemporaryDirectory(prefix="lm-fanout-") as tmp:
        work = Path(tmp)
        tansu = Tansu(work)
        tansu.start()
        try:
            res["lastmile"] = run_lastmile(fleet, tansu, work, args)
            if not args.skip_mosquitto and mosquitto_bin():
                res["mosquitto"] = run_mosquitto(fleet, work, args)
        finally:
            tansu.stop()
            fleet.stop()
    res["loadavg_end"] = report.loadavg()
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["targets"] = verdict(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    latest = RESULTS.parent / "latest.json"
    if latest.exists() and args.out.resolve() == RESULTS.resolve():
        (ROOT / "docs" / "benchmarks.md").write_text(
            report.markdown(json.loads(latest.read_text())))
    print(json.dumps(res["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
