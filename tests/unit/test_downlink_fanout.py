"""A consumed record through rules, trie and flows, with offsets held until acknowledged."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.downlink.fanout import fan_out
from gateway.downlink.outbound import OffsetTracker, OutboundFlow
from gateway.downlink.record import ConsumedRecord
from gateway.downlink.retained import RetainedStore
from gateway.downlink.subscriptions import Options, SubscriptionTrie, parse_filter
from gateway.protocols.mqtt.properties import Properties
from gateway.routing import load_rules
from gateway.routing.downlink import DownlinkRules

pytestmark = pytest.mark.unit

RULES = """\
downlink:
  - {name: commands, kafka: {topic: commands}, mqtt: {topic: "cmd/{key}", qos: 1}}
  - {name: config, kafka: {topic: device-config}, mqtt: {topic: "cfg/{key}", qos: 2, retain: true}}
  - {name: d2d, kafka: {topic: mqtt}, mqtt: {topic: "{key}", qos: 2}}
"""
TP = ("default", "commands", 0)


@pytest.fixture
def rules(tmp_path: Path) -> DownlinkRules:
    (tmp_path / "60-downlink.yaml").write_text(RULES)
    return load_rules(tmp_path).downlink


def _rec(topic: str, offset: int, key: bytes, value: bytes | None = b"X",
         headers: tuple[tuple[str, bytes | None], ...] = ()) -> ConsumedRecord:
    return ConsumedRecord(topic=topic, partition=0, offset=offset, key=key, value=value,
                          headers=headers)


def _sub(trie: SubscriptionTrie, client: str, text: str, qos: int, ident: int | None = None,
         **kw: bool) -> None:
    trie.subscribe(client, parse_filter(text), Options(qos, **kw), ident)


def test_a_command_reaches_every_matching_subscriber_and_commits_after_both_acks(
    rules: DownlinkRules,
) -> None:
    trie, tracker = SubscriptionTrie(), OffsetTracker()
    flows = {"exact": OutboundFlow(), "wild": OutboundFlow(), "other": OutboundFlow()}
    _sub(trie, "exact", "cmd/dev-1", 2)
    _sub(trie, "wild", "cmd/+", 0, 5)
    _sub(trie, "wild", "cmd/#", 1, 6)
    _sub(trie, "other", "cmd/dev-2", 1)
    result = fan_out(_rec("commands", 0, b"dev-1"), rules, trie, flows, tracker)
    assert (result.queued, result.dropped, result.skipped) == (2, 0, [])
    [exact] = flows["exact"].pull()
    [wild] = flows["wild"].pull()
    assert flows["other"].pull() == []
    assert (exact.topic, exact.payload, exact.qos, exact.properties) == ("cmd/dev-1", b"X", 1, None)
    assert (wild.qos, wild.properties) == (1, Properties(subscription_identifiers=[5, 6]))
    assert tracker.committable() == {TP: 0}
    flows["exact"].on_puback(exact.packet_id)
    assert tracker.committable() == {TP: 0}
    flows["wild"].on_puback(wild.packet_id)
    assert tracker.committable() == {TP: 1}
    # A record no one subscribed to is finished at once.
    trie.remove_client("wild")
    fan_out(_rec("commands", 1, b"nobody"), rules, trie, flows, tracker)
    assert tracker.committable() == {TP: 2}


def test_a_slow_client_drops_by_its_own_policy_and_the_others_get_everything(
    rules: DownlinkRules,
) -> None:
    trie, tracker = SubscriptionTrie(), OffsetTracker()
    flows = {"slow": OutboundFlow(receive_maximum=1, queue_limit=2), "fast": OutboundFlow()}
    _sub(trie, "slow", "cmd/#", 1)
    _sub(trie, "fast", "cmd/#", 1)
    flows["slow"].pull()
    dropped = 0
    for offset in range(5):
        dropped += fan_out(_rec("commands", offset, b"d"), rules, trie, flows, tracker).dropped
        for message in flows["fast"].pull():
            flows["fast"].on_puback(message.packet_id)
    assert dropped == flows["slow"].dropped == 3
    assert [m.origin.offset for m in flows["slow"].queue if m.origin] == [3, 4]
    assert tracker.committable() == {TP: 3}  # 0-2 were dropped for slow, acked by fast


def test_no_local_uses_the_publisher_stamp(rules: DownlinkRules) -> None:
    trie, tracker = SubscriptionTrie(), OffsetTracker()
    flows = {"dev-a": OutboundFlow(), "dev-b": OutboundFlow()}
    _sub(trie, "dev-a", "room/#", 2, no_local=True)
    _sub(trie, "dev-b", "room/#", 2, no_local=True)
    stamp = (("lastmile-client-id", b"dev-a"),)
    fan_out(_rec("mqtt", 0, b"room/1", headers=stamp), rules, trie, flows, tracker)
    assert flows["dev-a"].pull() == []
    [m] = flows["dev-b"].pull()
    assert (m.topic, m.qos) == ("room/1", 2)


def test_retained_records_update_the_store_and_keep_retain_only_as_published(
    rules: DownlinkRules,
) -> None:
    trie, tracker, store = SubscriptionTrie(), OffsetTracker(), RetainedStore()
    flows = {"plain": OutboundFlow(), "rap": OutboundFlow()}
    _sub(trie, "plain", "cfg/+", 2)
    _sub(trie, "rap", "cfg/+", 2, retain_as_published=True)
    fan_out(_rec("device-config", 0, b"dev-1", b"v1"), rules, trie, flows, tracker, store)
    assert store.get("cfg/dev-1") is not None
    [plain], [rap] = flows["plain"].pull(), flows["rap"].pull()
    assert (plain.retain, rap.retain, plain.qos) == (False, True, 2)
    fan_out(_rec("device-config", 1, b"dev-1", None), rules, trie, flows, tracker, store)
    assert store.get("cfg/dev-1") is None and len(store) == 0
    [gone] = flows["plain"].pull()
    assert gone.payload == b""  # live subscribers see the deletion as an empty message


def test_skipped_records_and_vanished_sessions_are_reported(rules: DownlinkRules) -> None:
    trie, tracker = SubscriptionTrie(), OffsetTracker()
    _sub(trie, "gone", "cmd/#", 1)
    result = fan_out(_rec("commands", 0, b"dev-1"), rules, trie, {}, tracker)
    assert (result.queued, result.no_session) == (0, 1)
    assert tracker.committable() == {TP: 1}
    record = ConsumedRecord(topic="commands", partition=0, offset=1, key=None, value=b"x")
    result = fan_out(record, rules, trie, {}, tracker)
    assert result.skipped == [("commands", "the record has no key")]
