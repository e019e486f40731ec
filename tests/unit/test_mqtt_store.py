"""The session store's bounds (issue 13, "Sessions"): max_sessions with its eviction order,
empty sessions kept as an id and an expiry, expiry by heap, the client id length limit."""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import pytest

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt import store as store_module
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.events import MqttLimits
from gateway.protocols.mqtt.properties import Properties
from gateway.protocols.mqtt.session import MqttSession
from gateway.protocols.mqtt.store import SessionStore
from gateway.sources import mqtt_registry_db as db_module

pytestmark = pytest.mark.unit


def connect(store: SessionStore, client_id: str, now: float = 0.0, *, version: int = 4,
            clean: bool = False, expiry: int | None = None,
            limits: MqttLimits | None = None) -> tuple[MqttSession, bytes]:
    session = MqttSession(limits or MqttLimits(), store, now)
    props = Properties(session_expiry_interval=expiry) if version == 5 else None
    session.receive_data(encode(p.Connect(protocol_level=version, client_id=client_id,
                                          clean_start=clean, properties=props), version), now)
    return session, session.data_to_send()


def present(store: SessionStore, client_id: str, now: float = 0.0) -> bool:
    _, connack = connect(store, client_id, now)
    assert connack in (b"\x20\x02\x00\x00", b"\x20\x02\x01\x00"), connack
    return connack[2] == 1


def cycle(store: SessionStore, client_id: str, now: float = 0.0, *,
          qos2: int | None = None) -> MqttSession:
    """CONNECT with clean session 0, optionally leave a QoS 2 id unreleased, disconnect."""
    session, _ = connect(store, client_id, now)
    if qos2 is not None:
        session.receive_data(encode(p.Publish(topic="t", payload=b"x", qos=2,
                                              packet_id=qos2), 4), now)
    session.connection_lost(now)
    return session


def test_churn_of_new_client_ids_stays_at_max_sessions() -> None:
    store = SessionStore(max_sessions=50)
    evicted: list[tuple[str, int]] = []
    store.on_evict = lambda cid, held: evicted.append((cid, held))
    for i in range(300):
        cycle(store, f"churn-{i}", float(i))
    assert (store.retained, len(store), store.evicted) == (50, 50, 250)
    # Nothing is held for a session with nothing to resume: no ClientState, id + expiry only.
    assert len(store._states) == 0 and len(store._empty) == 50
    assert len(store._empty_heap) <= 2 * 50 + store_module._SLACK
    # Oldest released first; the client sees it: session present 0, the kept ones 1.
    assert evicted[0] == ("churn-0", 0) and evicted[-1] == ("churn-249", 0)
    assert not present(store, "churn-249", 300.0)
    assert present(store, "churn-299", 300.0)


def test_empty_sessions_go_before_sessions_holding_qos2_ids() -> None:
    store = SessionStore(max_sessions=3)
    cycle(store, "holds-a", 0.0, qos2=1)  # released first, but holds an unreleased QoS 2 id
    cycle(store, "empty-b", 1.0)
    cycle(store, "holds-c", 2.0, qos2=7)
    cycle(store, "empty-d", 3.0)  # over the bound: the oldest empty one goes
    assert sorted(store._kept) == ["holds-a", "holds-c"] and list(store._empty) == ["empty-d"]
    evicted: list[tuple[str, int]] = []
    store.on_evict = lambda cid, held: evicted.append((cid, held))
    cycle(store, "holds-e", 4.0, qos2=3)  # no empty one left to evict once empty-d is gone
    cycle(store, "holds-f", 5.0, qos2=4)
    assert evicted == [("empty-d", 0), ("holds-a", 1)]  # then the oldest released overall
    assert sorted(store._kept) == ["holds-c", "holds-e", "holds-f"]


def test_a_session_with_a_live_connection_is_never_evicted() -> None:
    store = SessionStore(max_sessions=2)
    live = [connect(store, f"live-{i}")[0] for i in range(10)]
    for i in range(20):
        cycle(store, f"gone-{i}", float(i))
    assert store.retained == 2 and len(store) == 12
    assert all(store._states[f"live-{i}"].owner is live[i] for i in range(10))
    # ... and a live one released later is kept (the older released ones make room).
    live[0].connection_lost(30.0)
    assert "live-0" in store._empty and store.retained == 2


def test_max_sessions_zero_keeps_nothing() -> None:
    store = SessionStore(max_sessions=0)
    cycle(store, "c", qos2=5)
    assert (len(store), store.retained, store.evicted) == (0, 0, 1)
    assert not present(store, "c")


def test_an_empty_retained_session_answers_session_present() -> None:
    """[MQTT-3.2.2-2]: a stored session, even an empty one, is present (docs/sessions.md)."""
    store = SessionStore()
    cycle(store, "dev")
    assert "dev" not in store._states and store.retained == 1
    assert present(store, "dev", 10.0)
    assert store.retained == 0 and "dev" in store._states  # live again


def test_a_retained_qos2_id_still_answers_its_retransmission() -> None:
    store = SessionStore(max_sessions=10)
    old = cycle(store, "q2", qos2=9)
    assert store.retained == 1 and store._states["q2"].qos2 is not None
    new, connack = connect(store, "q2", 1.0)
    assert connack == b"\x20\x02\x01\x00"
    assert new.receive_data(encode(p.Publish(topic="t", payload=b"x", qos=2, packet_id=9,
                                             dup=True), 4), 1.0) == []  # not produced twice
    assert old.closing


def test_expire_works_on_what_expires_not_on_what_is_stored(monkeypatch: Any) -> None:
    store = SessionStore(max_sessions=200_000)
    owner = MqttSession(MqttLimits(), store, 0.0)
    for i in range(100_000):  # what a CONNECT and a disconnect do, without the bytes
        now = 0.0 if i < 10 else 1000.0  # 24 h expiry: 10 of them due first
        state, _ = store.open(f"c{i}", False, owner, now)
        store.release(f"c{i}", state, owner, 24 * 3600, now)
    pops = 0
    real = heapq.heappop

    def counting(heap: list[Any]) -> Any:
        nonlocal pops
        pops += 1
        return real(heap)

    monkeypatch.setattr(heapq, "heappop", counting)
    due = 24 * 3600.0
    assert store.expire(due - 1) == 0 and pops == 0  # nothing due: nothing examined
    assert store.expire(due) == 10 and pops == 10  # one step per expired session
    assert len(store._empty_heap) == 100_000 - 10 and store.retained == 100_000 - 10
    assert store.expired == 10


def test_reconnects_do_not_grow_the_expiry_heap() -> None:
    store = SessionStore()
    for n in range(5000):
        cycle(store, f"d{n % 7}", float(n))  # 7 devices reconnecting over and over
    assert store.retained == 7
    assert len(store._empty_heap) <= 2 * 7 + store_module._SLACK
    assert store.expire(float(5000 + 24 * 3600)) == 7 and len(store) == 0


@pytest.mark.parametrize(("version", "code", "connack"),
                         [(5, 0x85, "20 03 00 85 00"), (4, 0x02, "20 02 00 02")])
def test_a_client_id_over_max_client_id_bytes_is_refused(version: int, code: int,
                                                          connack: str) -> None:
    store = SessionStore()
    limits = MqttLimits(max_client_id_bytes=128)
    _, reply = connect(store, "é" * 64, version=version, limits=limits)  # 128 bytes
    assert decode_packets(reply, version, 1 << 20)[0][0].reason_code == 0  # type: ignore[union-attr]
    session, reply = connect(store, "é" * 64 + "x", version=version, limits=limits)  # 129
    assert reply.hex(" ") == connack and session.closing
    assert store.refused_client_ids == 1 and len(store) == 1  # nothing kept for it
    _, reply = connect(store, "x" * 65_000, version=version)  # the default: 256
    assert decode_packets(reply, version, 1 << 20)[0][0].reason_code == code  # type: ignore[union-attr]


# --- the shared registry (workers > 1) --------------------------------------------------


def test_registry_rows_of_evicted_sessions_go_with_the_release(tmp_path: Path) -> None:
    db_module.create(tmp_path)
    db = db_module.RegistryDb(tmp_path, 0, 0.0)
    for cid in ("a", "b", "c"):
        db.claim(cid)
        db.release(cid, 100.0)
    db.claim("d")
    db.release("d", 100.0, evicted=["a", "b"])
    rows = [r[0] for r in db.db.execute("SELECT client_id FROM clients ORDER BY 1")]
    assert rows == ["c", "d"]


def test_registry_orphans_are_bounded_and_expired_through_an_index(tmp_path: Path) -> None:
    db_module.create(tmp_path)
    dead = db_module.RegistryDb(tmp_path, 0, 0.0)
    for i in range(30):
        dead.claim(f"o{i}")
        dead.release(f"o{i}", 100.0 + i)
    db_module.forget_worker(tmp_path, 0)  # the worker died: its rows are orphans
    new = db_module.RegistryDb(tmp_path, 0, 0.0, max_sessions=10)  # its restart bounds them
    left = [r[0] for r in new.db.execute("SELECT client_id FROM clients ORDER BY expires_at")]
    assert left == [f"o{i}" for i in range(20, 30)]  # the soonest to expire went first
    plan = " ".join(str(r) for r in new.db.execute(
        "EXPLAIN QUERY PLAN SELECT client_id FROM clients INDEXED BY clients_orphans"
        " WHERE worker IS NULL AND expires_at <= ? LIMIT ?", (0.0, 1)))
    assert "clients_orphans (expires_at<?)" in plan  # a range of the index: no scan
    new.expire([], 125.0, orphans=True)
    left = [r[0] for r in new.db.execute("SELECT client_id FROM clients ORDER BY expires_at")]
    assert left == [f"o{i}" for i in range(26, 30)]
