"""Retained sessions are bounded (issue 13, "Sessions"): limits.max_sessions and
limits.max_client_id_bytes on real sockets, while a well-behaved QoS 1 publisher loses nothing.

Memory is checked by counting the gateway's own structures (in-process: the store's dicts
and heaps; `lastmile serve`: its /metrics gauge and the registry's SQLite rows), not RSS.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from gateway.model import Message, Outcome
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt import store as store_module
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.events import MqttLimits
from gateway.sources.mqtt_registry_db import DB_NAME, ENV
from tests.helpers import Broker, child_pids, log_events, wait_until

pytestmark = pytest.mark.integration

RULES = """
rules:
  - {name: sessbound, match: "sessbound/{run}/#", kafka: {topic: "sessbound.{run}"}}
"""
V4_CONNACK = {b"\x20\x02\x00\x00": False, b"\x20\x02\x01\x00": True}  # -> session present


def churn_cycle(port: int, client_id: str) -> bool:
    """A 3.1.1 CONNECT with clean session 0, DISCONNECT, close; returns session present."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(encode(p.Connect(protocol_level=4, client_id=client_id, clean_start=False,
                                      keep_alive=60), 4))
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            assert chunk, f"closed before CONNACK: {reply!r}"
            reply += chunk
        assert reply in V4_CONNACK, reply
        sock.sendall(encode(p.Disconnect(), 4))
        return V4_CONNACK[reply]


# --- in-process MqttServer: the store's own structures --------------------------------------


class Flow:
    paused = False

    def subscribe(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        return lambda: None


class AckingPipeline:
    """Every message is safe at once (the pipeline's verdict is not what is tested here)."""

    def __init__(self) -> None:
        self.flow = Flow()
        self.messages: list[Message] = []

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        self.messages.append(message)
        asyncio.get_running_loop().call_soon(on_done, Outcome(ok=True))


async def test_churn_of_new_client_ids_keeps_the_store_at_max_sessions() -> None:
    from gateway.sources.mqtt_server import MqttServer

    pipeline = AckingPipeline()
    srv = MqttServer(pipeline, MqttLimits(max_sessions=50), sweep_interval=0.05)
    await srv.start("127.0.0.1", 0)
    port = srv.ports[0]
    loop = asyncio.get_running_loop()
    try:
        good_r, good_w = await asyncio.open_connection("127.0.0.1", port)
        good_w.write(encode(p.Connect(protocol_level=4, client_id="good", keep_alive=60), 4))
        assert await good_r.readexactly(4) == b"\x20\x02\x00\x00"
        acked: list[int] = []
        for i in range(300):
            await loop.run_in_executor(None, churn_cycle, port, f"churn-{i}")
            good_w.write(encode(p.Publish(topic="t/good", payload=b"%d" % i, qos=1,
                                          packet_id=i % 65535 + 1), 4))
            packets, _ = decode_packets(await good_r.readexactly(4), 4, 1 << 20)
            acked += [pk.packet_id for pk in packets if isinstance(pk, p.Puback)]
        assert acked == [i % 65535 + 1 for i in range(300)]  # the good publisher: all acked
        assert [m.payload for m in pipeline.messages] == [b"%d" % i for i in range(300)]
        store = srv.store

        deadline = loop.time() + 30
        while len(srv.connections) > 1:  # every churn connection's end has been handled
            assert loop.time() < deadline, len(srv.connections)
            await asyncio.sleep(0.01)
        # The store holds 50 disconnected sessions plus the live one, nothing more.
        assert len(store) == 51
        assert (store.retained, store.evicted) == (50, 250)
        assert len(store._states) == 1  # only the live connection has a ClientState
        heap_bound = 2 * 50 + store_module._SLACK
        assert len(store._empty_heap) <= heap_bound and len(store._kept_heap) == 0
        # What the clients see: an evicted session is gone, a kept one is present.
        assert not await loop.run_in_executor(None, churn_cycle, port, "churn-0")
        assert await loop.run_in_executor(None, churn_cycle, port, "churn-299")
        good_w.close()
    finally:
        await srv.close(0.1)


# --- `lastmile serve` with tansu --------------------------------------------------------------


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


class GoodPublisher:
    """A paho QoS 1 publisher on its own connection: every message it got a PUBACK for must
    be in Kafka."""

    def __init__(self, port: int, run: str) -> None:
        self.run = run
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"good-{run}",
                                  protocol=paho.MQTTv311)
        self.infos: list[Any] = []
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        wait_until(self.client.is_connected, 30, what="the good publisher's CONNACK")

    def publish(self, n: int) -> None:
        self.infos.append(self.client.publish(f"sessbound/{self.run}/good", b"good-%d" % n,
                                              qos=1))

    def finish(self, broker: Broker) -> None:
        for info in self.infos:
            info.wait_for_publish(30)
        acked = {b"good-%d" % n for n, info in enumerate(self.infos) if info.is_published()}
        assert len(acked) == len(self.infos)
        self.client.disconnect()
        self.client.loop_stop()
        got = [m.value() for m in broker.read(f"sessbound.{self.run}", len(acked), timeout=60)]
        assert set(got) >= acked  # every PUBACKed message is in Kafka


def test_serve_keeps_max_sessions_and_loses_nothing(gateway_factory: Any, rules_dir: Path,
                                                    broker: Broker) -> None:
    (rules_dir / "05-sessbound.yaml").write_text(RULES)
    gw, ports = gateway_factory(limits__max_sessions=50, log__level="debug")
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    run = uuid.uuid4().hex[:8]
    good = GoodPublisher(ports["mqtt"], run)
    for i in range(300):
        churn_cycle(ports["mqtt"], f"churn-{run}-{i}")
        good.publish(i)
    good.finish(broker)
    wait_until(lambda: metric(ports["metrics"], 'lastmile_mqtt_sessions_total{event="evicted"}')
               == 250, 30, what="250 evictions counted")
    assert metric(ports["metrics"], "lastmile_mqtt_sessions_retained") == 50
    assert not churn_cycle(ports["mqtt"], f"churn-{run}-0")  # evicted: session present 0
    assert churn_cycle(ports["mqtt"], f"churn-{run}-299")  # kept: session present 1
    evictions = log_events(gw.log_text(), "mqtt_session_evicted")
    assert len(evictions) >= 250 and evictions[0]["client_id"] == f"churn-{run}-0"


def test_serve_refuses_a_client_id_over_max_client_id_bytes(gateway_factory: Any,
                                                            rules_dir: Path,
                                                            broker: Broker) -> None:
    (rules_dir / "05-sessbound.yaml").write_text(RULES)
    gw, ports = gateway_factory(limits__max_client_id_bytes=64)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    run = uuid.uuid4().hex[:8]
    good = GoodPublisher(ports["mqtt"], run)
    answers: list[Any] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="x" * 65,
                         protocol=paho.MQTTv5)
    client.on_connect = lambda c, u, f, rc, props: answers.append(rc)
    client.connect("127.0.0.1", ports["mqtt"], keepalive=60)
    client.loop_start()
    try:
        for n in range(20):
            good.publish(n)
        wait_until(lambda: answers, 30, what="the MQTT 5 CONNACK")
    finally:
        client.loop_stop()  # (paho would retry)
    assert answers[0].value == 0x85  # Client Identifier not valid
    # 3.1.1 has no reason codes: return code 2, identifier rejected.
    with socket.create_connection(("127.0.0.1", ports["mqtt"]), timeout=10) as sock:
        sock.sendall(encode(p.Connect(protocol_level=4, client_id="é" * 33, keep_alive=60), 4))
        assert sock.recv(16) == b"\x20\x02\x00\x02"  # 66 bytes in UTF-8
        for n in range(20, 40):
            good.publish(n)
        assert sock.recv(16) == b""  # and closed
    # 64 bytes is still fine.
    ok = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="y" * 64,
                     protocol=paho.MQTTv311)
    ok.connect("127.0.0.1", ports["mqtt"], keepalive=60)
    ok.loop_start()
    wait_until(ok.is_connected, 30, what="a 64-byte client id connected")
    ok.disconnect()
    ok.loop_stop()
    good.finish(broker)
    wait_until(lambda: (metric(ports["metrics"], 'lastmile_mqtt_sessions_total'
                               '{event="refused_client_id"}') or 0) >= 2,
               30, what="the refused client ids counted")


def registry_rows(pids: list[int]) -> int:
    """Rows of the workers' shared session registry (its directory from a worker's env)."""
    with open(f"/proc/{pids[0]}/environ", "rb") as fh:
        env = dict(e.split(b"=", 1) for e in fh.read().split(b"\0") if b"=" in e)
    path = Path(os.fsdecode(env[ENV.encode()])) / DB_NAME
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM clients").fetchone()[0])
    finally:
        db.close()


def test_serve_workers_keep_the_shared_registry_bounded(gateway_factory: Any, rules_dir: Path,
                                                        broker: Broker) -> None:
    (rules_dir / "05-sessbound.yaml").write_text(RULES)
    gw, ports = gateway_factory(workers=2, limits__max_sessions=20)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    assert gw.proc is not None
    proc = gw.proc
    pids = wait_until(lambda: (c := child_pids(proc.pid)) and len(c) == 2 and c, 30,
                      what="two workers")
    run = uuid.uuid4().hex[:8]
    good = GoodPublisher(ports["mqtt"], run)
    for i in range(200):
        churn_cycle(ports["mqtt"], f"w-{run}-{i}")
        good.publish(i)
    good.finish(broker)

    def retained() -> float | None:
        return metric(ports["metrics"], "lastmile_mqtt_sessions_retained")

    # Each worker keeps at most 20 (the kernel spreads the 200 ids over both workers).
    wait_until(lambda: registry_rows(pids) <= 2 * 20 + 1, 30, what="the registry at its bound")
    assert registry_rows(pids) >= 20  # the bound, not an empty store
    wait_until(lambda: (r := retained()) is not None and 20 <= r <= 40, 30,
               what="retained sessions counted over the workers")
