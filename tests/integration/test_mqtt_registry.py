"""The shared session registry with two in-process "workers" (two MqttServers, one store).

Each server listens on its own port, so the test chooses the worker; the store and
the datagram sockets are the real ones.  The supervisor-level tests with paho are in
test_workers_sessions.py; these reach the cases a real process tree makes hard to
time: a stuck old owner, a verdict holder that dies after the handover.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.model import Outcome
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.events import MqttLimits
from gateway.protocols.mqtt.properties import Properties
from gateway.sources import mqtt_registry, mqtt_registry_db
from gateway.sources.mqtt_server import MqttServer
from tests.integration.test_mqtt_server import Client, FakePipeline

pytestmark = pytest.mark.integration
LIMITS = MqttLimits(receive_maximum=16)



async def anonymous_worker_0(tmp_path: Path) -> tuple[Any, MqttServer, float]:
    """Worker 0 of a fresh registry: its shared sessions, a started server allowing
    anonymous clients, and the loop's time at the start."""
    from gateway.auth.check import Authenticator
    from gateway.config.schema import Auth

    mqtt_registry_db.create(tmp_path)
    now = asyncio.get_running_loop().time()
    shared = mqtt_registry.SharedSessions(str(tmp_path), 0, LIMITS, now)
    srv = MqttServer(FakePipeline(), LIMITS, sweep_interval=0.1, shared=shared,
                     auth=Authenticator(Auth(allow_anonymous=True)))
    await srv.start("127.0.0.1", 0)
    return shared, srv, now

@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[list[tuple[MqttServer, FakePipeline]]]:
    mqtt_registry_db.create(tmp_path)
    out = []
    for worker in (0, 1):
        pipeline = FakePipeline()
        shared = mqtt_registry.SharedSessions(str(tmp_path), worker, LIMITS,
                                              asyncio.get_running_loop().time())
        srv = MqttServer(pipeline, LIMITS, sweep_interval=0.1, shared=shared)
        await srv.start("127.0.0.1", 0)
        out.append((srv, pipeline))
    yield out
    for srv, _ in out:
        await srv.close(0.1)


async def connect(srv: MqttServer, client_id: str, present: bool | None = None) -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.ports[0])
    client = Client(reader, writer, 5)
    client.send(p.Connect(protocol_level=5, client_id=client_id, clean_start=False,
                          properties=Properties(session_expiry_interval=300)))
    connack = await client.recv(10)
    assert isinstance(connack, p.Connack) and connack.reason_code == 0
    if present is not None:
        assert connack.session_present is present
    return client


def qos2(client: Client, pid: int, dup: bool = False) -> None:
    client.send(p.Publish(topic="t", payload=b"x", qos=2, packet_id=pid, dup=dup,
                          properties=Properties()))


async def received(pipeline: FakePipeline, count: int) -> None:
    for _ in range(200):
        if len(pipeline.received) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(pipeline.received)} messages, expected {count}")


async def test_safe_and_pending_ids_move_with_the_client(workers: Any) -> None:
    (a, pipe_a), (b, pipe_b) = workers
    old = await connect(a, "mover", present=False)
    qos2(old, 1)
    qos2(old, 2)
    await received(pipe_a, 2)
    pipe_a.received[0][1](Outcome(ok=True))
    assert await old.recv() == p.Pubrec(packet_id=1)

    new = await connect(b, "mover", present=True)
    got = await old.recv()
    assert isinstance(got, p.Disconnect) and got.reason_code == 0x8E
    qos2(new, 1, dup=True)
    assert await new.recv() == p.Pubrec(packet_id=1)  # safe at worker 0: not produced again
    qos2(new, 2, dup=True)
    assert await new.recv(0.3) is None  # its verdict is still due at worker 0
    pipe_a.received[1][1](Outcome(ok=True))
    assert await new.recv() == p.Pubrec(packet_id=2)
    new.send(p.Pubrel(packet_id=1))
    assert await new.recv() == p.Pubcomp(packet_id=1)
    assert pipe_b.received == []


async def test_a_stuck_owner_is_given_up_and_its_late_answer_ignored(
    workers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a, pipe_a), (b, _) = workers
    monkeypatch.setattr(mqtt_registry, "HANDOVER_TIMEOUT_S", 0.3)
    old = await connect(a, "stuck")
    qos2(old, 7)
    await received(pipe_a, 1)
    pipe_a.received[0][1](Outcome(ok=True))
    assert await old.recv() == p.Pubrec(packet_id=7)
    loop = asyncio.get_running_loop()
    shared_a = a.shared
    assert shared_a is not None
    loop.remove_reader(shared_a.mailbox.sock.fileno())  # worker 0 stops answering

    await connect(b, "stuck", present=True)  # after the timeout
    loop.add_reader(shared_a.mailbox.sock.fileno(), shared_a.mailbox._readable)
    got = await old.recv()  # it reads the take at last and ends its connection
    assert isinstance(got, p.Disconnect) and got.reason_code == 0x8E
    rows = shared_a.db.db.execute("SELECT count(*) FROM qos2").fetchone()[0]
    assert rows == 0  # its answer came for an old claim: not written


async def test_a_verdict_lost_with_its_worker_lets_the_message_be_sent_again(
    workers: Any, tmp_path: Path
) -> None:
    (a, pipe_a), (b, pipe_b) = workers
    old = await connect(a, "orphan")
    qos2(old, 3)
    qos2(old, 4)
    await received(pipe_a, 2)
    new = await connect(b, "orphan", present=True)
    qos2(new, 3, dup=True)  # waits for worker 0's verdict
    shared_b = b.shared
    assert shared_b is not None
    for _ in range(200):  # until the retransmission has joined the id taken over
        token = shared_b._awaiting["orphan"][3]
        if token.session is not shared_b._limbo:
            break
        await asyncio.sleep(0.01)
    mqtt_registry_db.forget_worker(tmp_path, 0)  # worker 0 dies with both verdicts

    got = await new.recv()  # the client waiting on id 3 is told to send it again
    assert isinstance(got, p.Disconnect) and got.reason_code == 0x80
    again = await connect(b, "orphan", present=True)
    qos2(again, 3, dup=True)
    qos2(again, 4, dup=True)
    await received(pipe_b, 2)  # both produced again: at least once
    assert len(pipe_b.received) == 2


async def test_ids_handed_over_after_the_new_connection_dropped_are_kept(workers: Any) -> None:
    """Issue 13: a released session with nothing of its own is kept as an id and an expiry
    only; one still waiting for the old owner's ids must keep its state to receive them."""
    (a, pipe_a), (b, pipe_b) = workers
    old = await connect(a, "dropped")
    qos2(old, 3)
    await received(pipe_a, 1)
    pipe_a.received[0][1](Outcome(ok=True))
    assert await old.recv() == p.Pubrec(packet_id=3)
    loop = asyncio.get_running_loop()
    shared_a, shared_b = a.shared, b.shared
    assert shared_a is not None and shared_b is not None
    loop.remove_reader(shared_a.mailbox.sock.fileno())  # worker 0 answers late
    reader, writer = await asyncio.open_connection("127.0.0.1", b.ports[0])
    held = Client(reader, writer, 5)
    held.send(p.Connect(protocol_level=5, client_id="dropped", clean_start=False,
                        properties=Properties(session_expiry_interval=300)))
    for _ in range(500):
        if "dropped" in shared_b._handovers:
            break
        await asyncio.sleep(0.01)
    for _ in range(500):
        if b.connections:
            break
        await asyncio.sleep(0.01)
    # The connection ends before its CONNACK (a held connection does not read, so the
    # transport's end stands in for a reset noticed by the kernel).
    next(iter(b.connections)).abort()
    writer.close()
    for _ in range(500):
        if not b.connections:
            break
        await asyncio.sleep(0.01)
    assert not b.connections and "dropped" in shared_b._handovers
    loop.add_reader(shared_a.mailbox.sock.fileno(), shared_a.mailbox._readable)
    for _ in range(500):
        if "dropped" not in shared_b._handovers:
            break
        await asyncio.sleep(0.01)
    new = await connect(b, "dropped", present=True)
    qos2(new, 3, dup=True)
    assert await new.recv() == p.Pubrec(packet_id=3)  # safe at worker 0: not produced again
    assert pipe_b.received == []


async def test_a_cut_writes_its_releases_in_one_transaction(workers: Any) -> None:
    """Issue 14: a cell going away ends many connections in one turn of the loop; their
    registry releases are one transaction (not one each, which blocked the loop for
    ~0.3 ms per client with two workers contending), and they still say what they must:
    the other worker sees the sessions as kept (session present on a reconnect there)."""
    (a, _), (b, _) = workers
    clients = [await connect(a, f"cut-{i}", present=False) for i in range(30)]
    writes: list[int] = []
    db = a.store.db  # type: ignore[attr-defined]
    release_many, release = db.release_many, db.release

    def counted_many(batch: list[Any]) -> None:
        writes.append(len(batch))
        release_many(batch)

    def counted_one(*args: Any) -> None:
        writes.append(1)
        release(*args)

    db.release_many, db.release = counted_many, counted_one
    for conn in list(a.connections):  # every connection reset in one turn
        conn.abort()
    for _ in range(200):
        if sum(writes) >= 30:
            break
        await asyncio.sleep(0.01)
    assert writes == [30]
    again = await connect(b, "cut-7", present=True)  # the kept session, via the handover
    again.writer.close()
    for client in clients:
        client.writer.close()


async def test_a_turns_connects_claim_their_ids_in_one_transaction(tmp_path: Path) -> None:
    """Issue 15: with the worker's Authenticator (as `lastmile serve` runs), the CONNECTs
    read in one turn of the loop claim their client ids in one registry transaction (one
    write lock, not one per CONNECT, which 4 workers on 2 cores contended for), and each
    still gets what its own claim says: a fresh id session present 0, an id another
    worker keeps a handover and session present 1."""
    from gateway.auth.check import Authenticator
    from gateway.config.schema import Auth

    mqtt_registry_db.create(tmp_path)
    now = asyncio.get_running_loop().time()
    servers = []
    for worker in (0, 1):
        shared = mqtt_registry.SharedSessions(str(tmp_path), worker, LIMITS, now)
        srv = MqttServer(FakePipeline(), LIMITS, sweep_interval=0.1, shared=shared,
                         auth=Authenticator(Auth(allow_anonymous=True)))
        await srv.start("127.0.0.1", 0)
        servers.append(srv)
    a, b = servers
    try:
        kept = await connect(b, "burst-0", present=False)
        kept.writer.close()  # worker 1 keeps its session (expiry 300 s)
        for _ in range(200):
            if not b.registry:
                break
            await asyncio.sleep(0.01)
        statements: list[str] = []
        a.store.db.db.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        clients = []
        for _ in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", a.ports[0])
            clients.append(Client(reader, writer, 5))
        for _ in range(200):
            if len(a.connections) == 30:
                break
            await asyncio.sleep(0.01)
        for i, client in enumerate(clients):  # all 30 CONNECTs readable in one poll
            client.send(p.Connect(protocol_level=5, client_id=f"burst-{i}", clean_start=False,
                                  properties=Properties(session_expiry_interval=300)))
        for i, client in enumerate(clients):
            connack = await client.recv(10)
            assert isinstance(connack, p.Connack) and connack.reason_code == 0
            assert connack.session_present is (i == 0)  # burst-0 came from worker 1
        a.store.db.db.set_trace_callback(None)  # type: ignore[attr-defined]
        claims = [q for q in statements if q.startswith("INSERT OR REPLACE INTO clients")]
        assert len(claims) == 30
        # One transaction for the 30 claims, two for burst-0's handover (its ids and its
        # stamp counter), maybe one of the sweep's: not one or two per CONNECT.
        assert statements.count("BEGIN IMMEDIATE") <= 5, statements.count("BEGIN IMMEDIATE")
        for client in clients:
            client.writer.close()
    finally:
        for srv in servers:
            await srv.close(0.1)


async def test_connects_wait_for_a_busy_registry_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    """While another worker holds the registry's write lock, the CONNECTs a worker has
    admitted wait (no CONNACK) and its loop keeps running (it does not sleep in the
    lock's retry loop); once the lock is free they are claimed together, in one
    transaction, and answered."""

    shared, srv, now = await anonymous_worker_0(tmp_path)
    other = mqtt_registry_db.RegistryDb(tmp_path, 1, now)  # the other worker
    try:
        statements: list[str] = []
        shared.db.db.set_trace_callback(statements.append)
        other.db.execute("BEGIN IMMEDIATE")  # it writes, and keeps the lock
        clients = []
        for i in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.ports[0])
            client = Client(reader, writer, 5)
            client.send(p.Connect(protocol_level=5, client_id=f"busy-{i}"))
            clients.append(client)
        for _ in range(500):  # this coroutine runs, on the same loop, while they wait
            if srv._admit_retries >= 3 and len(srv._admitted) == 10:
                break
            await asyncio.sleep(0.002)
        assert srv._admit_retries >= 3 and len(srv._admitted) == 10, (
            srv._admit_retries, len(srv._admitted))
        other.db.execute("COMMIT")
        for client in clients:
            connack = await client.recv(10)
            assert isinstance(connack, p.Connack) and connack.reason_code == 0
        shared.db.db.set_trace_callback(None)
        assert len([q for q in statements if q.startswith("INSERT OR REPLACE INTO clients")]) == 10
        assert statements.count("COMMIT") == 1
        for client in clients:
            client.writer.close()
    finally:
        other.close()
        await srv.close(0.1)


async def test_connects_in_quick_succession_share_one_claim_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15: claim transactions are at least ADMIT_COALESCE_S apart per worker, so
    CONNECTs read in separate turns soon after a claim wait for the next transaction
    and share it (each costs about the same for 1 id or 8); a lone CONNECT is claimed
    in a transaction of its own.  (A window of 2 s here, so the box's speed does not
    decide which CONNECTs fall into it.)"""
    from gateway.sources import mqtt_server

    monkeypatch.setattr(mqtt_server, "ADMIT_COALESCE_S", 2.0)
    shared, srv, _now = await anonymous_worker_0(tmp_path)
    statements: list[str] = []
    try:
        shared.db.db.set_trace_callback(statements.append)
        first = await connect(srv, "lone", present=False)
        assert [q for q in statements if q.startswith("INSERT OR REPLACE INTO clients")]
        assert statements.count("COMMIT") == 1
        statements.clear()
        clients = []
        for i in range(5):  # one CONNECT per turn of the loop, within the window
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.ports[0])
            client = Client(reader, writer, 5)
            client.send(p.Connect(protocol_level=5, client_id=f"soon-{i}"))
            clients.append(client)
            await asyncio.sleep(0.01)
        for client in clients:
            connack = await client.recv(10)
            assert isinstance(connack, p.Connack) and connack.reason_code == 0
        shared.db.db.set_trace_callback(None)
        claims = [q for q in statements if q.startswith("INSERT OR REPLACE INTO clients")]
        assert len(claims) == 5
        assert statements.count("COMMIT") == 1, statements
        for client in [first, *clients]:
            client.writer.close()
    finally:
        await srv.close(0.1)
