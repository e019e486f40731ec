"""The wired downlink's loop-side pieces without a socket: batches, rewinds, the state file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

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
