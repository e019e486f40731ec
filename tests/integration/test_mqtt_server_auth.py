"""MqttServer's side of authentication, in-process on loopback with an in-test Authenticator.

What the end-to-end tests cannot pin down without timing: the quick path makes no
task, the slow path holds the pipelined bytes across a real await, a connection
that goes away mid-verify leaves nothing behind, refusal logging is bounded, and
an expiring identity is ended by the sweep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.auth import AuthRefusal, Credentials, Identity
from gateway.model import Outcome
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.events import MqttLimits
from gateway.protocols.mqtt.properties import Properties
from gateway.sources.mqtt_server import AUTH_HOLD_BYTES, MqttServer
from tests.integration.test_mqtt_server import Client, FakePipeline, until
from tests.integration.test_mqtt_v311_failures import Log

pytestmark = pytest.mark.integration
ALICE = Identity(method="jwt", name="alice", claims={"tenant": "t1"})
BAD = AuthRefusal(reason="bad_credentials", message="wrong password")


class FakeAuth:
    """Passwords "quick" answer at once; anything else waits for ``release`` in verify."""

    def __init__(self) -> None:
        self.verdict: Identity | AuthRefusal = ALICE
        self.released = asyncio.Event()
        self.asked: list[Credentials] = []
        self.delays: list[str] = []
        self.cancelled = 0
        self.explode = False

    def quick(self, creds: Credentials) -> Identity | AuthRefusal | None:
        self.asked.append(creds)
        return self.verdict if creds.password == b"quick" else None

    def delay_for(self, peer_host: str) -> float:
        self.delays.append(peer_host)
        return 0.0

    async def verify(self, creds: Credentials) -> Identity | AuthRefusal:
        try:
            await self.released.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.explode:
            raise RuntimeError("bug in the authenticator")
        return self.verdict


class InfoLog(Log):
    """Debug off, as in production: what remains is what an operator reads."""

    def is_enabled_for(self, level: int) -> bool:
        return level >= logging.INFO


@pytest.fixture
async def server() -> AsyncIterator[tuple[MqttServer, FakePipeline, FakeAuth, Log]]:
    pipeline, auth, log = FakePipeline(), FakeAuth(), InfoLog()
    srv = MqttServer(pipeline, MqttLimits(), log, sweep_interval=3600, auth=auth,
                     refusal_log_interval=60.0)
    await srv.start("127.0.0.1", 0)
    yield srv, pipeline, auth, log
    await srv.close(0.1)


async def open_client(srv: MqttServer, version: int = 5) -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.ports[0])
    return Client(reader, writer, version)


def connect(client: Client, password: bytes, client_id: str = "dev-1") -> None:
    client.send(p.Connect(protocol_level=client.version, client_id=client_id, username="mallory",
                          password=password,
                          properties=Properties() if client.version == 5 else None))


def publish(client: Client, pid: int) -> None:
    client.send(p.Publish(topic="a/b", payload=b"x", qos=1, packet_id=pid,
                          properties=Properties() if client.version == 5 else None))


async def test_quick_verdict_needs_no_task_and_the_identity_rides_on_messages(
        server: Any) -> None:
    srv, pipeline, auth, _ = server
    client = await open_client(srv)
    connect(client, b"quick")
    publish(client, 1)
    connack = await client.recv()
    assert isinstance(connack, p.Connack) and connack.reason_code == 0
    assert srv.auth_tasks == {} and auth.delays == []  # no task, no throttle on this path
    await until(lambda: len(pipeline.received) == 1)
    message = pipeline.received[0][0]
    assert (message.username, message.claims) == ("alice", {"tenant": "t1"})
    (creds,) = auth.asked
    assert (creds.username, creds.password, creds.peer_host) == ("mallory", b"quick",
                                                                 "127.0.0.1")


async def test_slow_verdict_holds_what_was_pipelined_until_it_comes(server: Any) -> None:
    srv, pipeline, auth, _ = server
    client = await open_client(srv)
    connect(client, b"slow")
    publish(client, 1)
    publish(client, 2)
    await until(lambda: len(srv.auth_tasks) == 1)
    assert auth.delays == ["127.0.0.1"]  # the throttle was asked first
    assert pipeline.received == []
    auth.released.set()
    connack = await client.recv()
    assert isinstance(connack, p.Connack) and connack.reason_code == 0
    await until(lambda: len(pipeline.received) == 2)
    assert srv.auth_tasks == {}
    for _, on_done in pipeline.received:
        on_done(Outcome(ok=True))
    acks = [await client.recv(), await client.recv()]
    assert [a.packet_id for a in acks if isinstance(a, p.Puback)] == [1, 2]


async def test_a_flood_behind_a_waiting_connect_stops_being_read(server: Any) -> None:
    srv, pipeline, auth, _ = server
    client = await open_client(srv)
    connect(client, b"slow")
    count = AUTH_HOLD_BYTES // 1000 + 10
    for _ in range(count):
        client.send(p.Publish(topic="a/b", payload=b"x" * 1000, qos=0,
                              properties=Properties()))
    await until(lambda: len(srv.auth_tasks) == 1)
    (conn,) = srv.connections
    await until(lambda: not conn._reading)  # held at the bound, nothing parsed
    assert AUTH_HOLD_BYTES <= conn.session.buffered < AUTH_HOLD_BYTES + 300_000
    assert pipeline.received == []
    auth.released.set()
    await until(lambda: len(pipeline.received) == count)  # then every one
    for _, on_done in pipeline.received:
        on_done(Outcome(ok=True))
    await until(lambda: conn._reading)  # and reading again (the in-flight bound was hit)


async def test_a_client_gone_mid_verify_leaves_nothing(server: Any) -> None:
    srv, pipeline, auth, _ = server
    client = await open_client(srv)
    connect(client, b"slow")
    publish(client, 1)
    await until(lambda: len(srv.auth_tasks) == 1)
    client.writer.close()
    await until(lambda: not srv.connections and not srv.auth_tasks)
    await until(lambda: auth.cancelled == 1)  # the verify was cancelled, not left running
    auth.released.set()
    await asyncio.sleep(0)
    assert pipeline.received == [] and srv.registry == {}


async def test_refusal_answers_and_logs_once_per_address(server: Any) -> None:
    srv, pipeline, auth, log = server
    auth.verdict = BAD
    for n in range(5):
        client = await open_client(srv, 4)
        connect(client, b"quick", client_id=f"guess-{n}")
        publish(client, 1)
        connack = await client.recv()
        assert isinstance(connack, p.Connack) and connack.reason_code == 0x04
        assert await client.recv() is None  # closed
    assert pipeline.received == []
    (line,) = log.events("mqtt_auth_refused")
    assert line["reason"] == "bad_credentials" and line["username"] == "mallory"
    assert line["client_id"] == "guess-0" and "password" not in line
    assert log.events("mqtt_disconnected") == []  # not one more line per refusal
    # After the interval the sweep says how many went unlogged, and forgets the address.
    srv.sweep(asyncio.get_running_loop().time() + 61)
    (summary,) = log.events("mqtt_auth_refused_unlogged")
    assert summary == {"peer_host": "127.0.0.1", "count": 4, "seconds": 60.0}
    client = await open_client(srv, 5)
    connect(client, b"quick")
    connack = await client.recv()
    assert isinstance(connack, p.Connack) and connack.reason_code == 0x86
    assert len(log.events("mqtt_auth_refused")) == 2


async def test_an_expiring_identity_is_ended_by_the_sweep(server: Any) -> None:
    srv, _, auth, _ = server
    auth.verdict = Identity(method="jwt", name="alice", expires_at=time.time() + 100)
    client = await open_client(srv)
    connect(client, b"quick")
    assert isinstance(await client.recv(), p.Connack)
    loop = asyncio.get_running_loop()
    srv.sweep(loop.time() + 90)
    srv.sweep(loop.time() + 110)
    disconnect = await client.recv()
    assert isinstance(disconnect, p.Disconnect) and disconnect.reason_code == 0x87
    assert disconnect.properties is not None
    assert disconnect.properties.reason_string == "token expired"


async def test_an_authenticator_bug_costs_one_connection(server: Any) -> None:
    srv, _, auth, log = server
    auth.explode = True
    client = await open_client(srv)
    connect(client, b"slow")
    await until(lambda: len(srv.auth_tasks) == 1)
    auth.released.set()
    assert await client.recv() is None  # closed, no CONNACK
    await until(lambda: not srv.connections and not srv.auth_tasks)
    assert [e["where"] for e in log.events("mqtt_connection_error")] == ["authenticate"]


async def test_shutdown_cancels_pending_verdicts(server: Any) -> None:
    srv, _, auth, _ = server
    client = await open_client(srv)
    connect(client, b"slow")
    await until(lambda: len(srv.auth_tasks) == 1)
    await srv.close(0.1)
    assert srv.auth_tasks == {}
    await until(lambda: auth.cancelled == 1)
    assert await client.recv() is None

