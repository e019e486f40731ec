"""/metrics follows the downlink (issue #17): a Kafka produce reaching real MQTT
subscribers moves the downlink counters by what the traffic implies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Broker, running, wait_until
from tests.integration.test_downlink import (
    Subscriber,
    downlink_rules,
    produce,
    unique,
    will_connect,
)
from tests.integration.test_metrics import get, sample

pytestmark = pytest.mark.integration


def test_downlink_counters_follow_a_produce_to_subscribers(
        gateway_factory: Any, broker: Broker, rules_dir: Path) -> None:
    import paho.mqtt.client as paho

    commands, config, presence = unique("commands"), unique("device-config"), unique("presence")
    broker.create_topic(commands, 2)
    broker.create_topic(config, 1)
    broker.create_topic(presence)
    downlink_rules(rules_dir, commands, config)
    proc, ports = gateway_factory(downlink__wills=True, downlink__presence_topic=presence)
    base = f"http://127.0.0.1:{ports['metrics']}"
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        subs = [Subscriber(ports["mqtt"], version) for version in (paho.MQTTv311, paho.MQTTv5)]
        idle = Subscriber(ports["mqtt"], paho.MQTTv5)
        try:
            assert subs[0].subscribe("cmd/dev-1", 1) == [1]
            assert subs[1].subscribe("cmd/+", 1) == [1]
            assert idle.subscribe("cmd/other", 1) == [1]
            for i in range(3):
                produce(broker, commands, "dev-1", f"c{i}".encode())
            for sub in subs:
                assert [sub.next().payload for _ in range(3)] == [b"c0", b"c1", b"c2"]
            lost = will_connect(ports["mqtt"], unique("will"), keep_alive=60)
            lost.close()  # no DISCONNECT: its will goes out

            def settled() -> dict[str, float] | None:
                _, text = get(f"{base}/metrics")
                try:
                    got = {name: sample(text, name) for name in (
                        'lastmile_downlink_records_total{cluster="default"}',
                        "lastmile_downlink_records_fanned_out_total",
                        "lastmile_downlink_messages_queued_total",
                        "lastmile_downlink_messages_sent_total",
                        'lastmile_downlink_committed_offsets{cluster="default"}',
                        'lastmile_downlink_uncommitted_records{cluster="default"}',
                        'lastmile_downlink_queue_messages{state="in_flight"}',
                        'lastmile_downlink_queue_messages{state="waiting"}',
                        'lastmile_downlink_messages_dropped_total{reason="queue_full"}',
                        'lastmile_downlink_messages_dropped_total{reason="too_large"}',
                        "lastmile_downlink_subscriptions",
                        'lastmile_downlink_clients{state="online"}',
                        "lastmile_wills_published_total",
                        "lastmile_presence_events_total")}
                except AssertionError:  # not exported yet
                    return None
                # Acks in, offsets committed, the will out: the pump copies once a second.
                done = (got["lastmile_downlink_messages_sent_total"] >= 6
                        and got['lastmile_downlink_committed_offsets{cluster="default"}'] >= 3
                        and got["lastmile_wills_published_total"] >= 1
                        and got["lastmile_presence_events_total"] >= 5)
                return got if done else None

            got = wait_until(settled, 30, what="the downlink counters in /metrics")
            assert got['lastmile_downlink_records_total{cluster="default"}'] == 3
            assert got["lastmile_downlink_records_fanned_out_total"] == 3
            assert got["lastmile_downlink_messages_queued_total"] == 6  # 3 records x 2 matches
            assert got["lastmile_downlink_messages_sent_total"] == 6
            # a fresh topic: the positions after the 3 records, summed over partitions
            assert got['lastmile_downlink_committed_offsets{cluster="default"}'] == 3
            assert got['lastmile_downlink_uncommitted_records{cluster="default"}'] == 0
            assert got['lastmile_downlink_queue_messages{state="in_flight"}'] == 0
            assert got['lastmile_downlink_queue_messages{state="waiting"}'] == 0
            assert got['lastmile_downlink_messages_dropped_total{reason="queue_full"}'] == 0
            assert got['lastmile_downlink_messages_dropped_total{reason="too_large"}'] == 0
            assert got["lastmile_downlink_subscriptions"] == 3
            assert got['lastmile_downlink_clients{state="online"}'] == 3
            assert got["lastmile_wills_published_total"] == 1
            # connect x4 and the will client's end (connect, socket loss)
            assert got["lastmile_presence_events_total"] == 5
        finally:
            for sub in [*subs, idle]:
                sub.close()
