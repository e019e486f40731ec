"""Downlink rules: the ``downlink:`` section, its load errors, routing of records, authorization."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import Identity
from gateway.downlink.record import ConsumedRecord
from gateway.routing import RulesError, load_rules
from gateway.routing.cli_rules import rules_check
from gateway.routing.downlink import DownlinkRules, MqttTemplate
from gateway.routing.templates import TemplateError

pytestmark = pytest.mark.unit

ISSUE_RULES = """\
downlink:
  - name: commands
    kafka: {topic: commands}                 # cluster: default unless named
    mqtt: {topic: "cmd/{key}", qos: 1}
  - name: config
    kafka: {topic: device-config}
    mqtt: {topic: "cfg/{key}", qos: 1, retain: true}
"""


def _load(tmp_path: Path, text: str, name: str = "60-commands.yaml") -> DownlinkRules:
    (tmp_path / name).write_text(text)
    return load_rules(tmp_path).downlink


def _errors(tmp_path: Path, text: str, clusters: list[str] | None = None) -> list[str]:
    (tmp_path / "60-commands.yaml").write_text(text)
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path, clusters)
    return [str(e).replace(str(tmp_path) + "/", "") for e in info.value.errors]


def _rec(topic: str, key: bytes | None = b"dev-1", value: bytes | None = b"X",
         **kw: object) -> ConsumedRecord:
    return ConsumedRecord(topic=topic, partition=3, offset=7, key=key, value=value, **kw)  # type: ignore[arg-type]


def test_the_issue_example_loads_beside_uplink_rules(tmp_path: Path) -> None:
    (tmp_path / "10-up.yaml").write_text(
        "rules:\n  - name: up\n    match: 'up/#'\n    kafka: {topic: up}\n")
    down = _load(tmp_path, ISSUE_RULES)
    table = load_rules(tmp_path)
    assert table.rules == 1 and len(down) == 2
    assert down.kafka_topics() == {"commands", "device-config"}
    assert down.kafka_topics("other") == frozenset()
    commands = down.rules[0]
    assert (commands.cluster, commands.qos, commands.retain) == ("default", 1, False)
    assert commands.line == 2 and commands.file.endswith("60-commands.yaml")


def test_a_record_maps_to_topic_qos_retain_with_payload_unchanged(tmp_path: Path) -> None:
    down = _load(tmp_path, ISSUE_RULES)
    deliveries, skipped = down.route(_rec("commands"))
    assert skipped == []
    assert [(d.rule, d.topic, d.qos, d.retain, d.payload, d.delete) for d in deliveries] == [
        ("commands", "cmd/dev-1", 1, False, b"X", False)]
    deliveries, _ = down.route(_rec("device-config", value=b"{}"))
    assert [(d.topic, d.retain, d.delete) for d in deliveries] == [("cfg/dev-1", True, False)]
    assert down.route(_rec("elsewhere")) == ([], [])
    assert down.route(_rec("commands", cluster="other")) == ([], [])


@pytest.mark.parametrize(("header", "qos"), [
    (b"0", 0), (b"1", 1), (b"2", 1), (b"bogus", 1), (None, 1)])
def test_the_mqtt_qos_header_caps_the_delivery_qos(
        tmp_path: Path, header: bytes | None, qos: int) -> None:
    """An uplink rule's ``mqtt-qos: "{qos}"``: a message never leaves above its QoS."""
    down = _load(tmp_path, ISSUE_RULES)
    deliveries, _ = down.route(_rec("commands", headers=(("mqtt-qos", header),)))
    assert [d.qos for d in deliveries] == [qos]


@pytest.mark.parametrize("value", [b"", None])
def test_an_empty_value_on_a_retained_rule_deletes(tmp_path: Path, value: bytes | None) -> None:
    down = _load(tmp_path, ISSUE_RULES)
    [d], _ = down.route(_rec("device-config", value=value))
    assert (d.topic, d.payload, d.delete) == ("cfg/dev-1", b"", True)
    # Without retain an empty value is just an empty payload.
    [d], _ = down.route(_rec("commands", value=value))
    assert (d.payload, d.delete) == (b"", False)


def test_templates_over_key_header_topic_partition(tmp_path: Path) -> None:
    down = _load(tmp_path, """\
downlink:
  - name: all
    kafka: {topic: t, cluster: edge}
    mqtt: {topic: "x/{topic}/{partition}/{header.site}/k-{key}", qos: 2}
  - name: second
    kafka: {topic: t, cluster: edge}
    mqtt: {topic: "y/{header.missing}", qos: 0}
""")
    record = _rec("t", cluster="edge", headers=(("site", b"s1"), ("site", b"s2")))
    deliveries, skipped = down.route(record)
    assert [(d.topic, d.qos) for d in deliveries] == [("x/t/3/s1/k-dev-1", 2)]
    assert skipped == [("second", "the record has no header 'missing'")]
    assert down.clusters == {"edge"}


@pytest.mark.parametrize(("record", "reason"), [
    (_rec("c", key=None), "the record has no key"),
    (_rec("c", key=b"\xff"), "the key is not UTF-8"),
    (_rec("c", key=b"a+b"), "{key} contains ['+'], not allowed in this topic"),
    (_rec("c", key=b"a#"), "{key} contains ['#'], not allowed in this topic"),
    (_rec("c", key=b"a\x00"), "{key} contains ['\\x00'], not allowed in this topic"),
    (_rec("c", key=b"$SYS"), "the topic would start with '$' (reserved for the server)"),
    (_rec("c", key=b"a" * 70_000), "the topic would be longer than 65535 bytes"),
])
def test_a_record_that_cannot_render_is_skipped_with_a_reason(
    tmp_path: Path, record: ConsumedRecord, reason: str
) -> None:
    down = _load(tmp_path, "downlink:\n  - {name: r, kafka: {topic: c}, mqtt: {topic: '{key}'}}\n")
    assert down.route(record) == ([], [("r", reason)])


def test_only_a_whole_last_level_variable_may_render_several_levels(tmp_path: Path) -> None:
    down = _load(tmp_path, """\
downlink:
  - {name: tail, kafka: {topic: c}, mqtt: {topic: "a/{key}"}}
  - {name: mid, kafka: {topic: c}, mqtt: {topic: "{key}/b"}}
  - {name: part, kafka: {topic: c}, mqtt: {topic: "a/k-{key}"}}
""")
    deliveries, skipped = down.route(_rec("c", key=b"x/y"))
    assert [d.topic for d in deliveries] == ["a/x/y"]
    assert [s.rule for s in skipped] == ["mid", "part"]
    assert skipped[0].reason == "{key} contains ['/'], not allowed in this topic"


def test_load_errors_say_file_line_rule_and_key(tmp_path: Path) -> None:
    errors = _errors(tmp_path, """\
downlink:
  - name: bad-qos
    kafka: {topic: commands}
    mqtt: {topic: "cmd/{key}", qos: 3}
  - name: bad-var
    kafka: {topic: commands}
    mqtt: {topic: "cmd/{client_id}"}
  - name: bad-topic
    kafka: {topic: "cmd{x}"}
    mqtt: {topic: "cmd/+"}
  - name: typo
    kafka: {topic: commands, clustr: x}
    mqtt: {topic: c}
  - name: bad-allow
    kafka: {topic: commands}
    mqtt: {topic: "cmd/{key}/k-{header.h}"}
    allow: {usernames: ["{header.h}"], client_ids: [a]}
  - name: bad-var
    kafka: {topic: commands}
    mqtt: {topic: "c"}
    allow: {}
""")
    assert errors == [
        "60-commands.yaml:4: bad-qos: mqtt.qos: Invalid enum value 3",
        "60-commands.yaml:7: bad-var: mqtt.topic: unknown variable {client_id}; "
        "known: key, topic, partition, header.NAME",
        "60-commands.yaml:9: bad-topic: kafka.topic: invalid Kafka topic name 'cmd{x}' "
        "(a fixed name: the consumer is assigned it)",
        "60-commands.yaml:10: bad-topic: mqtt.topic: an MQTT topic name may not contain ['+']",
        "60-commands.yaml:12: typo: kafka.clustr: unknown key (check spelling)",
        "60-commands.yaml:17: bad-allow: allow.client_ids: client_ids is not accepted: a client "
        "chooses its own client id, so it proves nothing; use usernames, identities or claims",
        "60-commands.yaml:17: bad-allow: allow.usernames[0]: unknown variable {header.h}; "
        "this rule's topic has whole-level variables: {key}",
        "60-commands.yaml:18: bad-var: name: duplicate downlink rule name; first at "
        "60-commands.yaml:5",
        "60-commands.yaml:21: bad-var: allow: allow lists nobody; give usernames, identities "
        "or claims",
    ]


def test_duplicate_keys_and_unknown_clusters_are_located(tmp_path: Path) -> None:
    errors = _errors(tmp_path, """\
downlink:
  - name: dup
    kafka: {topic: commands, cluster: edge}
    mqtt: {topic: c, topic: d}
""", clusters=["default"])
    assert errors == [
        "60-commands.yaml:2: dup: kafka.cluster: no Kafka cluster 'edge' in the gateway config "
        "(has: default)",
        "60-commands.yaml:4: dup: mqtt.topic: duplicate key",
    ]


def test_a_downlink_only_file_loads_and_an_unknown_section_is_still_refused(
    tmp_path: Path
) -> None:
    assert len(_load(tmp_path, ISSUE_RULES)) == 2
    assert load_rules(tmp_path).rules == 0
    errors = _errors(tmp_path, "downlinks: []\n")
    assert len(errors) == 1 and "downlinks" in errors[0]


def _who(
    username: str | None = None, cert_identity: str | None = None,
    claims: dict[str, str] | None = None,
) -> Identity:
    method = "jwt" if claims else "password" if username else "anonymous"
    return Identity(method=method, name=username, cert=cert_identity, claims=claims)  # type: ignore[arg-type]


AUTH_RULES = """\
downlink:
  - name: commands
    kafka: {topic: commands}
    mqtt: {topic: "cmd/{key}", qos: 1}
    allow: {usernames: ["{key}", "ops-*"], claims: {role: [admin]}}
  - name: broadcast
    kafka: {topic: broadcast}
    mqtt: {topic: "all/news", qos: 0}
  - name: tree
    kafka: {topic: tree}
    mqtt: {topic: "tree/{key}", qos: 2}
    allow: {identities: ["{key}", root]}
"""


@pytest.mark.parametrize(("topic_filter", "identity", "granted", "max_qos"), [
    ("cmd/dev-1", _who(username="dev-1"), True, 1),
    ("cmd/dev-2", _who(username="dev-1"), False, 0),
    ("cmd/+", _who(username="dev-1"), False, 0),  # a wildcard binds no {key}
    ("cmd/+", _who(username="ops-jo"), True, 1),
    ("cmd/#", _who(claims={"role": "admin"}), True, 1),
    ("cmd/dev-1", _who(), False, 0),  # anonymous
    ("all/news", _who(), True, 0),  # no allow: everyone
    ("all/+", _who(), True, 0),
    ("#", _who(), False, 0),  # overlaps commands, which refuses
    ("#", _who(username="ops-1"), False, 0),  # ... and tree, which wants an identity
    ("tree/a/b", _who(cert_identity="a/b"), True, 2),  # the tail binds several levels
    ("tree/a/+", _who(cert_identity="a/b"), False, 0),
    ("nothing/here", _who(username="ops-1"), False, 0),
    ("cmd", _who(username="ops-1"), False, 0),
    ("cmd/a/b", _who(username="ops-1"), True, 1),  # the tail {key} spans levels
    ("+/news", _who(), False, 0),  # overlaps cmd/{key} too
    ("+/news", _who(username="ops-1", cert_identity="root"), True, 2),
])
def test_allow_decides_who_may_subscribe_to_what(
    tmp_path: Path, topic_filter: str, identity: Identity, granted: bool, max_qos: int
) -> None:
    grant = _load(tmp_path, AUTH_RULES).authorize(topic_filter, identity)
    assert (grant.granted, grant.max_qos) == (granted, max_qos)
    if not granted:
        assert grant.reason


def test_a_grant_names_the_rules_serving_it(tmp_path: Path) -> None:
    down = _load(tmp_path, AUTH_RULES)
    grant = down.authorize("#", _who(username="ops-1", cert_identity="root",
                                        claims={"role": "admin"}))
    assert grant == (True, "", 2, ("commands", "broadcast", "tree"))
    assert down.authorize("cmd/x", _who()).reason == "not allowed to subscribe by rule commands"
    assert down.authorize("q", _who()).reason == "no downlink rule publishes to this filter"


@pytest.mark.parametrize(("template", "topic_filter", "overlaps"), [
    ("cmd/{key}", "cmd/+", True),
    ("cmd/{key}", "+/+", True),
    ("cmd/{key}", "+", False),
    ("cmd/{key}", "cmd", False),
    ("cmd/{key}", "cmd/#", True),
    ("cmd/{key}", "#", True),
    ("cmd/k-{key}", "cmd/k-1", True),
    ("cmd/k-{key}", "cmd/x-1", False),
    ("{key}", "$SYS/x", False),
    ("{key}", "a/b/c", True),
    ("$SYS/{key}", "#", False),
    ("$SYS/{key}", "+/x", False),
    ("$SYS/{key}", "$SYS/x", True),
    ("a/{key}/c", "a/b/c", True),
    ("a/{key}/c", "a/b/c/d", False),
    ("a/{key}/c", "a/b/#", True),
    ("a//b", "a/+/b", True),
    ("a//b", "a/x/b", False),
])
def test_template_filter_overlap(template: str, topic_filter: str, overlaps: bool) -> None:
    assert MqttTemplate(template).overlaps(topic_filter.split("/")) is overlaps


@pytest.mark.parametrize("template", ["", "a/#", "a/+", "{key", "a/{}", "{header.}", "{qos}"])
def test_bad_templates_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        MqttTemplate(template)


def test_rules_check_reports_downlink_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "60-commands.yaml").write_text(ISSUE_RULES)
    assert rules_check(str(tmp_path)) == 0
    (tmp_path / "60-commands.yaml").write_text(ISSUE_RULES.replace("qos: 1}", "qos: 5}", 1))
    assert rules_check(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path}/60-commands.yaml:4: commands: mqtt.qos: Invalid enum value 5" in out


@pytest.mark.parametrize(("text", "error"), [
    ("downlink: [5]\n", "60-commands.yaml:1: downlink[0]: Expected `object`, got `int`"),
    ("downlink: {}\n", "60-commands.yaml:1: downlink: Expected `array`, got `object`"),
    ("downlink:\n  - kafka: {topic: c}\n    mqtt: {topic: c}\n",
     "60-commands.yaml:2: downlink[0]: name: required key missing"),
])
def test_shape_errors_name_the_item(tmp_path: Path, text: str, error: str) -> None:
    assert _errors(tmp_path, text) == [error]
