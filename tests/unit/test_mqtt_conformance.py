"""Publish-side conformance: normative statement -> exact bytes in -> exact bytes out / close.

One row per statement (or per way to break it) of MQTT 3.1.1 and 5.0 that a
server receiving PUBLISH must honour: CONNECT / CONNACK, PUBLISH / PUBACK /
PUBREC / PUBREL / PUBCOMP, PINGREQ, DISCONNECT, fixed header flags, topic
names, UTF-8, Variable Byte Integers, packet identifiers, properties, topic
aliases, Receive Maximum, Maximum Packet Size and the will fields.  SUBSCRIBE
and the downlink are out of scope (``OUT_OF_SCOPE`` says why per statement).

The table runs here against the sans-IO session and, in
``tests/integration/test_mqtt_conformance_wire.py``, against the real server
over a socket (every row that needs no clock).

A row is a list of steps ``(connection, bytes in, bytes out)``: the bytes in are
fed to that connection, every PUBLISH it produces gets the row's verdict, and
what the server wrote in answer must be exactly ``bytes out`` (None: not
checked, for the CONNACK of a prefix).  Special inputs: ``LOST`` (the client
drops the connection), ``@T`` (the clock reaches T; sans-IO only).  Unless the
row is ``raw``, each connection starts with the CONNECT of its version:
client id "c", clean start, keep alive 0 and, in 5.0, Request Problem
Information 0 so a DISCONNECT carries no reason string.  ``close``: the last
step's connection must end closed (else it must still answer a PINGREQ).
``login``: the server authenticates, and every CONNECT gets that verdict
(sans-IO: ``authenticated``; over the wire: an Authenticator whose ``verify``
answers it, so the pipelined bytes wait across a real await).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from gateway.auth import AuthRefusal, Identity
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.events import (
    AuthRequested,
    Connected,
    Disconnected,
    Event,
    MqttLimits,
    PublishReceived,
)
from gateway.protocols.mqtt.session import MqttSession
from gateway.protocols.mqtt.store import SessionStore

pytestmark = pytest.mark.unit

# Small limits so the rows stay short: Receive Maximum 2, aliases 1..2, packets <= 128 bytes.
# No keep alive cap: these rows are the specification's own keep alive rules; the gateway's
# idle bound on top of them (limits.max_keepalive_s) is tested in test_mqtt_session.py.
LIMITS = MqttLimits(receive_maximum=2, topic_alias_maximum=2, max_packet_size=128,
                    max_keep_alive=0)
NOW = 100.0

# CONNECT "c", clean start, keep alive 0 (5.0: properties 17 00 = no problem information).
C4 = "10 0d 0004 4d515454 04 02 0000 0001 63"
C5 = "10 10 0004 4d515454 05 02 0000 02 1700 0001 63"
CA4 = "20 02 00 00"
# 5.0 CONNACK for LIMITS: Receive Maximum 2, Topic Alias Maximum 2, Maximum Packet Size 128,
# no wildcard / subscription identifier / shared subscriptions.
CA5_PROPS = "21 0002 22 0002 27 00000080 28 00 29 00 2a 00"
CA5 = "20 14 00 00 11 " + CA5_PROPS
# CONNECT clean start 0 (3.1.1: a session that outlives the connection; 5.0: 60 s).
C4_KEEP = "10 0d 0004 4d515454 04 00 0000 0001 63"
C5_KEEP = "10 15 0004 4d515454 05 00 0000 07 1700 11 0000003c 0001 63"
# CONNECT "c" with user name "u" and password "p" (flags c2).
C4_USER = "10 13 0004 4d515454 04 c2 0000 0001 63 0001 75 0001 70"
C5_USER = "10 16 0004 4d515454 05 c2 0000 02 1700 0001 63 0001 75 0001 70"
# Verdicts for rows with a login: who "u" turned out to be, or why not.
ALICE = Identity(method="password", name="alice")
MISSING = AuthRefusal(reason="missing", message="no credentials")
BAD_PASSWORD = AuthRefusal(reason="bad_credentials", message="wrong password")

Step = tuple[str, str | None] | tuple[int, str, str | None]


@dataclass(frozen=True)
class Case:
    spec: str  # "3.1.1" or "5.0"
    ids: str  # the normative statement(s), e.g. "MQTT-3.1.2-2"
    what: str
    steps: tuple[Step, ...]
    close: bool = False
    raw: bool = False  # the steps include the CONNECT
    verdict: int | None = 0  # the application's answer to every PUBLISH (None: no answer)
    retriable: bool = False
    # Needs every byte in one read (the server stops reading at its in-flight bound).
    sansio_only: bool = False
    login: Identity | AuthRefusal | None = None  # the server authenticates: this verdict
    check: Callable[[list[Event]], bool] | None = field(default=None, compare=False)

    @property
    def version(self) -> int:
        return 5 if self.spec == "5.0" else 4

    @property
    def wire(self) -> bool:
        """Can run over a socket: no clock, no generated client id."""
        clock = any(step[-2].startswith("@") for step in self.steps)
        return not (self.sansio_only or clock or "auto-1" in self.what)

    def norm_steps(self) -> list[tuple[int, str, str | None]]:
        out: list[tuple[int, str, str | None]] = []
        seen: set[int] = set()
        for step in self.steps:
            conn, data, expect = step if len(step) == 3 else (0, *step)  # type: ignore[misc]
            if not self.raw and conn not in seen:
                out.append((conn, C5 if self.version == 5 else C4, None))
            seen.add(conn)
            out.append((conn, data, expect))
        return out

    def __str__(self) -> str:
        return f"{self.spec} {self.ids}: {self.what}"


def _published(events: list[Event]) -> list[p.Publish]:
    return [e.publish for e in events if isinstance(e, PublishReceived)]


def _disconnects(events: list[Event]) -> list[Disconnected]:
    return [e for e in events if isinstance(e, Disconnected)]


def _topics(*topics: str) -> Callable[[list[Event]], bool]:
    return lambda events: [pk.topic for pk in _published(events)] == list(topics)


def _count(n: int) -> Callable[[list[Event]], bool]:
    return lambda events: len(_published(events)) == n


def _will_due(due: bool) -> Callable[[list[Event]], bool]:
    return lambda events: _disconnects(events)[-1].will_due is due


def _props_kept(events: list[Event]) -> bool:
    (pk,) = _published(events)
    props = pk.properties
    assert props is not None
    return (props.response_topic, props.correlation_data, props.user_properties,
            props.content_type, props.payload_format_indicator,
            props.message_expiry_interval) == (
        "r/1", b"\x01\x02", [("b", "2"), ("a", "1")], "text", 1, 60)


def _connected(events: list[Event]) -> bool:
    return any(isinstance(e, Connected) for e in events)


V4, V5 = "3.1.1", "5.0"
PING = ("c0 00", "d0 00")
BIG_PAYLOAD = " 78" * 125

CASES: list[Case] = [
    # --- data representation (1.5) ---------------------------------------------------------
    Case(V4, "MQTT-1.5.3-1", "ill-formed UTF-8 in a topic closes",
         (("30 04 0001 ff 78", ""),), close=True),
    Case(V4, "MQTT-1.5.3-1", "a UTF-16 surrogate (U+D800) in a topic closes",
         (("30 06 0003 eda080 78", ""),), close=True),
    Case(V4, "MQTT-1.5.3-2", "U+0000 in a topic closes",
         (("30 06 0003 610062 78", ""),), close=True),
    Case(V4, "MQTT-1.5.3-3", "a BOM (EF BB BF) in a topic is kept, not stripped",
         (("30 07 0004 efbbbf61 78", ""),), check=_topics("\ufeffa")),
    Case(V4, "MQTT-2.2.3 (remaining length)", "a remaining length over 4 bytes closes",
         (("c0 ff ff ff ff 7f", ""),), close=True),
    Case(V4, "MQTT-1.5.5-1 (5.0 rule, applied alike)", "a non-minimal remaining length closes",
         (("c0 80 00", ""),), close=True),
    Case(V5, "MQTT-1.5.4-1", "ill-formed UTF-8 in a topic: DISCONNECT 0x81",
         (("30 05 0001 ff 00 78", "e0 01 81"),), close=True),
    Case(V5, "MQTT-1.5.4-1", "a UTF-16 surrogate in a topic: DISCONNECT 0x81",
         (("30 07 0003 eda080 00 78", "e0 01 81"),), close=True),
    Case(V5, "MQTT-1.5.4-2", "U+0000 in a topic: DISCONNECT 0x81",
         (("30 07 0003 610062 00 78", "e0 01 81"),), close=True),
    Case(V5, "MQTT-1.5.4-3", "a BOM in a topic is kept, not stripped",
         (("30 08 0004 efbbbf61 00 78", ""),), check=_topics("\ufeffa")),
    Case(V5, "MQTT-1.5.5-1", "PINGREQ with a non-minimal remaining length (80 00): 0x81",
         (("c0 80 00", "e0 01 81"),), close=True),
    Case(V5, "MQTT-1.5.5-1", "a non-minimal property length (80 00): 0x81",
         (("30 06 0001 74 8000 78", "e0 01 81"),), close=True),
    Case(V5, "MQTT-1.5.5-1", "a non-minimal property identifier (81 00 for 0x01): 0x81",
         (("30 08 0001 74 03 8100 00 78", "e0 01 81"),), close=True),
    Case(V5, "MQTT-1.5.7-1", "a user property name that is not UTF-8: 0x81",
         (("30 0c 0001 74 07 26 0001ff 000176 78", "e0 01 81"),), close=True),
    # --- fixed header (2.1 / 2.2) ----------------------------------------------------------
    Case(V4, "MQTT-2.2.2-1/2", "PINGREQ with reserved flags set closes",
         (("c1 00", ""),), close=True),
    Case(V4, "MQTT-2.2.2-2", "packet type 0 (reserved) closes", (("00 00", ""),), close=True),
    Case(V4, "MQTT-2.2.2-2", "packet type 15 (AUTH, 5.0 only) closes",
         (("f0 00", ""),), close=True),
    Case(V5, "MQTT-2.1.3-1", "PINGREQ with reserved flags set: 0x81",
         (("c1 00", "e0 01 81"),), close=True),
    Case(V5, "MQTT-2.1.3-1", "packet type 0 (reserved): 0x81",
         (("00 00", "e0 01 81"),), close=True),
    # --- packet identifiers (2.3 / 2.2.1) ----------------------------------------------------
    Case(V4, "MQTT-2.3.1-1", "QoS 1 PUBLISH with packet identifier 0 closes",
         (("32 06 0001 74 0000 78", ""),), close=True),
    Case(V4, "MQTT-2.3.1-6", "PUBACK carries the PUBLISH's packet identifier",
         (("32 06 0001 74 1234 78", "40 02 1234"),)),
    Case(V4, "MQTT-2.3.1-6", "PUBREC carries the PUBLISH's packet identifier",
         (("34 06 0001 74 abcd 78", "50 02 abcd"), ("62 02 abcd", "70 02 abcd"))),
    Case(V5, "MQTT-2.2.1-3", "QoS 1 PUBLISH with packet identifier 0: 0x81",
         (("32 07 0001 74 0000 00 78", "e0 01 81"),), close=True),
    Case(V5, "MQTT-2.2.1-5", "PUBACK / PUBREC / PUBCOMP carry the packet identifier",
         (("32 07 0001 74 1234 00 78", "40 02 1234"), ("34 07 0001 74 abcd 00 78", "50 02 abcd"),
          ("62 02 abcd", "70 02 abcd"))),
    # --- CONNECT (3.1) -----------------------------------------------------------------------
    Case(V4, "MQTT-3.1.0-1", "a first packet other than CONNECT closes, nothing sent",
         (("c0 00", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.0-1", "a PUBLISH before CONNECT closes",
         (("30 04 0001 74 78", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.0-2", "a second CONNECT closes", ((C4, ""),), close=True),
    Case(V4, "MQTT-3.1.2-1", "a wrong protocol name (MQTX) closes",
         (("10 0d 0004 4d515458 04 02 0000 0001 63", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-2", "protocol level 3 with MQTT: CONNACK 0x01, close",
         (("10 0d 0004 4d515454 03 02 0000 0001 63", "20 02 00 01"),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-2", "protocol level 6: CONNACK 0x01 (not 0x84), close",
         (("10 0d 0004 4d515454 06 02 0000 0001 63", "20 02 00 01"),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-2", "MQTT 3.1 (MQIsdp, level 3): CONNACK 0x01, close",
         (("10 0f 0006 4d5149736470 03 02 0000 0001 63", "20 02 00 01"),), close=True,
         raw=True),
    Case(V4, "MQTT-3.1.2-3", "the reserved connect flag set closes",
         (("10 0d 0004 4d515454 04 03 0000 0001 63", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-4/6, MQTT-3.2.2-1", "clean session: CONNACK session present 0",
         ((C4, CA4),), raw=True),
    Case(V4, "MQTT-3.1.2-4/5, MQTT-3.2.2-2/3", "clean session 0 resumes: session present 1",
         ((0, C4_KEEP, CA4), (0, "LOST", None), (1, C4_KEEP, "20 02 01 00")), raw=True),
    Case(V4, "MQTT-3.1.2-11/13", "will QoS 1 without the will flag closes",
         (("10 0d 0004 4d515454 04 0a 0000 0001 63", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-14", "will QoS 3 closes",
         (("10 12 0004 4d515454 04 1e 0000 0001 63 0001 77 0000", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-15", "will retain without the will flag closes",
         (("10 0d 0004 4d515454 04 22 0000 0001 63", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-9", "the will flag without will topic and message closes",
         (("10 0d 0004 4d515454 04 06 0000 0001 63", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-19", "the user name flag without a user name closes",
         (("10 0d 0004 4d515454 04 82 0000 0001 63", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-21", "the password flag without a password closes",
         (("10 10 0004 4d515454 04 c2 0000 0001 63 000175", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-22", "a password without a user name closes",
         (("10 0f 0004 4d515454 04 42 0000 0001 63 0000", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.2-24", "keep alive 10 s: closed after 15 s of silence, not before",
         (("10 0d 0004 4d515454 04 02 000a 0001 63", CA4), ("@114.9", ""), ("@115", "")),
         close=True, raw=True),
    Case(V4, "MQTT-3.1.2-23/24", "keep alive 0: never closed for silence",
         ((C4, CA4), ("@1000000", "")), raw=True),
    Case(V4, "MQTT-3.1.3-4, MQTT-1.5.3-1", "a client id that is not UTF-8 closes, no CONNACK",
         (("10 0d 0004 4d515454 04 02 0000 0001 ff", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.3-5", "a 23-character [0-9a-zA-Z] client id is accepted",
         (("10 23 0004 4d515454 04 02 0000 0017 "
           "30313233343536373839616263646566414243444546 47", CA4),), raw=True),
    Case(V4, "MQTT-3.1.3-6", "an empty client id with clean session is accepted",
         (("10 0c 0004 4d515454 04 02 0000 0000", CA4),), raw=True),
    Case(V4, "MQTT-3.1.3-8, MQTT-3.2.2-4/5", "empty client id, clean session 0: CONNACK 0x02",
         (("10 0c 0004 4d515454 04 00 0000 0000", "20 02 00 02"),), close=True, raw=True),
    Case(V4, "MQTT-3.1.3-10", "a will topic that is not UTF-8 closes",
         (("10 12 0004 4d515454 04 06 0000 0001 63 0001 ff 0000", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.3-10, MQTT-4.7.1-1", "a will topic with a wildcard closes",
         (("10 12 0004 4d515454 04 06 0000 0001 63 0001 23 0000", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.3-11", "a user name that is not UTF-8 closes",
         (("10 10 0004 4d515454 04 82 0000 0001 63 0001 ff", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.4-1", "a CONNECT with trailing bytes closes without CONNACK",
         (("10 0e 0004 4d515454 04 02 0000 0001 63 00", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.4-2", "a second connection with the same client id ends the first",
         ((0, C4, CA4), (1, C4, CA4), (0, "", "")), close=True, raw=True),
    Case(V4, "MQTT-3.1.4-5", "nothing after a refused CONNECT is processed",
         (("10 0d 0004 4d515454 04 06 0000 0001 63 c000", ""),), close=True, raw=True),
    Case(V4, "MQTT-3.1.4-5", "a PINGREQ after a refused CONNECT is not answered",
         (("10 0d 0004 4d515454 03 02 0000 0001 63 c000", "20 02 00 01"),), close=True,
         raw=True),
    Case(V4, "MQTT-3.2.0-1", "CONNACK goes before the answer to anything sent with CONNECT",
         ((C4 + " c000", CA4 + " d000"),), raw=True),
    # --- authentication (3.1.4, 3.2.2.3): the verdict is the I/O layer's, the codes are here --
    Case(V4, "3.2.2.3, MQTT-3.2.2-5", "bad user name or password: CONNACK 0x04, close",
         ((C4_USER, "20 02 00 04"),), close=True, raw=True, login=BAD_PASSWORD),
    Case(V4, "3.2.2.3, MQTT-3.2.2-5", "no credentials, anonymous off: CONNACK 0x05, close",
         ((C4, "20 02 00 05"),), close=True, raw=True, login=MISSING),
    Case(V4, "MQTT-3.1.4-5", "a PUBLISH pipelined behind a refused login is never processed",
         ((C4_USER + " 32 06 0001 74 0001 78 c000", "20 02 00 04"),), close=True, raw=True,
         login=BAD_PASSWORD, check=_count(0)),
    Case(V4, "MQTT-3.2.0-1 (login)", "a PUBLISH pipelined behind an accepted login: CONNACK, "
         "then its PUBACK",
         ((C4_USER + " 32 06 0001 74 0001 78", CA4 + " 40 02 0001"),), raw=True, login=ALICE,
         check=_topics("t")),
    # --- PUBLISH (3.3) ---------------------------------------------------------------------
    Case(V4, "MQTT-3.3.1-2", "QoS 0 with DUP set closes", (("38 04 0001 74 78", ""),),
         close=True),
    Case(V4, "MQTT-3.3.1-4", "QoS 3 closes", (("36 06 0001 74 0001 78", ""),), close=True),
    Case(V4, "MQTT-3.3.2-1", "a topic that is not UTF-8 closes",
         (("30 05 0002 c328 78", ""),), close=True),
    Case(V4, "MQTT-3.3.2-2, MQTT-4.7.1-1", "a topic with + closes",
         (("30 04 0001 2b 78", ""),), close=True),
    Case(V4, "MQTT-3.3.2-2, MQTT-4.7.1-1", "a topic with # closes",
         (("30 06 0003 612f23 78", ""),), close=True),
    Case(V4, "MQTT-4.7.3-1", "an empty topic closes", (("30 03 0000 78", ""),), close=True),
    Case(V4, "MQTT-4.7.3-2", "a topic with U+0000 closes",
         (("30 04 0001 00 78", ""),), close=True),
    Case(V4, "MQTT-3.3.4-1", "QoS 0: no answer; QoS 1: PUBACK; QoS 2: PUBREC",
         (("30 04 0001 74 78", ""), ("32 06 0001 74 0001 78", "40 02 0001"),
          ("34 06 0001 74 0002 78", "50 02 0002")), check=_count(3)),
    Case(V4, "MQTT-3.3.5-2", "a refused message (no rule) gets its positive ack, once",
         (("32 06 0001 74 0001 78", "40 02 0001"), ("34 06 0001 74 0002 78", "50 02 0002"),
          ("3c 06 0001 74 0002 78", "50 02 0002"), ("62 02 0002", "70 02 0002")),
         verdict=0x90, check=_count(2)),
    Case(V4, "MQTT-3.3.5-2 (or close)", "a message that cannot be taken now: close, no ack",
         (("32 06 0001 74 0001 78", ""),), verdict=0x89, retriable=True, close=True),
    Case(V4, "MQTT-3.3.5-2 (or close)", "QoS 2 not taken now: the retransmission is tried again",
         ((0, C4_KEEP, CA4), (0, "34 06 0001 74 0007 78", ""), (0, "LOST", None),
          (1, C4_KEEP, "20 02 01 00"), (1, "3c 06 0001 74 0007 78", "")),
         raw=True, verdict=0x89, retriable=True, close=True, check=_count(2)),
    # --- QoS flows (4.3) -------------------------------------------------------------------
    Case(V4, "MQTT-4.3.2-2", "after PUBACK the same packet id is a new message",
         (("32 06 0001 74 0001 78", "40 02 0001"), ("32 06 0001 74 0001 78", "40 02 0001")),
         check=_count(2)),
    Case(V4, "MQTT-4.3.3-2", "QoS 2: PUBREC; a duplicate before PUBREL is not delivered again; "
         "PUBCOMP; then the id is new",
         (("34 06 0001 74 0005 78", "50 02 0005"), ("3c 06 0001 74 0005 78", "50 02 0005"),
          ("62 02 0005", "70 02 0005"), ("34 06 0001 74 0005 78", "50 02 0005")),
         check=_count(2)),
    Case(V4, "MQTT-4.3.3-2", "PUBREL for an unknown packet id is answered with PUBCOMP",
         (("62 02 0009", "70 02 0009"),)),
    Case(V4, "MQTT-4.6.0-2/3 (as receiver)", "acks leave in the order the PUBLISHes came",
         (("32 06 0001 74 0003 78 34 06 0001 74 0001 78 32 06 0001 74 0002 78",
           "40 02 0003 50 02 0001 40 02 0002"),)),
    # --- PUBREL / PINGREQ / DISCONNECT -----------------------------------------------------
    Case(V4, "MQTT-3.6.1-1", "PUBREL with flags 0000 closes", (("60 02 0001", ""),), close=True),
    Case(V4, "MQTT-3.12.4-1", "PINGREQ is answered with PINGRESP", (PING,)),
    Case(V4, "MQTT-2.2.2-2 (PINGREQ)", "a PINGREQ with a body closes",
         (("c0 01 00", ""),), close=True),
    Case(V4, "MQTT-3.14.1-1", "DISCONNECT with reserved flags set closes",
         (("e1 00", ""),), close=True),
    Case(V4, "MQTT-3.14.4-3", "DISCONNECT: closed, the will is discarded",
         (("e0 00", ""),), close=True, check=_will_due(False)),
    Case(V4, "MQTT-3.1.2-8", "a connection lost without DISCONNECT: the will is due",
         (("LOST", None),), close=True, check=_will_due(True)),
    Case(V4, "MQTT-4.8.0-1", "a server-only packet (CONNACK) from the client closes",
         (("20 02 00 00", ""),), close=True),
    Case(V4, "MQTT-4.8.0-1", "a PUBACK from the client (the server sent no PUBLISH) closes",
         (("40 02 0001", ""),), close=True),
    Case(V4, "limits.max_packet_size", "a packet over the maximum size closes",
         (("30 82 01 0001 74" + " 78" * 127, ""),), close=True),

    # === MQTT 5.0 =================================================================================
    Case(V5, "MQTT-3.1.0-1, MQTT-3.14.0-1", "a first packet other than CONNECT: close, "
         "no DISCONNECT before CONNACK", (("c0 00", ""),), close=True, raw=True),
    Case(V5, "MQTT-3.1.0-2", "a second CONNECT: DISCONNECT 0x82", ((C5, "e0 01 82"),),
         close=True),
    Case(V5, "MQTT-3.1.2-1", "a wrong protocol name (MQTX) with level 5: CONNACK 0x84",
         (("10 10 0004 4d515458 05 02 0000 02 1700 0001 63", "20 03 00 84 00"),), close=True,
         raw=True),
    Case(V5, "MQTT-3.1.2-1", "a protocol name of another length (MQTTX): CONNACK 0x84",
         (("10 11 0005 4d51545458 05 02 0000 02 1700 0001 63", "20 03 00 84 00"),),
         close=True, raw=True),
    Case(V5, "MQTT-3.1.2-2", "protocol level 6: the 3.1.1 CONNACK 0x01 (see the 3.1.1 row)",
         (("10 10 0004 4d515454 06 02 0000 02 1700 0001 63", "20 02 00 01"),), close=True,
         raw=True),
    Case(V5, "MQTT-3.1.2-3", "the reserved connect flag: CONNACK 0x81, close",
         (("10 10 0004 4d515454 05 03 0000 02 1700 0001 63", "20 03 00 81 00"),), close=True,
         raw=True),
    Case(V5, "MQTT-3.1.2-4, MQTT-3.2.2-2", "clean start: session present 0",
         ((C5, CA5),), raw=True),
    Case(V5, "MQTT-3.1.2-5/23, MQTT-3.2.2-3", "clean start 0 within the expiry: present 1",
         ((0, C5_KEEP, CA5), (0, "LOST", None), (1, C5_KEEP, "20 14 01 00 11 " + CA5_PROPS)),
         raw=True),
    Case(V5, "MQTT-3.1.2-6", "clean start 0 without a stored session: present 0",
         ((C5_KEEP, CA5),), raw=True),
    Case(V5, "MQTT-3.1.2-9", "the will flag without will fields: CONNACK 0x81",
         (("10 10 0004 4d515454 05 06 0000 02 1700 0001 63", "20 03 00 81 00"),), close=True,
         raw=True),
    Case(V5, "MQTT-3.1.2-11", "will QoS 1 without the will flag: CONNACK 0x81",
         (("10 10 0004 4d515454 05 0a 0000 02 1700 0001 63", "20 03 00 81 00"),), close=True,
         raw=True),
    Case(V5, "MQTT-3.1.2-12", "will QoS 3: CONNACK 0x81",
         (("10 16 0004 4d515454 05 1e 0000 02 1700 0001 63 00 0001 77 0000",
           "20 03 00 81 00"),), close=True, raw=True),
    Case(V5, "MQTT-3.1.2-13", "will retain without the will flag: CONNACK 0x81",
         (("10 10 0004 4d515454 05 22 0000 02 1700 0001 63", "20 03 00 81 00"),), close=True,
         raw=True),
    Case(V5, "MQTT-3.2.2-9/12/13", "no Maximum QoS / Retain Available limit: a retained QoS 2 "
         "will is accepted",
         (("10 16 0004 4d515454 05 36 0000 02 1700 0001 63 00 0001 77 0000", CA5),), raw=True),
    Case(V5, "MQTT-3.1.2-17", "the user name flag without a user name: CONNACK 0x81",
         (("10 10 0004 4d515454 05 82 0000 02 1700 0001 63", "20 03 00 81 00"),), close=True,
         raw=True),
    Case(V5, "MQTT-3.1.2-19", "the password flag without a password: CONNACK 0x81",
         (("10 10 0004 4d515454 05 42 0000 02 1700 0001 63", "20 03 00 81 00"),), close=True,
         raw=True),
    Case(V5, "3.1.2.9", "5.0 allows a password without a user name",
         (("10 12 0004 4d515454 05 42 0000 02 1700 0001 63 0000", CA5),), raw=True),
    Case(V5, "MQTT-3.1.2-22", "keep alive 10 s: DISCONNECT 0x8D after 15 s, not before",
         (("10 10 0004 4d515454 05 02 000a 02 1700 0001 63", CA5), ("@114.9", ""),
          ("@115", "e0 01 8d")), close=True, raw=True),
    Case(V5, "MQTT-3.1.2-22", "keep alive 0: never closed for silence",
         ((C5, CA5), ("@1000000", "")), raw=True),
    Case(V5, "3.1.2.11.2", "clean start 0 without a Session Expiry: nothing kept (present 0)",
         ((0, "10 10 0004 4d515454 05 00 0000 02 1700 0001 63", CA5), (0, "LOST", None),
          (1, "10 10 0004 4d515454 05 00 0000 02 1700 0001 63", CA5)), raw=True),
    Case(V5, "MQTT-3.1.2-28", "Request Response Information 1: accepted, none is sent",
         (("10 12 0004 4d515454 05 02 0000 04 1700 1901 0001 63", CA5),), raw=True),
    Case(V5, "MQTT-3.1.2-24/25, MQTT-3.4.2-2", "the reason string is dropped to fit the "
         "client's Maximum Packet Size (5)",
         (("10 13 0004 4d515454 05 02 0000 05 27 00000005 0001 63", None),
          ("32 07 0001 74 0001 00 78", "40 03 0001 90")), raw=True, verdict=0x90),
    Case(V5, "MQTT-3.1.2-29", "Request Problem Information 1 (default): PUBACK has the reason",
         (("10 0e 0004 4d515454 05 02 0000 00 0001 63", None),
          ("32 07 0001 74 0001 00 78", "40 0e 0001 90 0a 1f 0007 6e6f2072756c65")),
         raw=True, verdict=0x90),
    Case(V5, "MQTT-3.1.2-29", "Request Problem Information 0: no reason string on PUBACK",
         (("32 07 0001 74 0001 00 78", "40 03 0001 90"),), verdict=0x90),
    Case(V5, "3.4.2.1", "a failure whose code no PUBACK may carry (0x89 busy) is sent as 0x80",
         (("32 07 0001 74 0001 00 78", "40 03 0001 80"),), verdict=0x89, retriable=True),
    Case(V5, "3.5.2.1", "... and on PUBREC (0x95 too large) as 0x80",
         (("34 07 0001 74 0001 00 78", "50 03 0001 80"),), verdict=0x95),
    Case(V5, "MQTT-3.1.3-4, MQTT-1.5.4-1", "a client id that is not UTF-8: CONNACK 0x81",
         (("10 10 0004 4d515454 05 02 0000 02 1700 0001 ff", "20 03 00 81 00"),), close=True,
         raw=True),
    Case(V5, "MQTT-3.1.3-5", "a 23-character [0-9a-zA-Z] client id is accepted",
         (("10 26 0004 4d515454 05 02 0000 02 1700 0017 "
           "30313233343536373839616263646566414243444546 47", CA5),), raw=True),
    Case(V5, "MQTT-3.1.3-6/7", "an empty client id gets one (auto-1) in the CONNACK",
         (("10 0f 0004 4d515454 05 02 0000 02 1700 0000",
           "20 1d 00 00 1a 12 0006 6175746f2d31 " + CA5_PROPS),), raw=True),
    Case(V5, "MQTT-3.1.3-11", "a will topic that is not UTF-8: CONNACK 0x81",
         (("10 16 0004 4d515454 05 06 0000 02 1700 0001 63 00 0001 ff 0000",
           "20 03 00 81 00"),), close=True, raw=True),
    Case(V5, "MQTT-3.1.3-11, MQTT-4.7.1-1", "a will topic with a wildcard: CONNACK 0x90",
         (("10 16 0004 4d515454 05 06 0000 02 1700 0001 63 00 0001 2b 0000",
           "20 03 00 90 00"),), close=True, raw=True),
    Case(V5, "MQTT-3.1.3-12", "a user name that is not UTF-8: CONNACK 0x81",
         (("10 13 0004 4d515454 05 82 0000 02 1700 0001 63 0001 ff", "20 03 00 81 00"),),
         close=True, raw=True),
    Case(V5, "3.1.3.2.3", "a will declared UTF-8 (format indicator 1) that is not: 0x99",
         (("10 19 0004 4d515454 05 06 0000 02 1700 0001 63 02 0101 0001 77 0001 ff",
           "20 03 00 99 00"),), close=True, raw=True),
    Case(V5, "MQTT-3.3.2-14 (will)", "a will Response Topic with a wildcard: CONNACK 0x82",
         (("10 1a 0004 4d515454 05 06 0000 02 1700 0001 63 04 08000123 0001 77 0000",
           "20 03 00 82 00"),), close=True, raw=True),
    Case(V5, "MQTT-3.1.4-1", "a CONNECT with trailing bytes: CONNACK 0x81",
         (("10 11 0004 4d515454 05 02 0000 02 1700 0001 63 00", "20 03 00 81 00"),),
         close=True, raw=True),
    Case(V5, "MQTT-3.1.4-1, 2.2.2.2", "a property CONNECT may not carry (Topic Alias): 0x81",
         (("10 13 0004 4d515454 05 02 0000 05 1700 230001 0001 63", "20 03 00 81 00"),),
         close=True, raw=True),
    Case(V5, "MQTT-3.1.4-1, 3.1.2.11", "a property given twice: CONNACK 0x82",
         (("10 12 0004 4d515454 05 02 0000 04 1700 1700 0001 63", "20 03 00 82 00"),),
         close=True, raw=True),
    Case(V5, "MQTT-3.1.4-1, 3.1.2.11.3", "Receive Maximum 0: CONNACK 0x82",
         (("10 13 0004 4d515454 05 02 0000 05 1700 210000 0001 63", "20 03 00 82 00"),),
         close=True, raw=True),
    Case(V5, "MQTT-3.1.4-1, 3.1.2.11.4", "Maximum Packet Size 0: CONNACK 0x82",
         (("10 15 0004 4d515454 05 02 0000 07 1700 2700000000 0001 63", "20 03 00 82 00"),),
         close=True, raw=True),
    Case(V5, "MQTT-3.1.4-1, 3.1.2.11.7", "Request Problem Information 2: CONNACK 0x82",
         (("10 10 0004 4d515454 05 02 0000 02 1702 0001 63", "20 03 00 82 00"),),
         close=True, raw=True),
    Case(V5, "MQTT-3.1.4-1, MQTT-1.5.5-1", "a non-minimal property length in CONNECT: 0x81",
         (("10 11 0004 4d515454 05 02 0000 8200 1700 0001 63", "20 03 00 81 00"),),
         close=True, raw=True),
    Case(V5, "3.2.2.2 (0x95)", "a CONNECT over the Maximum Packet Size: CONNACK 0x95",
         (("10 8a01 0004 4d515454 05 42 0000 02 1700 0001 63 0078" + " 00" * 120,
           "20 03 00 95 00"),), close=True, raw=True),
    Case(V5, "MQTT-4.12.0-1", "an unsupported Authentication Method: CONNACK 0x8C",
         (("10 14 0004 4d515454 05 02 0000 06 1700 15000178 0001 63", "20 03 00 8c 00"),),
         close=True, raw=True),
    Case(V5, "MQTT-3.1.4-3", "a second connection with the same client id: the first gets "
         "DISCONNECT 0x8E", ((0, C5, CA5), (1, C5, CA5), (0, "", "e0 01 8e")),
         close=True, raw=True),
    Case(V5, "3.2.2.2 (0x86), MQTT-3.2.2-7", "bad user name or password: CONNACK 0x86, close",
         ((C5_USER, "20 03 00 86 00"),), close=True, raw=True, login=BAD_PASSWORD),
    Case(V5, "3.2.2.2 (0x87), MQTT-3.2.2-7", "no credentials, anonymous off: CONNACK 0x87, "
         "close", ((C5, "20 03 00 87 00"),), close=True, raw=True, login=MISSING),
    Case(V5, "MQTT-3.1.4-6 (login)", "a PUBLISH pipelined behind a refused login is never "
         "processed", ((C5_USER + " 32 07 0001 74 0001 00 78 c000", "20 03 00 86 00"),),
         close=True, raw=True, login=BAD_PASSWORD, check=_count(0)),
    Case(V5, "MQTT-3.1.4-5 (login)", "a PUBLISH pipelined behind an accepted login: CONNACK, "
         "then its PUBACK",
         ((C5_USER + " 32 07 0001 74 0001 00 78", CA5 + " 40 02 0001"),), raw=True,
         login=ALICE, check=_topics("t")),
    Case(V5, "MQTT-3.1.4-6", "nothing after a refused CONNECT is processed",
         (("10 10 0004 4d515454 05 03 0000 02 1700 0001 63 c000", "20 03 00 81 00"),),
         close=True, raw=True),
    Case(V5, "MQTT-3.2.0-1/2", "CONNACK first, and only one",
         ((C5 + " c000", CA5 + " d000"), (C5, "e0 01 82")), close=True, raw=True),
    # --- PUBLISH -----------------------------------------------------------------------------
    Case(V5, "MQTT-3.3.1-2", "QoS 0 with DUP set: 0x81", (("38 05 0001 74 00 78", "e0 01 81"),),
         close=True),
    Case(V5, "MQTT-3.3.1-4", "QoS 3: 0x81", (("36 07 0001 74 0001 00 78", "e0 01 81"),),
         close=True),
    Case(V5, "MQTT-3.3.2-1", "a topic that is not UTF-8: 0x81",
         (("30 06 0002 c328 00 78", "e0 01 81"),), close=True),
    Case(V5, "MQTT-3.3.2-2, MQTT-4.7.0-1", "a topic with a wildcard: DISCONNECT 0x90",
         (("30 05 0001 2b 00 78", "e0 01 90"),), close=True),
    Case(V5, "MQTT-4.7.3-1, 3.3.2.3.4", "an empty topic without a Topic Alias: 0x82",
         (("30 04 0000 00 78", "e0 01 82"),), close=True),
    Case(V5, "MQTT-3.3.2-8/9/12", "Topic Alias 1 and 2 set and used", (
        ("30 08 0001 61 03 230001 78", ""), ("30 08 0001 62 03 230002 78", ""),
        ("30 07 0000 03 230002 78", ""), ("30 07 0000 03 230001 78", "")),
        check=_topics("a", "b", "b", "a")),
    Case(V5, "3.3.2.3.4", "a Topic Alias mapping can be replaced",
         (("30 08 0001 61 03 230001 78", ""), ("30 08 0001 62 03 230001 78", ""),
          ("30 07 0000 03 230001 78", "")), check=_topics("a", "b", "b")),
    Case(V5, "MQTT-3.3.2-8", "Topic Alias 0: DISCONNECT 0x94",
         (("30 08 0001 74 03 230000 78", "e0 01 94"),), close=True),
    Case(V5, "MQTT-3.3.2-9/10", "a Topic Alias over the server's maximum (2): 0x94",
         (("30 08 0001 74 03 230003 78", "e0 01 94"),), close=True),
    Case(V5, "3.3.2.3.4", "an empty topic with an alias never set: 0x82",
         (("30 07 0000 03 230001 78", "e0 01 82"),), close=True),
    Case(V5, "MQTT-3.3.2-7", "Topic Alias mappings do not survive the connection",
         ((0, C5_KEEP, CA5), (0, "30 08 0001 74 03 230001 78", ""), (0, "LOST", None),
          (1, C5_KEEP, None), (1, "30 07 0000 03 230001 78", "e0 01 82")),
         close=True, raw=True),
    Case(V5, "MQTT-3.3.2-13", "a Response Topic that is not UTF-8: 0x81",
         (("30 09 0001 74 04 080001ff 78", "e0 01 81"),), close=True),
    Case(V5, "MQTT-3.3.2-14", "a Response Topic with +: DISCONNECT 0x82",
         (("30 0b 0001 74 06 080003612f2b 78", "e0 01 82"),), close=True),
    Case(V5, "MQTT-3.3.2-14", "a Response Topic with # (QoS 1: no PUBACK): DISCONNECT 0x82",
         (("32 0d 0001 74 0001 06 080003612f23 78", "e0 01 82"),), close=True),
    Case(V5, "MQTT-3.3.2-19", "a Content Type that is not UTF-8: 0x81",
         (("30 09 0001 74 04 030001ff 78", "e0 01 81"),), close=True),
    Case(V5, "MQTT-3.3.2-4/15/16/17/18/20", "payload format, expiry, Response Topic, "
         "Correlation Data, Content Type and user properties (in order) reach the application",
         (("30 2c 0001 74 27 08000372 2f31 0900020102 2600016200 0132 2600016100 0131 "
           "030004746578 74 0101 020000003c 78", ""),), check=_props_kept),
    Case(V5, "MQTT-3.3.4-6", "a PUBLISH with a Subscription Identifier: DISCONNECT 0x82",
         (("30 07 0001 74 02 0b01 78", "e0 01 82"),), close=True),
    Case(V5, "MQTT-3.3.4-6", "QoS 1 with a Subscription Identifier: no PUBACK, 0x82",
         (("32 09 0001 74 0001 02 0b01 78", "e0 01 82"),), close=True),
    Case(V5, "MQTT-3.3.4-7, 4.9", "a third unacknowledged QoS 1 over Receive Maximum 2: 0x93",
         (("32 07 0001 74 0001 00 78 32 07 0001 74 0002 00 78 32 07 0001 74 0003 00 78",
           "e0 01 93"),), close=True, verdict=None, sansio_only=True),
    Case(V5, "MQTT-3.3.4-7, 4.9", "QoS 0 does not count against Receive Maximum",
         (("30 05 0001 74 00 78 30 05 0001 74 00 78 30 05 0001 74 00 78", ""),),
         verdict=None, sansio_only=True, check=_count(3)),
    Case(V5, "3.3.2.3.2 (0x99)", "QoS 0 declared UTF-8 but not: DISCONNECT 0x99",
         (("30 07 0001 74 02 0101 ff", "e0 01 99"),), close=True),
    Case(V5, "3.3.2.3.2 (0x99)", "QoS 1 declared UTF-8 but not: PUBACK 0x99, not delivered",
         (("32 09 0001 74 0001 02 0101 ff", "40 03 0001 99"),), check=_count(0)),
    Case(V5, "3.3.2.3.2", "a declared UTF-8 payload may hold U+0000",
         (("32 09 0001 74 0001 02 0101 00", "40 02 0001"),), check=_count(1)),
    Case(V5, "2.2.2.2", "a property PUBLISH may not carry (Session Expiry): 0x81",
         (("30 0a 0001 74 05 110000000a 78", "e0 01 81"),), close=True),
    Case(V5, "2.2.2.2", "a property given twice (Payload Format Indicator): 0x82",
         (("30 09 0001 74 04 0100 0100 78", "e0 01 82"),), close=True),
    Case(V5, "3.3.2.3.2", "Payload Format Indicator 2: 0x82",
         (("30 07 0001 74 02 0102 78", "e0 01 82"),), close=True),
    Case(V5, "MQTT-3.1.2-24 (server side), 3.2.2.3.6", "a PUBLISH over the Maximum Packet "
         "Size (128): DISCONNECT 0x95", (("30 81 01 0001 74 00" + BIG_PAYLOAD, "e0 01 95"),),
         close=True),
    # --- acks and QoS flows ---------------------------------------------------------------------
    Case(V5, "MQTT-3.3.4-1, MQTT-4.3.2-4, MQTT-4.3.3-8", "QoS 0: nothing; QoS 1: PUBACK; "
         "QoS 2: PUBREC",
         (("30 05 0001 74 00 78", ""), ("32 07 0001 74 0001 00 78", "40 02 0001"),
          ("34 07 0001 74 0002 00 78", "50 02 0002")), check=_count(3)),
    Case(V5, "MQTT-3.4.2-1", "a refused QoS 1 message: PUBACK with the reason code",
         (("32 07 0001 74 0001 00 78", "40 03 0001 90"),), verdict=0x90),
    Case(V5, "MQTT-3.5.2-1, MQTT-4.3.3-9", "a refused QoS 2 message: PUBREC 0x90, and the "
         "id is new again",
         (("34 07 0001 74 0001 00 78", "50 03 0001 90"),
          ("34 07 0001 74 0001 00 78", "50 03 0001 90")), verdict=0x90, check=_count(2)),
    Case(V5, "MQTT-4.3.2-5", "after PUBACK the same packet id is a new message",
         (("32 07 0001 74 0001 00 78", "40 02 0001"), ("3a 07 0001 74 0001 00 78", "40 02 0001")),
         check=_count(2)),
    Case(V5, "MQTT-4.3.3-10/11/12", "QoS 2: a duplicate before PUBREL gets PUBREC and is not "
         "delivered; PUBREL -> PUBCOMP; then the id is new",
         (("34 07 0001 74 0005 00 78", "50 02 0005"), ("3c 07 0001 74 0005 00 78", "50 02 0005"),
          ("62 02 0005", "70 02 0005"), ("34 07 0001 74 0005 00 78", "50 02 0005")),
         check=_count(2)),
    Case(V5, "MQTT-4.3.3-10", "an unreleased QoS 2 id survives a reconnect: not delivered twice",
         ((0, C5_KEEP, CA5), (0, "34 07 0001 74 0005 00 78", "50 02 0005"), (0, "LOST", None),
          (1, C5_KEEP, None), (1, "3c 07 0001 74 0005 00 78", "50 02 0005"),
          (1, "62 02 0005", "70 02 0005")), raw=True, check=_count(1)),
    Case(V5, "4.3.3 (receiver)", "PUBREL before the PUBREC was sent: DISCONNECT 0x82",
         (("34 07 0001 74 0004 00 78", ""), ("62 02 0004", "e0 01 82")), close=True,
         verdict=None),
    Case(V5, "MQTT-3.7.2-1", "PUBREL for an unknown id: PUBCOMP 0x92",
         (("62 02 0009", "70 03 0009 92"),)),
    Case(V5, "MQTT-3.6.1-1", "PUBREL with flags 0000: 0x81", (("60 02 0001", "e0 01 81"),),
         close=True),
    Case(V5, "MQTT-3.6.2-1", "PUBREL with a reason code PUBREL cannot have (0x10): 0x81",
         (("62 03 0001 10", "e0 01 81"),), close=True),
    Case(V5, "MQTT-4.6.0-2/3 (as receiver)", "acks leave in the order the PUBLISHes came",
         (("32 07 0001 74 0003 00 78 34 07 0001 74 0001 00 78", "40 02 0003 50 02 0001"),)),
    Case(V5, "3.4 (server as receiver)", "a PUBACK from the client (no downlink): 0x82",
         (("40 02 0001", "e0 01 82"),), close=True),
    # --- PINGREQ / DISCONNECT / AUTH -------------------------------------------------------------
    Case(V5, "MQTT-3.12.4-1", "PINGREQ is answered with PINGRESP", (PING,)),
    Case(V5, "MQTT-2.1.3-1 (PINGREQ)", "a PINGREQ with a body: 0x81",
         (("c0 01 00", "e0 01 81"),), close=True),
    Case(V5, "MQTT-3.14.1-1", "DISCONNECT with reserved flags: 0x81",
         (("e1 00", "e0 01 81"),), close=True),
    Case(V5, "MQTT-3.14.2-1", "DISCONNECT with a reason code it cannot have (0x05): 0x81",
         (("e0 01 05", "e0 01 81"),), close=True),
    Case(V5, "MQTT-3.14.4-3", "DISCONNECT 0x00: closed, the will is discarded",
         (("e0 01 00", ""),), close=True, check=_will_due(False)),
    Case(V5, "3.14.2.1", "DISCONNECT 0x04: closed, the will is due",
         (("e0 01 04", ""),), close=True, check=_will_due(True)),
    Case(V5, "3.14.2.2.2", "DISCONNECT setting a Session Expiry after CONNECT said 0: 0x82",
         (("e0 07 00 05 110000003c", "e0 01 82"),), close=True),
    Case(V5, "4.12", "AUTH without an Authentication Method in CONNECT: 0x82",
         (("f0 00", "e0 01 82"),), close=True),
    Case(V5, "MQTT-4.13.1-1", "a CONNACK from the client: DISCONNECT 0x82, close",
         (("20 03 00 00 00", "e0 01 82"),), close=True),
]

# Publish-side statements with no row, and why.
OUT_OF_SCOPE: dict[str, str] = {
    "MQTT-3.3.1-5..12 (retain)": "retained messages are not stored: the gateway forwards the "
    "retain flag to the pipeline; there are no subscribers to deliver them to",
    "MQTT-3.3.2-3/5/6, MQTT-3.3.4-2..5/8..10": "server-to-client PUBLISH (downlink) is not built",
    "MQTT-3.1.2-21/26/27/28, MQTT-3.2.2-21/22": "the server never sends Topic Alias, Response "
    "Information or a PUBLISH; Server Keep Alive is covered in test_mqtt_session",
    "MQTT-3.1.2-7/10, MQTT-3.1.3-9/10": "the will is kept and reported (Disconnected.will_due) "
    "but not yet published (presence is a later feature)",
    "MQTT-4.3.3-13": "message expiry is not applied inbound: the sequence always completes",
    "MQTT-4.7.3-3": "a 2-byte length cannot announce more than 65535 bytes",
    "MQTT-1.5.4-1/3 (sender side), MQTT-3.3.1-1/3, MQTT-4.3.x-1..3 (sender)": "obligations of "
    "the sender; the server sends no PUBLISH",
    "MQTT-3.8..3.11 (SUBSCRIBE / UNSUBSCRIBE)": "downlink; test_mqtt_session checks the polite "
    "refusal",
}


# --- the sans-IO runner --------------------------------------------------------------------


def run_sansio(case: Case) -> None:
    store = SessionStore()
    sessions: dict[int, MqttSession] = {}
    pending: dict[int, bytearray] = {}
    events: list[Event] = []
    last = 0
    for conn, data, expect in case.norm_steps():
        last = conn
        session = sessions.get(conn)
        if session is None:
            session = sessions[conn] = MqttSession(LIMITS, store, NOW,
                                                   new_client_id=lambda: "auto-1",
                                                   authenticate=case.login is not None)
            pending[conn] = bytearray()
        if data == "LOST":
            new = session.connection_lost(NOW)
        elif data.startswith("@"):
            new = session.expire(float(data[1:]))
        else:
            new = session.receive_data(bytes.fromhex(data.replace(" ", "")), NOW)
        pending[conn] += session.data_to_send()
        i = 0
        while i < len(new):  # what the verdicts cause is handled too
            event = new[i]
            i += 1
            if isinstance(event, AuthRequested):
                assert case.login is not None
                new += session.authenticated(case.login, NOW)
                pending[conn] += session.data_to_send()
            elif isinstance(event, PublishReceived) and case.verdict is not None:
                reason = "no rule" if case.verdict else None
                new += session.ack(event.token, case.verdict, reason, retriable=case.retriable)
                pending[conn] += session.data_to_send()
            elif isinstance(event, Connected):
                # The server's registry: a second connection of a client id ends the first.
                for other, old in sessions.items():
                    if other != conn and old.client_id == event.client_id and not old.closing:
                        new += old.takeover()
                        pending[other] += old.data_to_send()
        events += new
        if expect is not None:
            assert pending[conn].hex() == expect.replace(" ", ""), (conn, data)
        pending[conn].clear()
    assert sessions[last].closing is case.close
    if not case.close:  # still alive, and nothing left unsaid
        assert sessions[last].receive_data(b"\xc0\x00", NOW) == []
        assert sessions[last].data_to_send() == b"\xd0\x00"
    if case.check is not None:
        assert case.check(events), events


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conformance(case: Case) -> None:
    run_sansio(case)


def test_the_table_covers_both_versions_and_every_packet_the_server_reads() -> None:
    first_bytes = {bytes.fromhex(step[-2].replace(" ", "")[:2])[0] >> 4
                   for case in CASES for step in case.norm_steps()
                   if step[-2] and step[-2][0] not in "L@"}
    assert first_bytes >= {p.CONNECT, p.CONNACK, p.PUBLISH, p.PUBACK, p.PUBREL, p.PINGREQ,
                           p.DISCONNECT, p.AUTH, 0}
    assert {c.spec for c in CASES} == {V4, V5}
    assert len({str(c) for c in CASES}) == len(CASES)  # every row says what it checks
