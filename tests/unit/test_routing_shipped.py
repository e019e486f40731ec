"""The rules we ship load cleanly and route what their comments promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.model import Message
from gateway.routing import Router, load_rules
from tests.helpers import readme_block

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).resolve().parents[2] / "bridge-rules"

# Read from README.md, so an edit there is tested, not a copy made here.
README_EXAMPLE = readme_block("The smallest valid rules file", "yaml")


def test_readme_minimal_example(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(README_EXAMPLE)
    router = Router(load_rules(tmp_path))
    result = router.route(
        Message(source="mqtt", topic="bench/w3/c17", payload=b"\x00raw\xff", client_id="gen-17")
    )
    assert result.rule == "telemetry" and result.error is None
    [record] = result.records
    assert (record.cluster, record.topic, record.key) == ("default", "bench", b"gen-17")
    assert record.value == b"\x00raw\xff" and record.headers == []


def test_shipped_rules_contain_the_readme_example_verbatim() -> None:
    rule = README_EXAMPLE.splitlines()[1]
    assert rule.strip().startswith("- {name: telemetry")
    assert rule in (SHIPPED / "10-bench.yaml").read_text()


@pytest.fixture(scope="module")
def router() -> Router:
    table = load_rules(SHIPPED)
    assert table.clusters == {"default"}
    assert table.dead_letter is not None and table.unmatched == "dead-letter"
    return Router(table)


def _route(router: Router, topic: str, payload: bytes = b"{}", **kw: object) -> tuple[str, str]:
    fields: dict[str, object] = {"source": "mqtt", "client_id": "dev-1", **kw}
    result = router.route(Message(topic=topic, payload=payload, **fields))  # type: ignore[arg-type]
    if result.error is not None:
        return result.rule, f"error:{result.error.code}"
    if result.dropped:
        return result.rule, "dropped"
    return result.rule, ",".join(r.topic for r in result.records)


@pytest.mark.parametrize(
    ("topic", "payload", "kw", "expected"),
    [
        ("bench/0/1", b"x", {}, ("telemetry", "bench")),
        ("energy/p1/inv2/alarm/overheat", b"hot", {"username": "plant-p1"},
         ("energy-alarms", "edge.energy.alarms")),
        ("energy/p1/inv2/alarm/overheat", b"hot", {"cert_identity": "p1.plants.example.com"},
         ("energy-alarms", "edge.energy.alarms")),
        ("energy/p1/inv2/alarm/overheat", b"hot", {"username": "guest"},
         ("energy-alarms", "error:not_authorized")),
        # A plant publishes under its own name only, whichever way it proves it.
        ("energy/p1/inv2/alarm/overheat", b"hot", {"username": "plant-p2"},
         ("energy-alarms", "error:not_authorized")),
        ("energy/p1/inv2/alarm/overheat", b"hot", {"cert_identity": "p2.plants.example.com"},
         ("energy-alarms", "error:not_authorized")),
        ("energy/p1/inv2/alarm/overheat", b"hot", {"client_id": "plant-p1"},
         ("energy-alarms", "error:not_authorized")),
        ("energy/p1/inv2/telemetry/power", b'{"meter": {"id": "m1"}}', {"username": "plant-p1"},
         ("energy-telemetry", "edge.energy.telemetry.p1")),
        ("energy/p1/inv2/telemetry/power", b"not json", {"username": "plant-p1"},
         ("energy-telemetry", "lastmile.dead-letter")),
        ("ott/tv/eu-west/tcp-retransmits", b'{"session_id": "s9", "count": 3}', {},
         ("ott-tcp-retransmits", "ott.stream.tcp-retransmits")),
        ("ott/tv/eu-west/buffering", b'{"session_id": "s9", "ms": 800}', {},
         ("ott-buffering", "ott.stream.buffering")),
        ("app/shop/events/login", b'{"user": {"id": "u1"}}', {"source": "http"},
         ("mobile-events", "mobile.events")),
        ("app/shop/events/login", b'{"user": {"id": "u1"}}', {},
         ("mobile-events-not-over-mqtt", "error:rejected")),
        ("debug/fw/trace", b"...", {}, ("debug", "dropped")),
        # REST Proxy: the listed topics only; the gateway's own and others' are refused.
        ("kafka/orders", b"{}", {"source": "http"}, ("rest-proxy", "orders")),
        ("kafka/clicks.eu", b"{}", {"source": "http"}, ("rest-proxy", "clicks.eu")),
        ("kafka/lastmile.dead-letter", b"{}", {"source": "http"},
         ("rest-proxy-unlisted", "error:not_authorized")),
        ("kafka/_schemas", b"{}", {"source": "http"},
         ("rest-proxy-unlisted", "error:not_authorized")),
        ("unknown/topic", b"...", {}, ("", "lastmile.dead-letter")),
    ],
)  # fmt: skip
def test_shipped_rules_route(
    router: Router, topic: str, payload: bytes, kw: dict[str, object], expected: tuple[str, str]
) -> None:
    assert _route(router, topic, payload, **kw) == expected


def test_every_shipped_rule_is_reachable(router: Router) -> None:
    # Guards against a new sample rule shadowed by an earlier, broader one.
    reached = set()
    for topic, payload, kw in [
        ("bench/1", b"", {}),
        ("energy/p/u/alarm/x", b"", {"username": "plant-p"}),
        ("energy/p/u/telemetry/x", b'{"meter": {"id": 1}}', {"username": "plant-p"}),
        ("ott/s/r/tcp-retransmits", b'{"session_id": 1}', {}),
        ("ott/s/r/buffering", b'{"session_id": 1}', {}),
        ("app/a/events/e", b'{"user": {"id": 1}}', {"source": "http"}),
        ("app/a/events/e", b"", {}),
        ("debug/x", b"", {}),
        ("kafka/orders", b"{}", {"source": "http"}),
        ("kafka/_schemas", b"{}", {"source": "http"}),
    ]:
        reached.add(_route(router, topic, payload, **kw)[0])
    assert reached == {r.name for r in router.table.entries}
