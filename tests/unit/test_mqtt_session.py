"""The MQTT session as bytes in -> events and bytes out, one rule per test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.events import (
    Connected,
    Disconnected,
    Event,
    MqttLimits,
    PublishReceived,
)
from gateway.protocols.mqtt.properties import Properties
from gateway.protocols.mqtt.session import MqttSession
from gateway.protocols.mqtt.store import SessionStore

pytestmark = pytest.mark.unit
P = Properties


class Peer:
    """A session plus the client's view of it (bytes encoded and decoded for it)."""

    def __init__(self, version: int = 5, store: SessionStore | None = None,
                 limits: MqttLimits | None = None, now: float = 100.0) -> None:
        self.version = version
        self.store = store if store is not None else SessionStore()
        self.session = MqttSession(limits or MqttLimits(), self.store, now,
                                   new_client_id=lambda: "generated")

    def send(self, *packets: p.AnyPacket, now: float = 100.0) -> list[Event]:
        data = b"".join(encode(pk, self.version) for pk in packets)
        return self.session.receive_data(data, now)

    def received(self) -> list[p.AnyPacket]:
        data = self.session.data_to_send()
        packets, used = decode_packets(data, self.version, 1 << 28)
        assert used == len(data)
        return packets

    def connect(self, client_id: str = "c1", clean: bool = True, keep_alive: int = 0,
                props: Properties | None = None, now: float = 100.0) -> Connected:
        if self.version == 5 and props is None:
            props = P()
        events = self.send(p.Connect(protocol_level=self.version, client_id=client_id,
                                     clean_start=clean, keep_alive=keep_alive, properties=props),
                           now=now)
        assert isinstance(events[0], Connected), events
        connack = self.received()[0]
        assert isinstance(connack, p.Connack) and connack.reason_code == 0
        return events[0]

    def publish(self, pid: int, qos: int = 1, topic: str = "t", payload: bytes = b"x",
                dup: bool = False, props: Properties | None = None) -> list[Event]:
        if self.version == 5 and props is None:
            props = P()
        return self.send(p.Publish(topic=topic, payload=payload, qos=qos, packet_id=pid,
                                   dup=dup, properties=props))


def disconnect_reason(peer: Peer) -> int | None:
    out = peer.received()
    assert peer.session.closing
    return out[-1].reason_code if out and isinstance(out[-1], p.Disconnect) else None


# --- CONNECT ----------------------------------------------------------------------


def test_connect_must_be_first() -> None:
    peer = Peer(4)
    events = peer.send(p.Pingreq())
    assert isinstance(events[0], Disconnected) and peer.session.closing
    assert peer.session.data_to_send() == b""


@pytest.mark.parametrize(("level", "name", "answer"), [
    (3, "MQIsdp", "20020001"), (6, "MQTT", "20020001"), (4, "MQTT", None),
])
def test_version_negotiation(level: int, name: str, answer: str | None) -> None:
    peer = Peer(4)
    events = peer.session.receive_data(encode(p.Connect(protocol_level=level, protocol_name=name,
                                                        client_id="a"), 4), 1.0)
    if answer is None:
        assert isinstance(events[0], Connected)
    else:
        assert peer.session.data_to_send().hex() == answer and peer.session.closing


@pytest.mark.parametrize(("version", "clean", "code", "assigned"), [
    (4, True, 0, None), (4, False, 0x02, None), (5, True, 0, "generated"),
    (5, False, 0, "generated"),
])
def test_empty_client_id(version: int, clean: bool, code: int, assigned: str | None) -> None:
    peer = Peer(version)
    events = peer.send(p.Connect(protocol_level=version, client_id="", clean_start=clean,
                                 properties=P() if version == 5 else None))
    connack = peer.received()[0]
    assert isinstance(connack, p.Connack) and connack.reason_code == code
    if code:
        assert peer.session.closing and not any(isinstance(e, Connected) for e in events)
        return
    assert isinstance(events[0], Connected) and events[0].client_id == "generated"
    got = connack.properties.assigned_client_identifier if connack.properties else None
    assert got == assigned


def test_connack_advertises_limits_and_refuses_enhanced_auth() -> None:
    peer = Peer(5, limits=MqttLimits(receive_maximum=7, topic_alias_maximum=3,
                                     max_packet_size=5000))
    peer.send(p.Connect(protocol_level=5, client_id="a", properties=P()))
    props = peer.received()[0].properties  # type: ignore[union-attr]
    assert (props.receive_maximum, props.topic_alias_maximum, props.maximum_packet_size) == (
        7, 3, 5000)
    assert props.wildcard_subscription_available == 0
    other = Peer(5)
    other.send(p.Connect(protocol_level=5, client_id="a",
                         properties=P(authentication_method="SCRAM")))
    assert other.received()[0].reason_code == 0x8C and other.session.closing  # type: ignore[union-attr]


def test_second_connect_is_a_protocol_error() -> None:
    peer = Peer(5)
    peer.connect()
    peer.send(p.Connect(protocol_level=5, client_id="c1", properties=P()))
    assert disconnect_reason(peer) == 0x82


# --- keep alive and timeouts -----------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_keepalive_closes_after_one_and_a_half_intervals(version: int) -> None:
    peer = Peer(version)
    peer.connect(keep_alive=10, now=100.0)
    peer.send(p.Pingreq(), now=104.0)
    assert isinstance(peer.received()[0], p.Pingresp)
    assert peer.session.deadline == 119.0
    assert peer.session.expire(118.9) == []
    events = peer.session.expire(119.0)
    assert isinstance(events[0], Disconnected) and events[0].will_due
    assert disconnect_reason(peer) == (0x8D if version == 5 else None)


def test_server_keep_alive_replaces_the_clients() -> None:
    peer = Peer(5, limits=MqttLimits(server_keep_alive=30))
    peer.send(p.Connect(protocol_level=5, client_id="a", keep_alive=600, properties=P()),
              now=0.0)
    assert peer.received()[0].properties.server_keep_alive == 30  # type: ignore[union-attr]
    assert peer.session.deadline == 45.0


def test_connect_timeout_is_not_extended_by_dribbled_bytes() -> None:
    peer = Peer(4, limits=MqttLimits(connect_timeout=5.0), now=0.0)
    peer.session.receive_data(b"\x10", 4.0)
    assert peer.session.deadline == 5.0
    assert isinstance(peer.session.expire(5.0)[0], Disconnected)


# --- QoS and acknowledgement order --------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_acks_wait_for_the_application_and_keep_arrival_order(version: int) -> None:
    peer = Peer(version)
    peer.connect()
    e0 = peer.publish(0, qos=0)
    e1 = peer.publish(1, qos=1)
    e2 = peer.publish(2, qos=2)
    assert all(isinstance(e[0], PublishReceived) for e in (e0, e1, e2))
    assert peer.received() == []
    for events in (e0, e2):
        peer.session.ack(events[0].token)  # type: ignore[union-attr]
    assert peer.received() == []  # PUBREC 2 waits behind PUBACK 1
    peer.session.ack(e1[0].token)  # type: ignore[union-attr]
    assert [type(x) for x in peer.received()] == [p.Puback, p.Pubrec]


@pytest.mark.parametrize("version", [4, 5])
def test_qos2_duplicate_is_produced_once(version: int) -> None:
    peer = Peer(version)
    peer.connect()
    first = peer.publish(5, qos=2)
    assert len(first) == 1
    assert peer.publish(5, qos=2, dup=True) == []  # still pending: nothing twice
    peer.session.ack(first[0].token)  # type: ignore[union-attr]
    assert peer.received() == [p.Pubrec(packet_id=5)]
    assert peer.publish(5, qos=2, dup=True) == []
    assert peer.received() == [p.Pubrec(packet_id=5)]  # PUBREC repeated
    peer.send(p.Pubrel(packet_id=5))
    assert peer.received() == [p.Pubcomp(packet_id=5)]
    assert len(peer.publish(5, qos=2)) == 1  # released: a new message


@pytest.mark.parametrize(("clean", "produced_again"), [(False, False), (True, True)])
def test_unreleased_qos2_survives_a_reconnect(clean: bool, produced_again: bool) -> None:
    store = SessionStore()
    old = Peer(4, store)
    old.connect(clean=False)
    token = old.publish(9, qos=2)[0].token  # type: ignore[union-attr]
    old.session.connection_lost(101.0)  # before the message was safe
    new = Peer(4, store)
    connected = new.connect(clean=clean)
    assert connected.session_present is not clean
    events = new.publish(9, qos=2, dup=True)
    assert bool(events) is produced_again
    if not produced_again:
        token.session.ack(token)  # the pipeline's late verdict reaches the new connection
        assert new.received() == [p.Pubrec(packet_id=9)]
        new.send(p.Pubrel(packet_id=9))
        assert new.received() == [p.Pubcomp(packet_id=9)]


def test_pending_follows_a_qos2_token_to_the_new_connection() -> None:
    """Issue #10 defect 6: the moved token left ``pending`` at -1 on the new session."""
    store = SessionStore()
    old = Peer(5, store)
    old.connect(clean=False, props=P(session_expiry_interval=60))
    token = old.publish(4, qos=2)[0].token  # type: ignore[union-attr]
    assert old.session.pending == 1
    old.session.connection_lost(101.0)
    new = Peer(5, store)
    new.connect(clean=False, props=P(session_expiry_interval=60))
    assert new.publish(4, qos=2, dup=True) == []  # not produced twice
    assert (old.session.pending, new.session.pending) == (0, 1)
    assert token.session.ack(token) == []
    assert new.session.pending == 0
    assert new.received() == [p.Pubrec(packet_id=4)]


def test_v311_transient_qos2_failure_lets_the_retransmission_through() -> None:
    """Issue #10 defect 3: the cached failure closed every reconnect until session expiry."""
    store = SessionStore()
    first = Peer(4, store)
    first.connect(clean=False)
    token = first.publish(7, qos=2)[0].token  # type: ignore[union-attr]
    first.session.ack(token, 0x89, "server busy", retriable=True)
    assert first.session.data_to_send() == b"" and first.session.closing  # no PUBREC
    first.session.connection_lost(101.0)
    second = Peer(4, store)
    second.connect(clean=False)
    events = second.publish(7, qos=2, dup=True)  # the device's retransmission
    assert len(events) == 1 and isinstance(events[0], PublishReceived)  # tried again
    assert not second.session.closing
    second.session.ack(events[0].token)
    assert second.session.data_to_send() == bytes.fromhex("50020007")  # PUBREC
    second.send(p.Pubrel(packet_id=7))
    assert second.session.data_to_send() == bytes.fromhex("70020007")  # PUBCOMP


@pytest.mark.parametrize("qos", [1, 2])
def test_v311_permanent_failure_is_acknowledged_not_looped(qos: int) -> None:
    """A message that can never pass gets its ack [MQTT-3.3.5-2], once; no reconnect loop."""
    peer = Peer(4)
    peer.connect(clean=False)
    token = peer.publish(3, qos=qos)[0].token  # type: ignore[union-attr]
    assert peer.session.ack(token, 0x90, "no rule", retriable=False) == []
    ack = "40020003" if qos == 1 else "50020003"
    assert peer.session.data_to_send().hex() == ack and not peer.session.closing
    if qos == 2:
        assert peer.publish(3, qos=2, dup=True) == []  # answered, never produced
        assert peer.session.data_to_send().hex() == "50020003"
        peer.send(p.Pubrel(packet_id=3))
        assert peer.session.data_to_send().hex() == "70020003"
    assert peer.session.pending == 0


def test_ack_returns_the_disconnect_it_causes() -> None:
    """Issue #10 defect 6: the Disconnected of a failed 3.1.1 publish was dropped."""
    peer = Peer(4)
    peer.connect()
    token = peer.publish(1)[0].token  # type: ignore[union-attr]
    events = peer.session.ack(token, 0x80, "kafka down")
    assert len(events) == 1 and isinstance(events[0], Disconnected)
    assert events[0].reason_code == 0x80 and events[0].will_due
    assert peer.session.connection_lost(101.0) == []  # nothing left over, nothing twice


def test_session_expiry() -> None:
    store = SessionStore()
    peer = Peer(5, store)
    peer.connect(clean=False, props=P(session_expiry_interval=10))
    peer.session.connection_lost(200.0)
    assert len(store) == 1
    assert store.expire(209.0) == 0 and store.expire(210.0) == 1 and len(store) == 0
    short = Peer(5, store)
    short.connect(clean=False)  # MQTT 5 default expiry is 0: nothing kept
    short.session.connection_lost(200.0)
    assert len(store) == 0


@pytest.mark.parametrize(("version", "reason"), [(5, 0x8E), (4, None)])
def test_takeover_ends_the_first_connection(version: int, reason: int | None) -> None:
    peer = Peer(version)
    peer.connect()
    events = peer.session.takeover()
    assert isinstance(events[0], Disconnected) and disconnect_reason(peer) == reason


# --- MQTT 5 publish features -----------------------------------------------------------------


def test_topic_aliases() -> None:
    peer = Peer(5, limits=MqttLimits(topic_alias_maximum=2))
    peer.connect()
    assert peer.publish(0, qos=0, topic="a/b", props=P(topic_alias=2))[0].publish.topic == "a/b"  # type: ignore[union-attr]
    assert peer.publish(0, qos=0, topic="", props=P(topic_alias=2))[0].publish.topic == "a/b"  # type: ignore[union-attr]


@pytest.mark.parametrize(("topic", "alias", "reason"), [
    ("a", 3, 0x94), ("", 1, 0x82), ("", None, 0x82),
])
def test_bad_topic_aliases(topic: str, alias: int | None, reason: int) -> None:
    peer = Peer(5, limits=MqttLimits(topic_alias_maximum=2))
    peer.connect()
    peer.publish(0, qos=0, topic=topic, props=P(topic_alias=alias))
    assert disconnect_reason(peer) == reason


def test_receive_maximum_is_enforced() -> None:
    peer = Peer(5, limits=MqttLimits(receive_maximum=2))
    peer.connect()
    peer.publish(1)
    peer.publish(2, qos=2)
    peer.publish(3)
    assert disconnect_reason(peer) == 0x93


@pytest.mark.parametrize(("version", "reason"), [(5, 0x95), (4, None)])
def test_maximum_packet_size(version: int, reason: int | None) -> None:
    peer = Peer(version, limits=MqttLimits(max_packet_size=100))
    peer.connect()
    peer.publish(1, payload=b"x" * 200)
    assert disconnect_reason(peer) == reason


def test_payload_format_indicator_is_checked() -> None:
    peer = Peer(5)
    peer.connect()
    assert peer.publish(1, payload=b"\xff", props=P(payload_format_indicator=1)) == []
    ack = peer.received()[0]
    assert isinstance(ack, p.Puback) and ack.reason_code == 0x99
    assert len(peer.publish(2, payload="é".encode(), props=P(payload_format_indicator=1))) == 1
    peer.publish(0, qos=0, payload=b"\xff", props=P(payload_format_indicator=1))
    assert disconnect_reason(peer) == 0x99


@pytest.mark.parametrize(("problem_info", "reason_string"), [(None, "no rule"), (0, None)])
def test_v5_rejection_carries_reason(problem_info: int | None, reason_string: str | None) -> None:
    peer = Peer(5)
    peer.connect(props=P(request_problem_information=problem_info))
    token = peer.publish(1)[0].token  # type: ignore[union-attr]
    peer.session.ack(token, 0x90, "no rule")
    ack = peer.received()[0]
    assert isinstance(ack, p.Puback) and ack.reason_code == 0x90
    assert (ack.properties.reason_string if ack.properties else None) == reason_string


def test_reason_string_dropped_to_fit_the_clients_maximum_packet_size() -> None:
    peer = Peer(5)
    peer.connect(props=P(maximum_packet_size=10))
    peer.session.ack(peer.publish(1)[0].token, 0x87, "a long explanation")  # type: ignore[union-attr]
    assert peer.received() == [p.Puback(packet_id=1, reason_code=0x87)]


def test_v311_rejection_closes_instead_of_acknowledging() -> None:
    peer = Peer(4)
    peer.connect()
    t1 = peer.publish(1)[0].token  # type: ignore[union-attr]
    t2 = peer.publish(2)[0].token  # type: ignore[union-attr]
    peer.session.ack(t1)
    peer.session.ack(t2, 0x87)
    assert peer.received() == [p.Puback(packet_id=1)]
    assert peer.session.closing


# --- other packets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "codes"), [(4, [0x80, 0x80]), (5, [0x83, 0x83])])
def test_subscribe_is_refused_politely(version: int, codes: list[int]) -> None:
    peer = Peer(version)
    peer.connect()
    props = P() if version == 5 else None
    peer.send(p.Subscribe(packet_id=3, subscriptions=[p.Subscription("a"), p.Subscription("b")],
                          properties=props),
              p.Unsubscribe(packet_id=4, topic_filters=["a"], properties=props))
    suback, unsuback = peer.received()
    assert isinstance(suback, p.Suback) and suback.reason_codes == codes
    assert isinstance(unsuback, p.Unsuback)
    assert unsuback.reason_codes == ([0x11] if version == 5 else [])
    assert not peer.session.closing


@pytest.mark.parametrize(("reason", "will_due"), [(0x00, False), (0x04, True)])
def test_client_disconnect_and_will(reason: int, will_due: bool) -> None:
    peer = Peer(5)
    peer.send(p.Connect(protocol_level=5, client_id="a", properties=P(),
                        will=p.Will(topic="w", payload=b"bye", properties=P())))
    assert peer.session.will is not None and peer.session.will.payload == b"bye"
    events = peer.send(p.Disconnect(reason_code=reason))
    assert isinstance(events[0], Disconnected) and events[0].will_due is will_due
    assert events[0].by_client


@pytest.mark.parametrize(("data", "reason"), [("f000", 0x82), ("3003000100", 0x81)])
def test_hostile_input_gets_a_clean_disconnect(data: str, reason: int) -> None:
    peer = Peer(5)
    peer.connect()
    peer.session.receive_data(bytes.fromhex(data), 101.0)
    assert disconnect_reason(peer) == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([4, 5]))
def test_random_bytes_after_connect_never_raise(data: bytes, version: int) -> None:
    peer = Peer(version)
    peer.connect()
    for event in peer.session.receive_data(data, 101.0):
        if isinstance(event, PublishReceived):
            peer.session.ack(event.token, 0x80)
    peer.session.data_to_send()


# --- memory: an idle session holds nothing it does not need --------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_an_idle_session_holds_no_buffers_or_events(version: int) -> None:
    peer = Peer(version)
    # A CONNECT split over two chunks: the partial packet is buffered, then let go.
    data = encode(p.Connect(protocol_level=version, client_id="c1", keep_alive=60,
                            properties=P() if version == 5 else None), version)
    assert peer.session.receive_data(data[:5], 100.0) == []
    events = peer.session.receive_data(data[5:], 100.0)
    assert isinstance(events[0], Connected)
    assert isinstance(peer.received()[0], p.Connack)
    s = peer.session
    assert (s._buf, s._out, s._events, s._order, s._aliases) == (None,) * 5
    assert s._client is not None and s._client.qos2 is None
    # Used, then idle again: the ack queue stays (an active client), the rest goes.
    peer.publish(1)
    s.ack(s._order[0])  # type: ignore[index]
    assert peer.received() == [p.Puback(packet_id=1)]
    assert (s._buf, s._out, s._events) == (None,) * 3


def test_puback_fast_path_bytes_match_the_encoder() -> None:
    for version in (4, 5):
        peer = Peer(version)
        peer.connect()
        peer.publish(0x1234)
        peer.session.ack(peer.session._order[0])  # type: ignore[index]
        assert peer.session.data_to_send() == encode(p.Puback(packet_id=0x1234), version)


# --- per-connection bounds (issue 13: topic aliases, idle and partial input) ------------------


def alias_bytes(session: MqttSession) -> int:
    """Bytes of topic names the session's alias map holds, counted from the map itself."""
    return sum(len(t.encode()) for t in (session._aliases or {}).values())


def test_alias_bytes_are_bounded_and_going_over_is_0x97() -> None:
    peer = Peer(5, limits=MqttLimits(topic_alias_maximum=100, topic_alias_max_bytes=3000))
    peer.connect()
    for alias in (1, 2):  # 2 x 1,000 bytes: within the bound
        peer.publish(0, qos=0, topic=f"{alias}/" + "x" * 998, props=P(topic_alias=alias))
    assert alias_bytes(peer.session) == peer.session._alias_bytes == 2000
    # Replacing an alias counts the difference; setting the same topic again costs nothing.
    peer.publish(0, qos=0, topic="short", props=P(topic_alias=2))
    peer.publish(0, qos=0, topic="short", props=P(topic_alias=2))
    assert alias_bytes(peer.session) == peer.session._alias_bytes == 1005
    peer.publish(0, qos=0, topic="é" * 997, props=P(topic_alias=3))  # 1,994 bytes: 2,999
    assert alias_bytes(peer.session) == peer.session._alias_bytes == 2999
    peer.received()
    events = peer.publish(1, qos=1, topic="y/z", props=P(topic_alias=4))  # 3,002: over
    assert not any(isinstance(e, PublishReceived) for e in events)
    closed = [e for e in events if isinstance(e, Disconnected)]
    assert closed and closed[0].reason_code == 0x97 and closed[0].limit == "topic_alias_bytes"
    assert disconnect_reason(peer) == 0x97
    assert peer.session._aliases is None  # let go at the close


def test_connack_says_the_default_alias_maximum() -> None:
    peer = Peer(5)
    peer.send(p.Connect(protocol_level=5, client_id="c", properties=P()))
    connack = peer.received()[0]
    assert isinstance(connack, p.Connack) and connack.properties is not None
    assert connack.properties.topic_alias_maximum == 10  # Mosquitto's default


@pytest.mark.parametrize(("asked", "told"), [(0, 3600), (7200, 3600), (60, None), (3600, None)])
def test_mqtt5_keep_alive_is_capped_by_default(asked: int, told: int | None) -> None:
    peer = Peer(5)
    peer.send(p.Connect(protocol_level=5, client_id="c", keep_alive=asked, properties=P()))
    connack = peer.received()[0]
    assert isinstance(connack, p.Connack) and connack.properties is not None
    assert connack.properties.server_keep_alive == told
    assert peer.session.deadline == 100.0 + 1.5 * (told or asked)


@pytest.mark.parametrize("asked", [0, 100])
def test_a_silent_v311_client_is_closed_after_the_cap(asked: int) -> None:
    peer = Peer(4, limits=MqttLimits(max_keep_alive=20))
    peer.connect(keep_alive=asked)
    assert peer.session.deadline == 130.0
    assert peer.session.expire(129.9) == [] and not peer.session.closing
    events = peer.session.expire(130.0)
    assert isinstance(events[0], Disconnected) and events[0].limit == "keep_alive"
    assert peer.session.data_to_send() == b""  # 3.1.1: closed without a packet


def test_no_cap_keeps_the_clients_keep_alive_0() -> None:
    peer = Peer(4, limits=MqttLimits(max_keep_alive=0))
    peer.connect(keep_alive=0)
    assert peer.session.deadline == float("inf")


@pytest.mark.parametrize("version", [4, 5])
def test_a_stalled_partial_packet_is_closed_after_its_timeout(version: int) -> None:
    peer = Peer(version, limits=MqttLimits(partial_packet_timeout=5.0))
    peer.connect(keep_alive=60)
    s = peer.session
    data = encode(p.Publish(topic="t", payload=b"x" * 100, qos=1, packet_id=1,
                            properties=P() if version == 5 else None), version)
    assert s.receive_data(data[:50], 200.0) == []
    assert s.deadline == 205.0
    assert s.receive_data(data[50:60], 204.0) == []  # trickling: the same packet's clock
    assert s.deadline == 205.0 and s.expire(204.9) == []
    events = s.expire(205.0)
    assert isinstance(events[0], Disconnected) and events[0].limit == "partial_packet"
    assert events[0].reason_code == 0x8D
    assert disconnect_reason(peer) == (0x8D if version == 5 else None)


def test_each_packet_gets_its_own_partial_clock() -> None:
    peer = Peer(5, limits=MqttLimits(partial_packet_timeout=5.0))
    peer.connect(keep_alive=60)
    s = peer.session
    one = encode(p.Publish(topic="t", payload=b"1", qos=0, properties=P()), 5)
    assert s.receive_data(one[:3], 200.0) == []
    # The first packet ends and a second one starts in the same chunk: a new clock.
    events = s.receive_data(one[3:] + one[:3], 204.0)
    assert isinstance(events[0], PublishReceived) and s.deadline == 209.0
    s.receive_data(one[3:], 208.0)  # complete: no partial clock, only the keep alive
    assert s._buf is None and s.deadline == 208.0 + 90


def test_the_partial_clock_stops_while_the_server_does_not_read() -> None:
    peer = Peer(5, limits=MqttLimits(partial_packet_timeout=5.0))
    peer.connect(keep_alive=600)
    s = peer.session
    one = encode(p.Publish(topic="t", payload=b"1", qos=0, properties=P()), 5)
    s.receive_data(one[:3], 200.0)
    s.reading_paused(True, 201.0)  # backpressure: the gateway stopped reading
    assert s.deadline == 200.0 + 900
    s.reading_paused(False, 300.0)
    assert s.deadline == 305.0


def test_no_partial_clock_while_a_connect_waits_for_its_verdict() -> None:
    from gateway.auth import Identity
    from gateway.protocols.mqtt.session import AWAIT_AUTH

    s = MqttSession(MqttLimits(partial_packet_timeout=5.0, connect_timeout=10.0),
                    SessionStore(), 100.0, authenticate=True)
    half = encode(p.Publish(topic="t", payload=b"x" * 50, qos=1, packet_id=1), 4)[:20]
    s.receive_data(encode(p.Connect(protocol_level=4, client_id="c", keep_alive=60), 4) + half,
                   100.0)
    assert s.state is AWAIT_AUTH and s._buf is not None
    assert s.deadline == 110.0  # the CONNECT timeout, no partial clock on unread bytes
    s.receive_data(half[:3], 101.0)
    assert s.deadline == 110.0
    s.authenticated(Identity(method="password", name="c"), 108.0)
    assert s.deadline == 113.0  # the tail left incomplete starts its clock at the verdict
