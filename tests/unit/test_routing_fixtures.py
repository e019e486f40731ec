"""Every language feature and every load error, as a named fixture directory.

Each ``tests/fixtures/rules/<name>/`` holds ``rules/*.yaml`` and ``expect.yaml``:
either ``cases`` (publishes and exactly what routing must return) or ``errors``
(exactly the located load errors, in order).  Adding a case is editing YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.model import Message
from gateway.routing import Router, RulesError, load_rules
from gateway.routing.rules import RuleError

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "rules"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expect.yaml").exists())


def _expect(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((FIXTURES / name / "expect.yaml").read_text())
    return data


def _message(publish: dict[str, Any]) -> Message:
    fields = dict(publish)
    fields.setdefault("source", "mqtt")
    fields["payload"] = str(fields.get("payload", "")).encode()
    if "key" in fields:
        fields["key"] = fields["key"].encode()
    fields["headers"] = [(k, v.encode()) for k, v in fields.get("headers", [])]
    fields["user_properties"] = [tuple(p) for p in fields.get("user_properties", [])]
    return Message(**fields)


def _check_record(got: Any, want: dict[str, Any], message: Message) -> None:
    assert got.cluster == want["cluster"]
    assert got.topic == want["topic"]
    assert got.key == (None if want["key"] is None else str(want["key"]).encode())
    assert got.value == (want["value"].encode() if "value" in want else message.payload)
    assert got.partition == want.get("partition")
    assert got.ack is None
    headers = [(n, v.decode()) for n, v in got.headers]
    wanted = [tuple(h) for h in want.get("headers", [])]
    assert len(headers) == len(wanted), headers
    for (name, value), (want_name, want_value) in zip(headers, wanted, strict=True):
        assert name == want_name
        assert want_value == "*" or value == want_value, (name, value)


@pytest.mark.parametrize("name", [n for n in NAMES if "cases" in _expect(n)])
def test_fixture_routes(name: str) -> None:
    router = Router(load_rules(FIXTURES / name / "rules"))
    for case in _expect(name)["cases"]:
        message = _message(case["publish"])
        result = router.route(message)
        context = f"{name}: {case['publish']}"
        if "rule" in case:
            assert result.rule == case["rule"], context
        code = result.error.code if result.error is not None else None
        assert code == case.get("error"), context
        if "error_message" in case:
            assert result.error is not None and result.error.message == case["error_message"]
        assert result.dropped == case.get("dropped", False), context
        assert result.dead_lettered == case.get("dead_lettered", False), context
        wanted = case.get("records", [])
        assert len(result.records) == len(wanted), context
        for got, want in zip(result.records, wanted, strict=True):
            _check_record(got, want, message)


@pytest.mark.parametrize("name", [n for n in NAMES if "errors" in _expect(n)])
def test_fixture_errors(name: str) -> None:
    with pytest.raises(RulesError) as info:
        load_rules(FIXTURES / name / "rules")
    got = info.value.errors
    wanted = _expect(name)["errors"]
    assert [str(e) for e in got] and len(got) == len(wanted), [str(e) for e in got]
    for error, want in zip(got, wanted, strict=True):
        assert isinstance(error, RuleError)
        assert Path(error.file).name == want["file"], str(error)
        assert error.line == want["line"], str(error)
        assert error.rule == want["rule"], str(error)
        assert error.key == want["key"], str(error)
        assert want["message"] in error.detail, str(error)
        # The one-line form operators read: file:line: rule: key: message.
        where = f"{error.file}:{error.line}" if error.line is not None else error.file
        assert str(error).startswith(where)


def test_every_fixture_is_exercised() -> None:
    # A fixture without cases or errors would be silently skipped above.
    for name in NAMES:
        expect = _expect(name)
        assert ("cases" in expect) != ("errors" in expect), name
