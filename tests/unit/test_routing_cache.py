"""The routing cache (per table, keyed by source and topic) never changes a result.

Whatever a cache entry pre-renders must depend on the topic and source alone;
everything that depends on the message (client id, username, payload, user
properties, explicit key / headers) is still decided per message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.model import Message
from gateway.routing import Router, RuleTable, load_rules, route

pytestmark = pytest.mark.unit

RULES = """\
dead_letter: {topic: dead}
unmatched: dead-letter
rules:
  - name: vip
    match: {topic: "dev/{site}/+/data", client_id: "vip-*"}
    kafka: {topic: "vip.{site}", key: "{site}", headers: {t: "{topic}"}}
  - name: http-only
    match: {topic: "dev/{site}/+/data", source: http}
    kafka: {topic: "http.{site}", key: null}
  - name: per-device
    match: "dev/{site}/{dev}/data"
    kafka:
      topic: "dev.{site}"
      key: "{client_id}"
      headers: {dev: "{dev}", src: "{source}", sev: "{user_property.sev}"}
  - name: json
    match: "j/{site}"
    payload: {format: json}
    kafka: {topic: "j-{site}", key: "{json:/id}"}
  - name: named
    match: "n/{name}"
    kafka: {topic: "{name}"}
"""


@pytest.fixture
def table(tmp_path: Path) -> RuleTable:
    (tmp_path / "rules.yaml").write_text(RULES)
    return load_rules(tmp_path)


def _msg(topic: str, **kw: object) -> Message:
    kw.setdefault("source", "mqtt")
    kw.setdefault("payload", b"{}")
    return Message(topic=topic, **kw)  # type: ignore[arg-type]


def _summary(table: RuleTable, message: Message) -> object:
    r = route(table, message)
    return (
        r.rule, r.dropped, r.dead_lettered, r.error.code if r.error else None,
        [(x.topic, x.key, x.headers) for x in r.records],
    )


def test_per_message_parts_stay_per_message(table: RuleTable) -> None:
    a = route(table, _msg("dev/s1/d1/data", client_id="c1"))
    b = route(table, _msg("dev/s1/d1/data", client_id="c2",
                          user_properties=[("sev", "high")]))
    assert [r.key for r in a.records] == [b"c1"]
    assert [r.key for r in b.records] == [b"c2"]
    assert a.records[0].headers == [("dev", b"d1"), ("src", b"mqtt")]
    assert b.records[0].headers == [("dev", b"d1"), ("src", b"mqtt"), ("sev", b"high")]
    # Client-id conditions are checked per message on a cached topic.
    vip = route(table, _msg("dev/s1/d1/data", client_id="vip-1"))
    assert vip.rule == "vip"
    assert vip.records[0].topic == "vip.s1"
    assert vip.records[0].headers == [("t", b"dev/s1/d1/data")]
    assert route(table, _msg("dev/s1/d1/data", client_id="c3")).records[0].topic == "dev.s1"


def test_source_is_part_of_the_key(table: RuleTable) -> None:
    assert route(table, _msg("dev/s1/d1/data", client_id="c")).rule == "per-device"
    http = route(table, _msg("dev/s1/d1/data", source="http", client_id="c"))
    assert http.rule == "http-only"
    assert http.records[0].key is None
    assert route(table, _msg("dev/s1/d1/data", client_id="c")).rule == "per-device"


def test_payload_and_explicit_hints_per_message(table: RuleTable) -> None:
    ok = route(table, _msg("j/x", payload=b'{"id": 7}'))
    assert ok.records[0].key == b"7"
    bad = route(table, _msg("j/x", payload=b"not json"))
    assert bad.dead_lettered
    hinted = route(table, _msg("dev/s/d/data", client_id="c", key=b"k",
                               headers=[("h", b"v")]))
    assert hinted.records[0].key == b"k"
    assert hinted.records[0].headers[-1] == ("h", b"v")
    plain = route(table, _msg("dev/s/d/data", client_id="c"))
    assert ("h", b"v") not in plain.records[0].headers  # no header list shared between records


def test_invalid_rendered_topic_refused_every_time(table: RuleTable) -> None:
    for _ in range(3):
        assert route(table, _msg("n/bad name")).dead_lettered
    assert route(table, _msg("n/good")).records[0].topic == "good"


def test_cached_equals_uncached_and_bounded(tmp_path: Path, table: RuleTable) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    tiny = load_rules(tmp_path)
    tiny.cache_size = 3
    topics = [f"dev/s{i % 5}/d{i % 7}/data" for i in range(40)] + ["x/y", "j/a", "n/q"]
    for i, topic in enumerate(topics * 2):
        m = _msg(topic, client_id=f"vip-{i}" if i % 3 == 0 else f"c{i}",
                 payload=b'{"id": "z"}')
        fresh = load_rules(tmp_path)  # cold cache: the reference
        assert _summary(table, m) == _summary(fresh, m) == _summary(tiny, m)
        assert tiny.cached <= tiny.cache_size


def test_swap_starts_a_new_cache(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    router = Router(load_rules(tmp_path))
    assert router.route(_msg("n/one")).records[0].topic == "one"
    (tmp_path / "rules.yaml").write_text(
        'rules:\n  - {name: all, match: "#", kafka: {topic: "other"}}\n')
    router.swap(load_rules(tmp_path))
    assert router.table.cached == 0
    assert router.route(_msg("n/one")).records[0].topic == "other"
