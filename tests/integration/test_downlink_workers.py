"""Downlink sessions that follow a client to another worker (workers: 2, docs/downlink.md).

A persistent subscriber leaves worker A, records arrive, it comes back on worker B:
its subscriptions, its queue and its unacknowledged messages move with the MQTT
session handover.  The client's worker is chosen by its source port
(test_workers_sessions.port_for); raw-socket clients acknowledge only when told to.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from gateway.downlink.service import group_id
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.properties import Properties
from tests.helpers import Broker, GatewayProcess, child_pids, wait_until
from tests.integration.test_downlink import produce, topics, unique
from tests.integration.test_workers_sessions import LINGER_RST, port_for

pytestmark = pytest.mark.integration

__all__ = ["topics"]  # the fixture: its Kafka topics and downlink rules


class Client:
    """An MQTT client on a socket from a chosen local port (hence worker)."""

    def __init__(self, port: int, source_port: int, client_id: str, version: int) -> None:
        self.version = version
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.settimeout(30)
        self.sock.bind(("127.0.0.1", source_port))
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""
        self.packets: list[Any] = []
        props = Properties(session_expiry_interval=300) if version == 5 else None
        self.send(p.Connect(client_id=client_id, keep_alive=0, clean_start=False,
                            protocol_level=version, properties=props))
        ack = self.read(1)[0]
        assert isinstance(ack, p.Connack) and ack.reason_code == 0, ack

    def send(self, packet: Any) -> None:
        self.sock.sendall(encode(packet, self.version))

    def read(self, count: int) -> list[Any]:
        """The next ``count`` packets (those decoded past them wait for the next read)."""
        while len(self.packets) < count:
            packets, used = decode_packets(self.buf, self.version, 1 << 20)
            self.buf = self.buf[used:]
            self.packets += packets
            if len(self.packets) < count:
                data = self.sock.recv(65536)
                assert data, f"closed after {self.packets}"
                self.buf += data
        got, self.packets = self.packets[:count], self.packets[count:]
        return got

    def subscribe(self, topic_filter: str, identifier: int | None = None) -> None:
        props = Properties(subscription_identifiers=[identifier]) if identifier else None
        self.send(p.Subscribe(packet_id=1, subscriptions=[p.Subscription(topic_filter, 1)],
                              properties=props))
        assert self.read(1)[0].reason_codes == [1]

    def ack(self, messages: list[Any]) -> None:
        for message in messages:
            self.send(p.Puback(packet_id=message.packet_id))

    def leave(self) -> None:
        """A normal DISCONNECT: the session stays (clean session 0 / expiry 300 s).  The
        gateway's close is awaited: what was sent before (acks) is read by then (the RST
        of our close would discard it unread)."""
        with contextlib.suppress(OSError):
            self.send(p.Disconnect())
            while self.sock.recv(65536):
                pass
        self.sock.close()


def worker_ids(pids: list[int]) -> dict[int, int]:
    """pid -> the worker id it was started with (``--worker-id N``)."""
    out = {}
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().split(b"\0")
        out[pid] = int(args[args.index(b"--worker-id") + 1])
    return out


def start(proc: GatewayProcess, port: int) -> list[int]:
    proc.start(("127.0.0.1", port))
    assert proc.proc is not None
    supervisor = proc.proc.pid
    return list(wait_until(lambda: len(found := child_pids(supervisor)) == 2 and found,
                           what="two workers"))


@pytest.fixture
def gateway(gateway_factory: Any, topics: tuple[str, str]) -> Iterator[tuple[GatewayProcess,
                                                                            int]]:
    proc, ports = gateway_factory(workers=2)
    yield proc, ports["mqtt"]
    if proc.proc is not None and proc.proc.poll() is None:
        assert proc.stop() == 0, proc.log_text()[-3000:]


def by_key(messages: list[Any]) -> dict[str, list[bytes]]:
    """Payloads per MQTT topic (one key, one partition), in the order received."""
    out: dict[str, list[bytes]] = {}
    for message in messages:
        out.setdefault(message.topic, []).append(message.payload)
    return out


@pytest.mark.parametrize("version", [4, 5])
def test_queue_and_inflight_follow_the_client_to_another_worker(
        gateway: tuple[GatewayProcess, int], broker: Broker, topics: tuple[str, str],
        version: int) -> None:
    proc, port = gateway
    commands = topics[0]
    pids = start(proc, port)
    cid = unique(f"roam{version}")
    first = Client(port, port_for(port, pids[0], pids), cid, version)
    ident = 7 if version == 5 else None  # MQTT 5: the identifier moves with it
    first.subscribe("cmd/+", ident)
    produce(broker, commands, "dev-0", b"in-flight")
    inflight = first.read(1)[0]
    assert (inflight.payload, inflight.dup) == (b"in-flight", False)  # not acknowledged
    first.leave()
    keys = ["dev-0", "dev-1", "dev-2"]  # over both partitions
    for n in range(4):
        for key in keys:
            produce(broker, commands, key, f"{key}-{n}".encode())
    second = Client(port, port_for(port, pids[1], pids), cid, version)  # no SUBSCRIBE
    try:
        resent = second.read(1)[0]  # the unacknowledged one first, as it was
        assert (resent.topic, resent.payload, resent.dup, resent.packet_id) == (
            "cmd/dev-0", b"in-flight", True, inflight.packet_id)
        got = second.read(12)
        second.ack([resent, *got])
        assert by_key(got) == {f"cmd/{key}": [f"{key}-{n}".encode() for n in range(4)]
                               for key in keys}
        assert all(m.qos == 1 and not m.dup for m in got)
        if version == 5:
            assert {tuple(m.properties.subscription_identifiers) for m in got} == {(7,)}
        produce(broker, commands, "dev-1", b"later")  # consumed by worker B for it now
        later = second.read(1)[0]
        assert (later.topic, later.payload) == ("cmd/dev-1", b"later")
        second.ack([later])
    finally:
        second.sock.close()


def sessions_in(spool: Path, worker: int) -> dict[str, Any]:
    path = spool / f"downlink-sessions-w{worker}.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def committed(broker: Broker, group: str, topic: str) -> int:
    """The sum of ``group``'s committed offsets over ``topic``'s two partitions."""
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        parts = consumer.committed([TopicPartition(topic, n) for n in range(2)], timeout=10)
    finally:
        consumer.close()
    return sum(tp.offset for tp in parts if tp.offset >= 0)


def test_restart_after_handover_neither_loses_nor_repeats(
        gateway: tuple[GatewayProcess, int], broker: Broker, topics: tuple[str, str],
        tmp_path: Path) -> None:
    """Taken over by B, two of four acknowledged, two more written while away; after a
    restart the client lands on A again and gets exactly the two unacknowledged and the
    two new ones: B held back (committed below its earlier commit) what it took over, A
    no longer holds it, B's state file has the session and A takes it from B."""
    proc, port = gateway
    commands, spool = topics[0], tmp_path / "spool"
    pids = start(proc, port)
    workers = worker_ids(pids)
    cid = unique("roam")
    first = Client(port, port_for(port, pids[0], pids), cid, 4)
    first.subscribe("cmd/dev-r")
    first.leave()
    for n in range(4):
        produce(broker, commands, "dev-r", f"a{n}".encode())
    # B has no subscriber for them: it commits past the four.  What it takes over below
    # that must pull its committed offset back down (Kafka takes a lower commit).
    wait_until(lambda: committed(broker, group_id(workers[pids[1]]), commands) == 4,
               what="B's commit past the four records")
    second = Client(port, port_for(port, pids[1], pids), cid, 4)
    got = second.read(4)
    assert [m.payload for m in got] == [b"a0", b"a1", b"a2", b"a3"]
    second.ack(got[:2])
    second.leave()
    for n in range(2):
        produce(broker, commands, "dev-r", f"b{n}".encode())
    # The session is B's, in B's state file only.
    a_id, b_id = workers[pids[0]], workers[pids[1]]
    wait_until(lambda: cid in sessions_in(spool, b_id) and cid not in sessions_in(spool, a_id),
               what="the session in B's state file")
    assert proc.stop() == 0
    assert cid in sessions_in(spool, b_id) and cid not in sessions_in(spool, a_id)
    pids = start(proc, port)
    a = next(pid for pid, w in worker_ids(pids).items() if w == a_id)
    back = Client(port, port_for(port, a, pids), cid, 4)  # lands where the file is not
    try:
        again = back.read(4)
        assert [m.payload for m in again] == [b"a2", b"a3", b"b0", b"b1"]
        back.ack(again)
    finally:
        back.sock.close()


@pytest.mark.parametrize("version", [4, 5])
def test_paho_subscriber_roams_between_workers(
        gateway: tuple[GatewayProcess, int], broker: Broker, topics: tuple[str, str],
        version: int) -> None:
    """The same with paho: subscribe on A, away, reconnect on B (its source port)."""
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties

    proc, port = gateway
    pids = start(proc, port)
    cid = unique(f"paho{version}")
    received: queue.Queue[Any] = queue.Queue()

    def connect(worker: int) -> Any:
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid,
                             protocol=protocol,
                             **({} if version == 5 else {"clean_session": False}))
        client.on_message = lambda _c, _u, msg: received.put(msg)
        acked: queue.Queue[bool] = queue.Queue()
        client.on_connect = lambda *_a: acked.put(True)
        kwargs: dict[str, Any] = {"bind_port": port_for(port, pids[worker], pids)}
        if version == 5:
            props = PahoProperties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
            kwargs.update(clean_start=False, properties=props)
        client.connect("127.0.0.1", port, **kwargs)
        client.loop_start()
        acked.get(timeout=20)
        return client

    first = connect(0)
    subscribed: queue.Queue[bool] = queue.Queue()
    first.on_subscribe = lambda *_a: subscribed.put(True)
    first.subscribe("cmd/+", 1)
    subscribed.get(timeout=20)
    first.disconnect()
    first.loop_stop()
    keys = ["dev-0", "dev-1", "dev-2"]
    for n in range(3):
        for key in keys:
            produce(broker, topics[0], key, f"{key}-{n}".encode())
    second = connect(1)
    try:
        got = [received.get(timeout=30) for _ in range(9)]
        assert by_key(got) == {f"cmd/{key}": [f"{key}-{n}".encode() for n in range(3)]
                               for key in keys}
    finally:
        second.disconnect()
        second.loop_stop()
