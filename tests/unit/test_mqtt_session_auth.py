"""The session's side of authentication: a CONNECT waits for the I/O layer's verdict.

Bytes in -> events and bytes out, no sockets: ``AuthRequested`` leaves the
session, nothing is answered or processed until ``authenticated(verdict, now)``.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth import AuthRefusal, Identity
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.events import (
    AuthRequested,
    Connected,
    Disconnected,
    Event,
    MqttLimits,
    PublishReceived,
)
from gateway.protocols.mqtt.properties import Properties
from gateway.protocols.mqtt.session import AWAIT_AUTH, CONNECTED, MqttSession
from gateway.protocols.mqtt.store import SessionStore

pytestmark = pytest.mark.unit
NOW = 100.0
ALICE = Identity(method="password", name="alice")
MISSING = AuthRefusal(reason="missing", message="no credentials")
BAD = AuthRefusal(reason="bad_credentials", message="wrong password")


def session(store: SessionStore | None = None, timeout: float = 10.0) -> MqttSession:
    return MqttSession(MqttLimits(connect_timeout=timeout),
                       store if store is not None else SessionStore(), NOW,
                       authenticate=True)


def connect(version: int, username: str | None = "mallory", password: bytes | None = b"pw",
            will: bool = False, client_id: str = "c1", clean: bool = True) -> bytes:
    # clean False (5.0: expiry 60 s): accepted state would outlive the connection.
    props = (Properties(session_expiry_interval=None if clean else 60) if version == 5
             else None)
    w = p.Will(topic="w", payload=b"gone", properties=Properties() if version == 5 else None
               ) if will else None
    return encode(p.Connect(protocol_level=version, client_id=client_id, username=username,
                            password=password, will=w, clean_start=clean, properties=props),
                  version)


def publish(version: int, pid: int = 1, topic: str = "t") -> bytes:
    props = Properties() if version == 5 else None
    return encode(p.Publish(topic=topic, payload=b"x", qos=1, packet_id=pid, properties=props),
                  version)


def packets(s: MqttSession, version: int) -> list[p.AnyPacket]:
    data = s.data_to_send()
    out, used = decode_packets(data, version, 1 << 20)
    assert used == len(data)
    return out


def published(events: list[Event]) -> list[str]:
    return [e.publish.topic for e in events if isinstance(e, PublishReceived)]


@pytest.mark.parametrize("version", [4, 5])
def test_connect_waits_for_the_verdict_and_says_who_asked(version: int) -> None:
    s = session()
    events = s.receive_data(connect(version), NOW)
    assert events == [AuthRequested(client_id="c1", version=version, username="mallory",
                                    password=b"pw")]
    assert s.state is AWAIT_AUTH and s.data_to_send() == b""  # no CONNACK yet
    assert not s.closing


@pytest.mark.parametrize("version", [4, 5])
def test_pipelined_publish_waits_then_follows_the_connack(version: int) -> None:
    s = session()
    events = s.receive_data(connect(version) + publish(version, 1, "a"), NOW)
    assert [type(e) for e in events] == [AuthRequested]
    # More bytes before the verdict (a read already under way): kept, not parsed.
    assert s.receive_data(publish(version, 2, "b")[:3], NOW) == []
    assert s.receive_data(publish(version, 2, "b")[3:], NOW) == []
    assert s.data_to_send() == b""
    events = s.authenticated(ALICE, NOW + 1)
    assert isinstance(events[0], Connected) and published(events) == ["a", "b"]
    (connack,) = packets(s, version)
    assert isinstance(connack, p.Connack) and connack.reason_code == 0
    assert s.state is CONNECTED


@pytest.mark.parametrize("version", [4, 5])
def test_the_verified_name_replaces_the_connect_username(version: int) -> None:
    s = session()
    s.receive_data(connect(version, username="admin"), NOW)
    events = s.authenticated(ALICE, NOW)
    assert isinstance(events[0], Connected) and events[0].username == "alice"
    assert s.username == "alice" and s.identity is ALICE
    s2 = session()
    s2.receive_data(connect(version, username="admin"), NOW)
    s2.authenticated(Identity(method="anonymous"), NOW)
    assert s2.username is None  # anonymous: nobody, whatever the CONNECT claimed


@pytest.mark.parametrize(("version", "refusal", "code"), [
    (4, MISSING, 0x05), (4, BAD, 0x04), (5, MISSING, 0x87), (5, BAD, 0x86),
])
def test_refusal_answers_its_connack_code_and_drops_what_followed(
        version: int, refusal: AuthRefusal, code: int) -> None:
    store = SessionStore()
    s = session(store)
    s.receive_data(connect(version, will=True, clean=False) + publish(version, 1), NOW)
    events = s.authenticated(refusal, NOW)
    (connack,) = packets(s, version)
    assert isinstance(connack, p.Connack) and connack.reason_code == code
    assert not connack.session_present
    assert published(events) == []
    (gone,) = events
    assert isinstance(gone, Disconnected) and gone.will_due is False  # the will is discarded
    assert s.closing and s.identity is None
    assert s.receive_data(publish(version, 2), NOW) == []  # and nothing after it either
    assert len(store) == 0  # no session state was created
    s.connection_lost(NOW)
    assert len(store) == 0
    kept = session(store)
    kept.receive_data(connect(version, clean=False), NOW)
    kept.authenticated(ALICE, NOW)
    assert len(store) == 1  # (accepted, it exists, and outlives the connection)
    kept.connection_lost(NOW)
    assert len(store) == 1


def test_refusal_bytes_are_exact() -> None:
    for version, refusal, wire in [(4, MISSING, "20020005"), (4, BAD, "20020004"),
                                   (5, MISSING, "2003008700"), (5, BAD, "2003008600")]:
        s = session()
        s.receive_data(connect(version), NOW)
        s.authenticated(refusal, NOW)
        assert s.data_to_send().hex() == wire


def test_connect_timeout_runs_while_waiting() -> None:
    s = session(timeout=10.0)
    s.receive_data(connect(5) + publish(5), NOW)
    assert s.deadline == NOW + 10.0
    assert s.expire(NOW + 5) == []
    (gone,) = s.expire(NOW + 10.0)
    assert isinstance(gone, Disconnected) and s.closing
    assert s.data_to_send() == b""  # no CONNACK: the client's dialect is known, but it waited
    assert s.authenticated(ALICE, NOW + 11) == []  # a late verdict changes nothing
    assert s.data_to_send() == b""


def test_connection_lost_while_waiting_leaves_nothing() -> None:
    store = SessionStore()
    s = session(store)
    s.receive_data(connect(4), NOW)
    (gone,) = s.connection_lost(NOW)
    assert isinstance(gone, Disconnected) and not gone.will_due
    assert s.authenticated(ALICE, NOW) == [] and s.data_to_send() == b""
    assert len(store) == 0


def test_checks_that_need_no_credentials_come_first() -> None:
    s = session()
    bad = encode(p.Connect(protocol_level=4, client_id="", clean_start=False, username="u",
                           password=b"p"), 4)
    events = s.receive_data(bad, NOW)
    assert [type(e) for e in events] == [Disconnected]  # 0x02, no AuthRequested
    assert s.data_to_send().hex() == "20020002"


@pytest.mark.parametrize("version", [4, 5])
def test_an_expiring_identity_ends_the_connection_at_the_sweep(version: int) -> None:
    s = session()
    s.receive_data(connect(version), NOW)
    s.authenticated(Identity(method="jwt", name="alice", expires_at=1e12), NOW,
                    valid_until=NOW + 30)
    packets(s, version)  # the CONNACK
    assert s.deadline == NOW + 30  # keep alive 0: the token is the only deadline
    assert s.expire(NOW + 29) == []
    (gone,) = s.expire(NOW + 30)
    assert isinstance(gone, Disconnected) and gone.reason_code == 0x87 and s.closing
    out = packets(s, version)
    if version == 5:
        (disc,) = out
        assert isinstance(disc, p.Disconnect) and disc.reason_code == 0x87
        assert disc.properties is not None and disc.properties.reason_string == "token expired"
    else:
        assert out == []  # 3.1.1: the close says it


def test_keep_alive_still_applies_before_the_token_expires() -> None:
    s = session()
    s.receive_data(encode(p.Connect(protocol_level=5, client_id="c", keep_alive=10,
                                    properties=Properties()), 5), NOW)
    s.authenticated(ALICE, NOW, valid_until=NOW + 3600)
    assert s.deadline == NOW + 15
    (gone,) = s.expire(NOW + 15)
    assert isinstance(gone, Disconnected) and gone.reason_code == 0x8D


def test_without_authenticate_nothing_changes() -> None:
    s = MqttSession(MqttLimits(), SessionStore(), NOW)
    events = s.receive_data(connect(4) + publish(4), NOW)
    assert [type(e) for e in events] == [Connected, PublishReceived]
    assert s.username == "mallory"  # embedded use: the CONNECT's word, as before


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
       version=st.sampled_from([4, 5]), accept=st.booleans())
def test_any_split_of_connect_and_pipelined_bytes_gives_the_same_outcome(
        cuts: list[int], version: int, accept: bool) -> None:
    data = connect(version) + publish(version, 1, "a") + publish(version, 2, "b")
    s = session()
    events: list[Event] = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for lo, hi in itertools.pairwise(bounds):
        events += s.receive_data(data[lo:hi], NOW)
    assert [type(e) for e in events] == [AuthRequested] and s.data_to_send() == b""
    events = s.authenticated(ALICE if accept else BAD, NOW)
    assert published(events) == (["a", "b"] if accept else [])
    assert s.closing is not accept


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(max_size=300), version=st.sampled_from([4, 5]),
       verdict=st.sampled_from([ALICE, BAD, MISSING]), split=st.integers(0, 300))
def test_hostile_bytes_behind_a_waiting_connect_never_crash(
        tail: bytes, version: int, verdict: Identity | AuthRefusal, split: int) -> None:
    s = session()
    events = s.receive_data(connect(version) + tail[:split], NOW)
    assert [type(e) for e in events] == [AuthRequested]
    assert s.receive_data(tail[split:], NOW) == []  # nothing parsed before the verdict
    events = s.authenticated(verdict, NOW)
    if isinstance(verdict, AuthRefusal):
        assert published(events) == [] and s.closing
    else:
        assert isinstance(events[0], Connected)
    s.data_to_send()
    s.connection_lost(NOW)
