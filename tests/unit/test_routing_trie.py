"""The trie agrees with a naive, obviously-correct matcher on random rule sets.

The reference walks every rule in order and applies the MQTT matching rules
directly (including '#' matching the parent level and '$' topics hiding from
first-level wildcards); the router must pick the same rules, in the same
order, with the same first-match and ``continue`` behaviour.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.model import Message
from gateway.routing.compile import RuleTable, compile_rule
from gateway.routing.router import route
from gateway.routing.rules import KafkaSpec, RuleSpec
from gateway.routing.trie import FilterError, Trie, parse_filter

pytestmark = pytest.mark.unit

LEVELS = ["a", "b", "c", "", "$s"]
level = st.sampled_from(LEVELS)
filter_level = st.sampled_from([*LEVELS, "+", "+", "{cap}"])


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(filter_level, min_size=1, max_size=4))
    # Only one named capture per filter; later ones become '+'.
    seen = False
    for i, lvl in enumerate(levels):
        if lvl == "{cap}":
            levels[i] = "+" if seen else lvl
            seen = True
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "a"  # MQTT forbids an empty filter


topics = st.lists(level, min_size=1, max_size=5).map("/".join).filter(bool)
rule_sets = st.lists(st.tuples(topic_filters(), st.booleans()), min_size=1, max_size=12)


def naive_match(topic_filter: str, topic: str) -> bool:
    f = ["+" if lvl.startswith("{") else lvl for lvl in topic_filter.split("/")]
    t = topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, fl in enumerate(f):
        if fl == "#":
            return True
        if i >= len(t) or (fl != "+" and fl != t[i]):
            return False
    return len(f) == len(t)


def naive_route(rules: list[tuple[str, bool]], topic: str) -> list[str]:
    out = []
    for i, (topic_filter, cont) in enumerate(rules):
        if naive_match(topic_filter, topic):
            out.append(f"r{i}")
            if not cont:
                break
    return out


def build(rules: list[tuple[str, bool]]) -> RuleTable:
    compiled = []
    for i, (topic_filter, cont) in enumerate(rules):
        spec = RuleSpec(
            name=f"r{i}", match=topic_filter, kafka=KafkaSpec(topic=f"r{i}"), continue_=cont
        )
        rule, problems = compile_rule(spec, i, "gen.yaml", i + 1, has_dead_letter=False)
        assert problems == []
        compiled.append(rule)
    return RuleTable(compiled)


@settings(max_examples=400, deadline=None)
@given(rules=rule_sets, topic_list=st.lists(topics, min_size=1, max_size=8))
def test_trie_agrees_with_naive_matcher(
    rules: list[tuple[str, bool]], topic_list: list[str]
) -> None:
    table = build(rules)
    for topic in topic_list:
        result = route(table, Message(source="mqtt", topic=topic, payload=b"p", client_id="c"))
        assert [r.topic for r in result.records] == naive_route(rules, topic), topic
        expected_first = naive_route(rules, topic)[:1]
        assert result.rule == (expected_first[0] if expected_first else "")
        if not expected_first:
            assert result.error is not None and result.error.code == "no_matching_rule"


@settings(max_examples=200, deadline=None)
@given(rules=rule_sets, topic=topics)
def test_trie_returns_every_matching_rule_in_order(
    rules: list[tuple[str, bool]], topic: str
) -> None:
    trie = Trie((i, parse_filter(f).levels) for i, (f, _) in enumerate(rules))
    expected = [i for i, (f, _) in enumerate(rules) if naive_match(f, topic)]
    assert trie.match(topic.split("/")) == expected


def test_captures_bind_their_level() -> None:
    spec = RuleSpec(name="f", match="f/{site}/x/{line}/#", kafka=KafkaSpec(topic="t.{site}.{line}"))
    rule, problems = compile_rule(spec, 0, "f.yaml", 1, has_dead_letter=False)
    assert problems == []
    result = route(RuleTable([rule]), Message(source="mqtt", topic="f/s1/x/l2/y/z", payload=b""))
    assert [r.topic for r in result.records] == ["t.s1.l2"]


@pytest.mark.parametrize("bad", ["", "a/#/b", "a+", "a/{}", "a/{1x}", "x/{a}b", "a\x00"])
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(FilterError):
        parse_filter(bad)
