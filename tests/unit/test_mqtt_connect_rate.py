"""The connect-rate pieces without sockets: the session refusing a CONNECT it was told to
refuse (5.0 CONNACK 0x9F, 3.1.1 a close without CONNACK), and the server's token bucket."""

from __future__ import annotations

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.events import Connected, Disconnected, MqttLimits
from gateway.protocols.mqtt.properties import Properties
from gateway.protocols.mqtt.session import MqttSession
from gateway.protocols.mqtt.store import SessionStore


def refused(version: int) -> tuple[MqttSession, SessionStore, bytes, list[object]]:
    store = SessionStore()
    session = MqttSession(MqttLimits(), store, 0.0, authenticate=True)
    session.refuse_connect(0x9F)
    events = session.receive_data(encode(p.Connect(
        protocol_level=version, client_id="dev-1", clean_start=False, keep_alive=60,
        properties=Properties(session_expiry_interval=600) if version == 5 else None),
        version), 0.0)
    return session, store, session.data_to_send(), list(events)


def test_mqtt5_gets_connack_0x9f_before_authentication() -> None:
    session, store, out, events = refused(5)
    (connack,), _ = decode_packets(out, 5, 1 << 20)
    assert isinstance(connack, p.Connack) and connack.reason_code == 0x9F
    assert session.closing
    # Neither authenticated (no AuthRequested) nor connected; no session state kept.
    assert [type(e) for e in events] == [Disconnected]
    assert not any(isinstance(e, Connected) for e in events)
    session.connection_lost(1.0)
    assert store.retained == 0


def test_mqtt311_is_closed_without_connack() -> None:
    session, _store, out, events = refused(4)
    assert out == b"" and session.closing
    assert [type(e) for e in events] == [Disconnected]


def test_token_bucket() -> None:
    from gateway.sources.mqtt_server import MqttServer

    class Pipeline:
        flow = None

        def publish(self, message: object, on_done: object) -> None:
            raise AssertionError

    srv = MqttServer(Pipeline(), MqttLimits(connect_rate=2.0, connect_burst=3))  # type: ignore[arg-type]
    assert [srv.take_connect_token(10.0) for _ in range(4)] == [True, True, True, False]
    assert not srv.take_connect_token(10.4)  # 0.8 of a token
    assert srv.take_connect_token(10.5)  # 1.0
    assert not srv.take_connect_token(10.5)
    assert [srv.take_connect_token(100.0) for _ in range(4)] == [True, True, True, False]
    # burst 0: one second's worth (at least one)
    slow = MqttServer(Pipeline(), MqttLimits(connect_rate=0.5))  # type: ignore[arg-type]
    assert [slow.take_connect_token(0.0) for _ in range(2)] == [True, False]
    assert slow.take_connect_token(2.0)
