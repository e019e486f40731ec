"""Authorization in the rules: who refused what is counted per rule and logged, boundedly.

The language itself (allow with usernames / identities / claims / captures,
``where``, ``deny``, ``{claim.NAME}``, reserved headers, the load errors) is
pinned down by the fixtures in tests/fixtures/rules (allow*, where,
claim-templates, reserved-headers, invalid-allow); this file covers what a
fixture cannot: counters, the log, the metrics, the dead-letter shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from structlog.testing import capture_logs

from gateway.model import Message, Outcome, Record
from gateway.observability.metrics import Pump
from gateway.pipeline import Pipeline, RefusalLog
from gateway.routing import Router, load_rules
from gateway.routing.compile import DeadLetter
from gateway.routing.router import dead_letter_record

pytestmark = pytest.mark.unit

RULES = """
rules:
  - name: fan
    match: "devices/{device}/#"
    continue: true
    kafka: {topic: all}
  - name: own-device
    match: "devices/{device}/#"
    allow: {usernames: ["{device}"]}
    kafka: {topic: devices}
  - name: unlisted
    match: "kafka/#"
    action: deny
    reason: not on the list
  - name: closed
    match: "closed/#"
    action: reject
  - name: tenant-topic
    match: "t/#"
    kafka: {topic: "t.{claim.tenant}"}
"""


def _router(tmp_path: Path) -> Router:
    (tmp_path / "10-rules.yaml").write_text(RULES)
    return Router(load_rules(tmp_path))


def _msg(topic: str, **kw: Any) -> Message:
    return Message(source="mqtt", topic=topic, payload=b"x", client_id="c1", **kw)


def test_refusals_are_counted_by_the_rule_that_refused(tmp_path: Path) -> None:
    router = _router(tmp_path)
    assert router.route(_msg("devices/d1/t", username="d1")).error is None
    # The first applying rule is "fan" (continue); the refusal is own-device's.
    result = router.route(_msg("devices/d1/t", username="d2"))
    assert result.error is not None and result.error.code == "not_authorized"
    assert (result.rule, result.refused_by, result.records) == ("fan", "own-device", [])
    router.route(_msg("devices/d1/t"))  # anonymous
    router.route(_msg("kafka/_schemas"))
    router.route(_msg("t/x", username="u"))  # the topic needs a claim the client lacks
    router.route(_msg("closed/x"))  # a reject is no authorization refusal
    assert router.refused_by_rule == {"own-device": 2, "unlisted": 1, "tenant-topic": 1}
    assert router.refused_by_reason == {"not_authorized": 4, "rejected": 1}


def test_refusal_log_one_line_per_identity_and_rule_per_interval() -> None:
    now = [0.0]
    limiter = RefusalLog(interval=10.0, budget=100, clock=lambda: now[0])
    assert limiter.admit("a") == (0, 0)
    for _ in range(999):  # 1,000 forbidden messages in a second: one line
        now[0] += 0.001
        assert limiter.admit("a") is None
    assert limiter.admit("b") == (0, 0)  # another identity is not silenced by "a"
    now[0] = 10.5
    assert limiter.admit("a") == (999, 0)  # the next line says how many were held back
    assert limiter.admit("a") is None


def test_refusal_log_is_bounded_however_many_identities() -> None:
    # A client picks its own client id: a new one per message must not mean a line each.
    now = [0.0]
    limiter = RefusalLog(interval=10.0, budget=5, max_keys=50, clock=lambda: now[0])
    written = [k for k in range(1000) if limiter.admit(k) is not None]
    assert len(written) == 5
    now[0] = 11.0
    assert limiter.admit("next") == (0, 995)
    for k in range(2000):  # memory stays bounded too
        now[0] += 10.0
        limiter.admit(k)
        assert len(limiter._seen) <= 50


class _Flow:
    paused = False


class _Buffer:
    flow = _Flow()


def test_pipeline_logs_publish_not_authorized_with_identity(tmp_path: Path) -> None:
    pipeline = Pipeline(_router(tmp_path), _Buffer())  # type: ignore[arg-type]
    outcomes: list[Outcome] = []
    message = _msg("devices/d1/t", username="d2", cert_identity="cn-9")
    with capture_logs() as logs:
        for _ in range(1000):
            pipeline.publish(message, outcomes.append)
        pipeline.publish(_msg("closed/x"), outcomes.append)
    assert len(outcomes) == 1001 and not any(o.ok for o in outcomes)
    assert outcomes[0].error is not None and outcomes[0].error.mqtt_reason == 0x87
    lines = [e for e in logs if e["event"] == "publish_not_authorized"]
    assert len(lines) == 1
    assert {k: lines[0][k] for k in ("username", "cert_identity", "client_id", "source",
                                     "topic", "rule", "suppressed")} == {
        "username": "d2", "cert_identity": "cn-9", "client_id": "c1", "source": "mqtt",
        "topic": "devices/d1/t", "rule": "own-device", "suppressed": 0}


def test_dead_letter_record_never_carries_a_client_lastmile_header() -> None:
    dead = dead_letter_record(
        DeadLetter("default", "dlq"), b"v", b"k", reason="kafka_refused", detail="d",
        topic="t", headers=[("LASTMILE-reason", b"ok"), ("lastmile-rule", b"x"),
                            ("trace", b"1")])
    assert [n for n, _ in dead.headers] == ["lastmile-reason", "lastmile-detail",
                                            "lastmile-topic", "trace"]
    assert dict(dead.headers)["lastmile-reason"] == b"kafka_refused"


class _App:
    worker_id = 0
    pipeline = None
    sinks: dict[str, Any] = {}
    reloader = None
    mqtt = None
    auth = None
    http = None

    def __init__(self, router: Router) -> None:
        self.router = router


def _sample(name: str, rule: str) -> float | None:
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith(f'{name}{{rule="{rule}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_count_authorization_refusals_per_rule(tmp_path: Path) -> None:
    router = _router(tmp_path)
    pump = Pump(_App(router))  # type: ignore[arg-type]
    name = "lastmile_authorization_refused_total"
    before = _sample(name, "own-device") or 0.0
    pump.tick()
    # Pre-initialised: a rule with allow or deny shows before its first refusal.
    assert _sample(name, "unlisted") is not None
    router.route(_msg("devices/d1/t"))
    router.route(_msg("devices/d1/t", username="x"))
    pump.tick()
    assert _sample(name, "own-device") == before + 2


def test_record_headers_keep_rule_headers_first(tmp_path: Path) -> None:
    # A client header that shadows nothing is passed on after the rule's own.
    (tmp_path / "r.yaml").write_text(
        'rules:\n  - {name: a, match: "a/{x}", kafka: {topic: a, headers: {x: "{x}"}}}\n')
    result = Router(load_rules(tmp_path)).route(
        Message(source="http", topic="a/1", payload=b"", headers=[("y", b"2")]))
    assert result.records == [Record(cluster="default", topic="a", value=b"", key=None,
                                     headers=[("x", b"1"), ("y", b"2")])]
