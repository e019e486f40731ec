"""`rules check` and `rules test`: exit codes and what operators and scripts read."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.routing.cli_rules import add_rules_parser, rules_check, rules_test

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = str(ROOT / "bridge-rules")
BROKEN = str(ROOT / "tests/fixtures/rules/invalid-templates/rules")


def test_check_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert rules_check(SHIPPED, json_out=False) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 10 rules in 7 files, version ")


def test_check_lists_every_error_with_location(capsys: pytest.CaptureFixture[str]) -> None:
    assert rules_check(BROKEN, json_out=False) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"{BROKEN}/10-rules.yaml:5: unknown-var: kafka.topic: unknown variable {{sight}}; "
        "known: client_id, qos, site, source, topic, username, user_property.NAME, "
        "claim.NAME, json:/POINTER"
    )
    assert len(lines) == 6 and lines[-1].startswith("5 error(s)")


def test_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert rules_check(BROKEN, json_out=True) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["errors"][1] == {
        "file": f"{BROKEN}/10-rules.yaml", "line": 9, "rule": "json-in-topic",
        "key": "kafka.topic", "message": "{json:/a} is allowed in key and headers only",
    }  # fmt: skip
    assert rules_check(SHIPPED, json_out=True) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["ok"] is True and ok["rules"] == 10 and ok["clusters"] == ["default"]


def test_test_shows_exact_record(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    payload = tmp_path / "reading.json"
    payload.write_text('{"meter": {"id": "m-7"}}')
    code = rules_test(
        SHIPPED, "energy/p1/inv3/telemetry/power", f"@{payload}", "dev-1", "plant-p1", "mqtt", 1,
        False,
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"rule: energy-telemetry ({SHIPPED}/20-energy.yaml:19)"
    assert out[2] == "kafka: cluster default topic edge.energy.telemetry.p1 key 'inv3'"
    assert out[3:] == [
        "  header mqtt-topic: energy/p1/inv3/telemetry/power",
        "  header meter: m-7",
    ]


@pytest.mark.parametrize(
    ("topic", "kw", "outcome", "detail"),
    [
        ("debug/x", {}, "dropped", None),
        ("app/a/events/e", {}, "refused", "rejected"),
        ("energy/p/u/alarm/x", {"username": "guest"}, "refused", "not_authorized"),
        ("nowhere", {}, "dead-letter", "no_matching_rule"),
    ],
)
def test_test_json_outcomes(
    capsys: pytest.CaptureFixture[str], topic: str, kw: dict[str, str], outcome: str,
    detail: str | None,
) -> None:  # fmt: skip
    assert rules_test(SHIPPED, topic, None, "c", kw.get("username"), "mqtt", 0, True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["outcome"] == outcome
    if outcome == "refused":
        assert doc["error"]["error"] == detail and doc["records"] == []
    if outcome == "dead-letter":
        assert ["lastmile-reason", detail] in doc["records"][0]["headers"]


def test_test_with_invalid_rules_or_missing_payload_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert rules_test(BROKEN, "a", None, "c", None, "mqtt", 0, False) == 1
    assert rules_test(SHIPPED, "a", "@/nonexistent/file", "c", None, "mqtt", 0, False) == 1


def test_argparse_wiring(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="lastmile")
    add_rules_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["rules", "test", "app/a/events/e", "--source", "http", "--payload", '{"user": {"id": 4}}',
         "--user-property", "app-version=2.1", "--rules", SHIPPED, "--json"]
    )  # fmt: skip
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["records"][0]["key"] == "4"
    assert ["app-version", "2.1"] in doc["records"][0]["headers"]
    args = parser.parse_args(["rules", "check", BROKEN])
    assert args.func(args) == 1


def test_module_entry_point_exit_codes() -> None:
    run = [sys.executable, "-m", "gateway.routing.cli_rules", "rules", "check"]
    ok = subprocess.run([*run, SHIPPED], capture_output=True, text=True, cwd=ROOT, check=False)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*run, BROKEN], capture_output=True, text=True, cwd=ROOT, check=False)
    assert bad.returncode == 1 and "unknown-var" in bad.stdout
    # The default directory is bridge-rules, relative to where the operator runs it.
    default = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=False)
    assert default.returncode == 0 and default.stdout.startswith("ok:")


DOWNLINK_RULES = """\
downlink:
  - name: commands
    kafka: {topic: commands}
    mqtt: {topic: "cmd/{key}", qos: 1}
  - name: config
    kafka: {topic: commands}
    mqtt: {topic: "cfg/{header.site}/{key}", qos: 2, retain: true}
"""


def _downlink_dir(tmp_path: Path) -> str:
    (tmp_path / "60-commands.yaml").write_text(DOWNLINK_RULES)
    return str(tmp_path)


def test_check_counts_downlink_rules(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    directory = _downlink_dir(tmp_path)
    assert rules_check(directory, json_out=False) == 0
    assert capsys.readouterr().out.rstrip().endswith("; downlink: 2 rules")
    assert rules_check(directory, json_out=True) == 0
    assert json.loads(capsys.readouterr().out)["downlink_rules"] == 2


def test_test_downlink_shows_topics_and_why_not(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser(prog="lastmile")
    add_rules_parser(parser.add_subparsers(dest="command", required=True))
    directory = _downlink_dir(tmp_path)
    args = parser.parse_args(["rules", "test", "--downlink", "commands", "--key", "dev-1",
                              "--payload", "X", "--rules", directory])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"rule commands ({directory}/60-commands.yaml:2): publish to MQTT topic "
                        "'cmd/dev-1' qos 1 retain false")
    assert lines[2].startswith(f"rule config ({directory}/60-commands.yaml:5): skipped: ")
    assert "site" in lines[2]

    args = parser.parse_args(["rules", "test", "--downlink", "commands", "--key", "dev-1",
                              "--header", "site=s1", "--header", "mqtt-user.a=1",
                              "--header", "mqtt-message-expiry=30", "--rules", directory,
                              "--json"])
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(d["rule"], d["topic"], d["qos"], d["retain"], d["delete"])
            for d in doc["deliveries"]] == [
        ("commands", "cmd/dev-1", 1, False, False), ("config", "cfg/s1/dev-1", 2, True, True)]
    assert doc["skipped"] == []
    assert doc["deliveries"][0]["properties"] == {
        "user_properties": [["a", "1"]], "message_expiry_interval": 30}

    args = parser.parse_args(["rules", "test", "--downlink", "other", "--rules", directory])
    assert args.func(args) == 0
    assert "no downlink rule reads Kafka topic 'other'" in capsys.readouterr().out
    # Without a key the {key} rules say why.
    args = parser.parse_args(["rules", "test", "--downlink", "commands", "--rules", directory,
                              "--json"])
    assert args.func(args) == 0
    assert [s["rule"] for s in json.loads(capsys.readouterr().out)["skipped"]] == [
        "commands", "config"]
    for argv in (["rules", "test", "t", "--downlink", "commands"], ["rules", "test"]):
        args = parser.parse_args([*argv, "--rules", directory])
        assert args.func(args) == 1
    assert "not both" in capsys.readouterr().err
