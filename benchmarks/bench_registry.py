"""Cost of the shared session registry (workers > 1), per QoS 2 message and per CONNECT.

    python -m benchmarks.bench_registry [--messages 50000]

Runs the sans-IO session against the in-memory store and against the shared
store (SQLite WAL in a temp dir, as under the supervisor), and prices the
alternative the registry avoids: a store write before produce and one at PUBREL.
Numbers are per operation on this machine; docs/sessions.md quotes a run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import encode
from gateway.protocols.mqtt.events import MqttLimits, PublishReceived
from gateway.protocols.mqtt.session import MqttSession
from gateway.protocols.mqtt.store import SessionStore
from gateway.sources import mqtt_registry_db
from gateway.sources.mqtt_registry import SharedSessions

LIMITS = MqttLimits(receive_maximum=65535)


def per_op(fn: Callable[[], None], count: int) -> float:
    """Microseconds per call of ``fn`` (best of 3)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(count):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


def qos2_round(store: SessionStore, shared: SharedSessions | None, count: int) -> float:
    """PUBLISH QoS 2 -> verdict -> PUBREC -> PUBREL -> PUBCOMP, on one connected session."""
    session = MqttSession(LIMITS, store, 0.0)
    session.receive_data(encode(p.Connect(protocol_level=4, client_id="bench",
                                          clean_start=False), 4), 0.0)
    session.data_to_send()
    frames = [(encode(p.Publish(topic="t", payload=b"x" * 100, qos=2, packet_id=pid), 4),
               encode(p.Pubrel(packet_id=pid), 4)) for pid in range(1, 65536)]
    state = {"i": 0}

    def one() -> None:
        publish, pubrel = frames[state["i"] % 65535]
        state["i"] += 1
        event = session.receive_data(publish, 0.0)[0]
        assert isinstance(event, PublishReceived)
        session.ack(event.token)
        if shared is not None:
            shared.verdict(event.token, 0)  # what MqttServer.on_done adds per QoS 2 verdict
        session.receive_data(pubrel, 0.0)
        session.data_to_send()

    return per_op(one, count)


def connect_round(store: SessionStore, count: int) -> float:
    """CONNECT (clean session 0) then connection lost: claim and release the client id."""
    state = {"i": 0}

    def one() -> None:
        state["i"] += 1
        session = MqttSession(LIMITS, store, 0.0)
        session.receive_data(encode(p.Connect(protocol_level=4, client_id=f"c{state['i']}",
                                              clean_start=False), 4), 0.0)
        session.connection_lost(0.0)

    return per_op(one, count)


def write_per_message(directory: str, count: int) -> float:
    """The avoided design: an INSERT before produce and a DELETE at PUBREL, per message."""
    db = mqtt_registry_db.connect(directory)
    state = {"i": 0}

    def one() -> None:
        state["i"] += 1
        pid = state["i"] % 65535
        db.execute("INSERT OR REPLACE INTO qos2 VALUES ('x', ?, 0, 0, 1)", (pid,))
        db.execute("DELETE FROM qos2 WHERE client_id = 'x' AND packet_id = ?", (pid,))

    try:
        return per_op(one, count)
    finally:
        db.close()


def handover(directory: str, ids: int, count: int) -> float:
    """The old owner's export of ``ids`` QoS 2 ids plus the new owner's read of them."""
    old = mqtt_registry_db.RegistryDb(directory, 90, 0.0)
    new = mqtt_registry_db.RegistryDb(directory, 91, 0.0)
    rows = [(pid, True, 0) for pid in range(1, ids + 1)]

    def one() -> None:
        _prev, claim = new.claim("moving")
        old.export("moving", claim, rows)
        new.take_rows("moving", True)

    try:
        return per_op(one, count)
    finally:
        old.close()
        new.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--connects", type=int, default=5_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-") as directory:
        mqtt_registry_db.create(directory)
        shared = SharedSessions(directory, 0, LIMITS, 0.0)
        try:
            rows = [
                ("QoS 2 message, in-memory store", qos2_round(SessionStore(), None,
                                                              args.messages)),
                ("QoS 2 message, shared store", qos2_round(shared, shared, args.messages)),
                ("store write before produce + at PUBREL (not done)",
                 write_per_message(directory, args.messages)),
                ("CONNECT + disconnect, in-memory store", connect_round(SessionStore(),
                                                                        args.connects)),
                ("CONNECT + disconnect, shared store", connect_round(shared, args.connects)),
                ("handover of 10 QoS 2 ids (export + read)", handover(directory, 10,
                                                                      args.connects)),
            ]
        finally:
            shared.close()
    for name, micros in rows:
        print(f"{name:52s} {micros:8.2f} us")


if __name__ == "__main__":
    main()
