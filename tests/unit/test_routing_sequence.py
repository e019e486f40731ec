"""Sequence stamps (issue 14, docs/rules.md "Sequence stamps"): ``kafka.sequence: true``
adds lastmile-client-id, and for MQTT lastmile-session and lastmile-seq, drawn from the
client session's counter, which lives in the session store so a resumed session
continues it and a new session starts again at 1 under a new session id."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ReservedHeader
from gateway.model import Message, Record, Sequence
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import encode
from gateway.protocols.mqtt.events import MqttLimits, PublishReceived
from gateway.protocols.mqtt.session import MqttSession
from gateway.protocols.mqtt.store import SessionStore
from gateway.routing import Router, load_rules
from gateway.routing.rules import RulesError

pytestmark = pytest.mark.unit

RULES = """
rules:
  - name: alarms
    match: "alarms/#"
    continue: true
    kafka: {topic: alarms, sequence: true}
  - name: alarms-all
    match: "alarms/#"
    continue: true
    kafka: {topic: everything, sequence: true, headers: {src: "{source}"}}
  - name: alarms-plain
    match: "alarms/#"
    kafka: {topic: plain}
  - name: telemetry
    match: "telemetry/#"
    kafka: {topic: telemetry}
  - name: quiet
    match: "quiet/#"
    action: drop
  - name: refused
    match: "refused/#"
    action: reject
"""


def _router(tmp_path: Path, text: str = RULES) -> Router:
    (tmp_path / "10-rules.yaml").write_text(text)
    return Router(load_rules(tmp_path))


def _stamps(record: Record) -> dict[str, str]:
    return {n: v.decode() for n, v in record.headers if n.startswith("lastmile-")}


def _msg(topic: str, seq: Sequence | None, source: str = "mqtt", **kw: object) -> Message:
    return Message(source=source, topic=topic, payload=b"x", client_id="dev-1",
                   sequence=seq, **kw)  # type: ignore[arg-type]


def test_stamps_only_records_of_sequence_rules_one_number_per_message(tmp_path: Path) -> None:
    router = _router(tmp_path)
    seq = Sequence()
    first = router.route(_msg("alarms/hot", seq)).records
    assert [r.topic for r in first] == ["alarms", "everything", "plain"]
    a, b, plain = (_stamps(r) for r in first)
    assert a == b  # one number per message, on every stamped record of it
    assert a["lastmile-client-id"] == "dev-1" and a["lastmile-seq"] == "1"
    assert len(a["lastmile-session"]) == 20
    assert plain == {}
    # The rule's own headers stay; the stamps come after them.
    assert [n for n, _ in first[1].headers] == [
        "src", "lastmile-client-id", "lastmile-session", "lastmile-seq"]
    again = router.route(_msg("alarms/hot", seq)).records
    assert _stamps(again[0])["lastmile-seq"] == "2"
    assert _stamps(again[0])["lastmile-session"] == a["lastmile-session"]


def test_unstamped_and_refused_messages_draw_no_number(tmp_path: Path) -> None:
    router = _router(tmp_path)
    seq = Sequence()
    assert _stamps(router.route(_msg("telemetry/x", seq)).records[0]) == {}
    assert router.route(_msg("quiet/x", seq)).dropped
    assert router.route(_msg("refused/x", seq)).error is not None
    forged = router.route(_msg("alarms/x", seq, headers=[("Lastmile-Seq", b"7")]))
    assert isinstance(forged.error, ReservedHeader)  # a client cannot forge a stamp
    assert seq.last == 0
    assert _stamps(router.route(_msg("alarms/x", seq)).records[0])["lastmile-seq"] == "1"


def test_http_gets_the_client_id_but_no_session_or_number(tmp_path: Path) -> None:
    router = _router(tmp_path)
    record = router.route(_msg("alarms/x", None, source="http")).records[0]
    assert _stamps(record) == {"lastmile-client-id": "dev-1"}


def test_counters_are_per_session(tmp_path: Path) -> None:
    router = _router(tmp_path)
    one, two = Sequence(), Sequence()
    for _ in range(3):
        router.route(_msg("alarms/x", one))
    record = router.route(_msg("alarms/x", two)).records[0]
    assert _stamps(record)["lastmile-seq"] == "1"
    assert one.session != two.session and one.last == 3


def test_a_stamp_header_in_kafka_headers_is_a_load_error(tmp_path: Path) -> None:
    bad = 'rules:\n  - {name: r, match: "a/#", kafka: {topic: t, sequence: true, ' \
          'headers: {lastmile-seq: "{qos}"}}}\n'
    with pytest.raises(RulesError, match="reserved for the gateway"):
        _router(tmp_path, bad)


# --- the counter in the MQTT session state ----------------------------------------------


def _connect(store: SessionStore, client_id: str, *, clean: bool, version: int = 4,
             now: float = 0.0) -> tuple[MqttSession, bool]:
    session = MqttSession(MqttLimits(), store, now)
    session.receive_data(encode(p.Connect(protocol_level=version, client_id=client_id,
                                          clean_start=clean), version), now)
    connack = session.data_to_send()
    return session, connack[2] == 1


def _publish(session: MqttSession, packet_id: int, qos: int = 1, dup: bool = False) -> Sequence:
    events = session.receive_data(encode(p.Publish(
        topic="alarms/x", payload=b"x", qos=qos, packet_id=packet_id, dup=dup), 4), 0.0)
    received = [e for e in events if isinstance(e, PublishReceived)]
    assert len(received) == 1
    assert received[0].sequence is not None
    return received[0].sequence


def _draw(router: Router, seq: Sequence) -> tuple[str, int]:
    stamps = _stamps(router.route(_msg("alarms/x", seq)).records[0])
    return stamps["lastmile-session"], int(stamps["lastmile-seq"])


def test_resumed_session_continues_clean_start_restarts(tmp_path: Path) -> None:
    router = _router(tmp_path)
    store = SessionStore()
    session, present = _connect(store, "dev-1", clean=False)
    assert not present
    first = [_draw(router, _publish(session, i)) for i in (1, 2, 3)]
    sid = first[0][0]
    assert first == [(sid, 1), (sid, 2), (sid, 3)]
    session.connection_lost(0.0)
    # Clean session 0, session present 1: the same session id, the count goes on.
    session, present = _connect(store, "dev-1", clean=False)
    assert present
    assert _draw(router, _publish(session, 4)) == (sid, 4)
    session.connection_lost(0.0)
    # Clean start: a new session, a new id, from 1 again.
    session, present = _connect(store, "dev-1", clean=True)
    assert not present
    new_sid, n = _draw(router, _publish(session, 5))
    assert (n, new_sid != sid) == (1, True)


def test_takeover_by_a_resuming_connection_continues(tmp_path: Path) -> None:
    router = _router(tmp_path)
    store = SessionStore()
    old, _ = _connect(store, "dev-1", clean=False)
    sid, _ = _draw(router, _publish(old, 1))
    new, present = _connect(store, "dev-1", clean=False)  # while the old one is connected
    assert present
    assert _draw(router, _publish(new, 2)) == (sid, 2)


def test_a_qos2_retransmission_draws_no_new_number(tmp_path: Path) -> None:
    router = _router(tmp_path)
    store = SessionStore()
    session, _ = _connect(store, "dev-1", clean=False)
    sid, n = _draw(router, _publish(session, 9, qos=2))
    session.connection_lost(0.0)
    session, _ = _connect(store, "dev-1", clean=False)
    events = session.receive_data(encode(p.Publish(
        topic="alarms/x", payload=b"x", qos=2, packet_id=9, dup=True), 4), 0.0)
    assert not [e for e in events if isinstance(e, PublishReceived)]  # never produced twice
    assert _draw(router, _publish(session, 10, qos=2)) == (sid, n + 1)


def test_the_stamp_counter_survives_release_with_nothing_else_held() -> None:
    # A session whose counter is used is kept whole (the counter must survive), one that
    # never stamped is kept as an id and an expiry only, as before.
    store = SessionStore()
    used, _ = _connect(store, "used", clean=False)
    _publish(used, 1).next()
    used.connection_lost(0.0)
    idle, _ = _connect(store, "idle", clean=False)
    _publish(idle, 1)
    idle.connection_lost(0.0)
    assert "used" in store._states and "idle" not in store._states
    assert store.retained == 2


def test_rules_test_shows_the_stamps_of_a_first_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.routing.cli_rules import rules_test

    (tmp_path / "10-rules.yaml").write_text(RULES)
    assert rules_test(str(tmp_path), "alarms/x", None, "dev-9", None, "mqtt", 1, False) == 0
    headers = [line.split(": ", 1) for line in capsys.readouterr().out.splitlines()
               if line.startswith("  header lastmile-")]
    # Two stamped records (the fan-out), one number.
    assert [(n, v) for n, v in headers if n != "  header lastmile-session"] == [
        ("  header lastmile-client-id", "dev-9"), ("  header lastmile-seq", "1")] * 2
    assert rules_test(str(tmp_path), "alarms/x", None, "dev-9", None, "http", 1, False) == 0
    out = capsys.readouterr().out
    assert "lastmile-client-id: dev-9" in out and "lastmile-seq" not in out
