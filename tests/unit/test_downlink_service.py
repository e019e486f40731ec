"""The wired downlink's loop-side pieces without a socket: batches, rewinds, the state file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.downlink.outbound import Outgoing
from gateway.downlink.record import ConsumedRecord
from gateway.downlink.service import Downlink
from gateway.downlink.subscriptions import Options, parse_filter
from gateway.routing import load_rules
from gateway.routing.downlink import DownlinkRules

pytestmark = pytest.mark.unit

RULES = """\
downlink:
  - {name: commands, kafka: {topic: commands}, mqtt: {topic: "cmd/{key}", qos: 1}}
"""


@pytest.fixture
def rules(tmp_path: Path) -> DownlinkRules:
    (tmp_path / "60-downlink.yaml").write_text(RULES)
    return load_rules(tmp_path).downlink


def _rec(offset: int) -> ConsumedRecord:
    return ConsumedRecord(topic="commands", partition=0, offset=offset, key=b"dev-1", value=b"X")


def test_a_partition_that_goes_back_is_followed(rules: DownlinkRules) -> None:
    async def run() -> dict[tuple[str, int], int]:
        service = Downlink(lambda: rules)
        service.on_batch([_rec(5), _rec(6)], lambda _r: False)
        service.on_batch([_rec(3)], lambda _r: False)  # librdkafka reset the position
        return service.committable("default")

    assert asyncio.run(run()) == {("commands", 0): 4}


def test_persistent_subscriptions_come_back_offline_from_the_state_file(
        rules: DownlinkRules, tmp_path: Path) -> None:
    state = tmp_path / "downlink-sessions-w0.json"

    async def save() -> None:
        service = Downlink(lambda: rules)
        service.state_file = state
        service.trie.subscribe("keeper", parse_filter("cmd/+"), Options(1), 7)
        service.trie.subscribe("fleeting", parse_filter("cmd/#"), Options(1))
        service._changed("keeper", 300)
        service._changed("fleeting", 0)  # ends with its connection: not kept
        service.save_state()

    async def load() -> tuple[int, list[str], int]:
        service = Downlink(lambda: rules)
        loaded = service.load_state(state)
        service.on_batch([_rec(0)], lambda _r: False)
        subs = [f"{s.filter.text} {s.options.qos} {s.identifier}"
                for s in service.trie.subscriptions("keeper")]
        return loaded, subs, len(service.flows["keeper"].queue)

    asyncio.run(save())
    assert asyncio.run(load()) == (1, ["cmd/+ 1 7"], 1)  # the record waits for it offline


# --- a session moving to another worker (give / take; the registry carries the bytes) ----

def _value(offset: int) -> ConsumedRecord:
    return ConsumedRecord(topic="commands", partition=0, offset=offset, key=b"dev-1",
                          value=str(offset).encode())


class _Consumer:
    """What the handover reads of a DownlinkConsumer: where fan-out started, commits."""

    cluster = "default"

    def __init__(self) -> None:
        self.fanout_start = {("commands", 0): 0}
        self.commits: list[dict[tuple[str, int], int]] = []

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        self.commits.append(dict(offsets))


def _worker(rules: DownlinkRules) -> Downlink:
    service = Downlink(lambda: rules)
    service.consumers.append(_Consumer())  # type: ignore[arg-type]
    return service


def _session(cid: str) -> Any:
    return SimpleNamespace(client_id=cid, version=4, client_receive_maximum=65535,
                           expiry_interval=300)


def _subscribe(service: Downlink, cid: str) -> None:
    service.trie.subscribe(cid, parse_filter("cmd/+"), Options(1), None)
    service._changed(cid, 300)
    service._flow(_session(cid))


def _queued(service: Downlink, cid: str) -> list[bytes]:
    flow = service.flows[cid]
    return [m.payload for m in [*flow.inflight.values(), *flow.queue]]


@pytest.mark.parametrize(("a_has", "b_has"), [(2, 4), (3, 1)])
def test_a_session_taken_over_gets_each_record_once_in_order(
        rules: DownlinkRules, a_has: int, b_has: int) -> None:
    """Old owner A and new owner B each consumed a different part of the partition when
    B asked: A lets go once it is where B was; B keeps what it fans out meanwhile and
    skips what A had queued.  Offsets: A no longer holds them, B does."""
    async def run() -> None:
        a, b = _worker(rules), _worker(rules)
        a.hold_after_handover = 0.05
        _subscribe(a, "dev")
        a.on_batch([_value(n) for n in range(a_has)], lambda _r: False)
        b.on_batch([_value(n) for n in range(b_has)], lambda _r: False)
        want = b.begin_take("dev")
        assert want == [["default", "commands", 0, b_has]]
        b.on_batch([_value(b_has)], lambda _r: False)  # meanwhile: kept for "dev"
        given: list[bytes | None] = []
        a.give("dev", want, given.append)
        if a_has < b_has:
            assert given == []  # A waits for its consumer to reach B's position
            a.on_batch([_value(n) for n in range(a_has, b_has)], lambda _r: False)
        assert len(given) == 1 and given[0] is not None
        assert "dev" not in a.flows and not a.trie.subscriptions("dev")
        assert a.committable("default") == {("commands", 0): 0}  # until B has committed
        for _ in range(500):
            if a.committable("default") != {("commands", 0): 0}:
                break
            await asyncio.sleep(0.01)
        assert a.committable("default") == {("commands", 0): max(a_has, b_has)}
        b.take(_session("dev"), given[0])
        b.on_batch([_value(n) for n in range(b_has + 1, 6)], lambda _r: False)
        assert _queued(b, "dev") == [str(n).encode() for n in range(6)]
        assert b.committable("default") == {("commands", 0): 0}  # below what B consumed
        flow = b.flows["dev"]
        for message in flow.pull():
            flow.on_puback(message.packet_id)
        assert b.committable("default") == {("commands", 0): 6}

    asyncio.run(run())


def test_a_restart_finds_sessions_in_the_other_workers_state_files(tmp_path: Path) -> None:
    from gateway.downlink.service import other_sessions

    (tmp_path / "downlink-sessions-w0.json").write_text(
        '{"mine": {"expiry": 300, "until": null, "subs": []}}')
    (tmp_path / "downlink-sessions-w1.json").write_text(
        '{"there": {"expiry": 300, "until": null, "subs": []},'
        ' "gone": {"expiry": 1, "until": 1.0, "subs": []}}')
    (tmp_path / "downlink-sessions-w2.json").write_text("not json")
    (tmp_path / "downlink-sessions-w3.json").write_text(
        '{"worker-gone": {"expiry": 300, "until": null, "subs": []}}')
    assert other_sessions(tmp_path, 0, 3) == {"there": 1}


def test_drops_of_an_ended_session_stay_counted(rules: DownlinkRules) -> None:
    async def run() -> tuple[int, int]:
        service = Downlink(lambda: rules, queue_limit=2)
        _subscribe(service, "slow")
        service.on_batch([_value(n) for n in range(5)], lambda _r: False)
        before = service.dropped
        service._end("slow")
        return before, service.dropped

    assert asyncio.run(run()) == (3, 3)


def test_a_subscribe_served_before_the_session_arrived_is_kept(rules: DownlinkRules) -> None:
    """A SUBSCRIBE pipelined behind the CONNECT reaches the new owner first: its
    subscription stays, the old owner's queue goes before what it queued."""
    async def run() -> tuple[list[str], list[bytes]]:
        a, b = _worker(rules), _worker(rules)
        _subscribe(a, "dev")
        a.on_batch([_value(0), _value(1)], lambda _r: False)
        b.trie.subscribe("dev", parse_filter("cmd/#"), Options(1), None)
        b._flow(_session("dev")).enqueue(Outgoing("cmd/x", b"retained", 1))
        given: list[bytes | None] = []
        a.give("dev", None, given.append)
        b.take(_session("dev"), given[0])
        return (sorted(s.filter.text for s in b.trie.subscriptions("dev")),
                _queued(b, "dev"))

    assert asyncio.run(run()) == (["cmd/#", "cmd/+"], [b"0", b"1", b"retained"])


def test_a_client_back_before_the_old_owner_let_go_keeps_its_session(
        rules: DownlinkRules) -> None:
    async def run() -> tuple[list[bytes | None], list[bytes]]:
        a = _worker(rules)
        _subscribe(a, "dev")
        a.on_batch([_value(0)], lambda _r: False)
        given: list[bytes | None] = []
        a.give("dev", [["default", "commands", 0, 5]], given.append)  # A is behind: waits
        a.begin_take("dev")  # the client is back on A meanwhile
        a.take(_session("dev"), None)  # the other worker had nothing for it
        return given, _queued(a, "dev")

    assert asyncio.run(run()) == ([None], [b"0"])


# --- subscriptions made while the replay refills the retained store ---------------------

RETAINED_RULES = """\
downlink:
  - {name: config, kafka: {topic: config}, mqtt: {topic: "cfg/{key}", qos: 1, retain: true}}
"""


def _cfg(offset: int, key: str, value: bytes) -> ConsumedRecord:
    return ConsumedRecord(topic="config", partition=0, offset=offset, key=key.encode(),
                          value=value)


def test_a_subscription_during_the_replay_gets_the_newest_retained_at_its_end(
        tmp_path: Path) -> None:
    """Subscribed while the replay runs: nothing retained at once; at the replay's end the
    newest message of every topic once, except a topic that got a live message meanwhile
    (the client has something newer); a filter subscribed twice gets them once."""
    from gateway.protocols.mqtt import packets as p

    (tmp_path / "60-downlink.yaml").write_text(RETAINED_RULES)
    rules = load_rules(tmp_path).downlink

    async def run() -> tuple[list[tuple[str, bytes, bool]], list[tuple[str, bytes, bool]]]:
        service = Downlink(lambda: rules)
        consumer = SimpleNamespace(replaying={("config", 0)})
        service.consumers.append(consumer)  # type: ignore[arg-type]
        session = SimpleNamespace(client_id="dev", version=5, client_receive_maximum=65535,
                                  client_max_packet_size=0, identity=None, username=None,
                                  expiry_interval=0)
        replay = lambda r: r.offset < 6  # noqa: E731 - the committed position is 6
        service.on_batch([_cfg(0, "a", b"a0"), _cfg(1, "b", b"b0")], replay)
        sub = p.Subscribe(packet_id=1, subscriptions=[p.Subscription("cfg/+", 1)])
        service.packet(session, sub)  # type: ignore[arg-type]
        service.packet(session, sub)  # type: ignore[arg-type]
        at_once = [(m.topic, m.payload, m.retain) for m in service.flows["dev"].queue]
        service.on_batch([_cfg(2, "a", b"a1"), _cfg(3, "c", b"c0"), _cfg(4, "c", b""),
                          _cfg(5, "d", b"d0"), _cfg(6, "b", b"b-live")], replay)
        consumer.replaying.clear()
        service.replayed()
        return at_once, [(m.topic, m.payload, m.retain) for m in service.flows["dev"].queue]

    at_once, queued = asyncio.run(run())
    assert at_once == []
    assert queued[0] == ("cfg/b", b"b-live", False)  # live, before the replay's end
    assert sorted(queued[1:]) == [("cfg/a", b"a1", True), ("cfg/d", b"d0", True)]


class _Transport:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


def test_a_publish_that_fits_only_without_the_alias_goes_without_it(
        rules: DownlinkRules) -> None:
    """Maximum Packet Size: topic + alias would be 3 bytes over, the topic alone fits; the
    alias is not taken (the next PUBLISH of that topic still carries it in full)."""
    from gateway.protocols.mqtt import packets as p
    from gateway.protocols.mqtt.codec import decode_packets, encode

    topic, payload = "cmd/dev-1", b"x" * 20
    plain = len(encode(p.Publish(topic=topic, payload=payload, qos=0), 5))
    session = SimpleNamespace(client_id="dev", version=5, client_max_packet_size=plain,
                              client_topic_alias_maximum=4, client_receive_maximum=65535,
                              closing=False, expiry_interval=0)
    link = SimpleNamespace(session=session, transport=_Transport(), held=False)
    service = Downlink(lambda: rules)
    flow = service._flow(session)  # type: ignore[arg-type]
    service.links["dev"] = link  # type: ignore[assignment]
    flow.enqueue(Outgoing(topic, payload, 0, False))
    service._pump("dev", link)  # type: ignore[arg-type]
    session.client_max_packet_size = 0
    flow.enqueue(Outgoing(topic, payload, 0, False))
    flow.enqueue(Outgoing(topic, payload, 0, False))
    service._pump("dev", link)  # type: ignore[arg-type]
    sent, _ = decode_packets(link.transport.data, 5, 1 << 20)
    assert [(pk.topic, pk.properties and pk.properties.topic_alias) for pk in sent] == [
        (topic, None), (topic, 1), ("", 1)]
