"""`lastmile rules check` and `lastmile rules test`: what operators run before deploying.

Both print for a person by default and one JSON document with ``--json``.
Exit codes: 0 when the rules are valid (for ``test``: whatever the outcome, it is
in the output), 1 when the rules are invalid or the input cannot be read, 2 when
``check --config`` names a config that does not load.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import msgspec

from gateway.downlink.record import ConsumedRecord
from gateway.errors import ConfigError, GatewayError
from gateway.model import Message, Sequence
from gateway.routing.compile import RuleTable
from gateway.routing.downlink import Delivery
from gateway.routing.load import load_rules
from gateway.routing.router import RouteResult, route
from gateway.routing.rules import RuleError, RulesError

DEFAULT_DIR = "bridge-rules"
DEFAULT_CLIENT_ID = "lastmile-cli"


def _error_dict(error: ConfigError) -> dict[str, object]:
    if isinstance(error, RuleError):
        return error.to_dict()
    return {
        "file": error.file,
        "line": error.line,
        "rule": "",
        "key": error.key,
        "message": str(error),
    }


def _load(directory: str, json_out: bool,
          clusters: Collection[str] | None = None) -> RuleTable | None:
    try:
        return load_rules(directory, clusters)
    except RulesError as exc:
        if json_out:
            errors = [_error_dict(e) for e in exc.errors]
            print(json.dumps({"ok": False, "errors": errors}, indent=2))
        else:
            for error in exc.errors:
                print(error)
            print(f"{len(exc.errors)} error(s) in {directory}; the running rules are unchanged")
        return None


def rules_check(directory: str | None = DEFAULT_DIR, json_out: bool = False,
                config: str | None = None) -> int:
    """Validate the rules; with ``config``, also that every cluster they name is in it
    (the rules directory then defaults to the config's ``rules.dir``)."""
    clusters: frozenset[str] | None = None
    if config is not None:
        from gateway.config import load_config

        try:
            # The TLS files may exist only where the gateway runs: not read here.
            loaded = load_config(config, tls_files=False)
        except ConfigError as exc:
            for error in getattr(exc, "errors", None) or [exc]:
                print(f"config error: {error}", file=sys.stderr)
            return 2
        clusters = frozenset(loaded.kafka.clusters)
        directory = directory or loaded.rules.dir
    directory = directory or DEFAULT_DIR
    table = _load(directory, json_out, clusters)
    if table is None:
        return 1
    summary = {
        "ok": True,
        "version": table.version,
        "files": list(table.files),
        "rules": table.rules,
        "downlink_rules": len(table.downlink),
        "clusters": sorted(table.clusters),
        "dead_letter": _dead_letter_dict(table),
        "unmatched": table.unmatched,
    }
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"ok: {table.rules} rules in {len(table.files)} files, version {table.version}; "
            f"clusters: {', '.join(sorted(table.clusters)) or '-'}; unmatched: {table.unmatched}; "
            f"downlink: {len(table.downlink)} rules"
        )
    return 0


def _dead_letter_dict(table: RuleTable) -> dict[str, str] | None:
    if table.dead_letter is None:
        return None
    return {"cluster": table.dead_letter.cluster, "topic": table.dead_letter.topic}


def _read_payload(payload: str | None) -> bytes:
    if payload is None:
        return b""
    if payload.startswith("@"):
        return Path(payload[1:]).read_bytes()
    return payload.encode()


def _load_with_payload(directory: str, json_out: bool,
                       payload: str | None) -> tuple[RuleTable, bytes] | None:
    """The rules and the payload of an imaginary message; None (said why) if either fails."""
    table = _load(directory, json_out)
    if table is None:
        return None
    try:
        return table, _read_payload(payload)
    except OSError as exc:
        print(f"cannot read payload file: {exc}", file=sys.stderr)
        return None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "backslashreplace")


def _outcome(result: RouteResult) -> str:
    if result.error is not None:
        return "refused"
    if result.dead_lettered:
        return "dead-letter"
    if result.dropped:
        return "dropped"
    return "kafka"


def _error_json(error: GatewayError) -> dict[str, object]:
    return {**error.to_json(), "mqtt_reason": error.mqtt_reason, "http_status": error.http_status}


def _result_json(table: RuleTable, result: RouteResult) -> dict[str, Any]:
    records = [
        {
            "cluster": r.cluster,
            "topic": r.topic,
            "key": _text(r.key),
            "headers": [[name, _text(value)] for name, value in r.headers],
            "partition": r.partition,
        }
        for r in result.records
    ]
    return {
        "version": table.version,
        "rule": result.rule,
        "outcome": _outcome(result),
        "records": records,
        "error": _error_json(result.error) if result.error is not None else None,
    }


def _print_result(table: RuleTable, message: Message, result: RouteResult) -> None:
    print(
        f"rules version {table.version}: {message.source} publish to {message.topic!r} "
        f"by client {message.client_id!r}, username {message.username!r}"
        + (f", certificate {message.cert_identity!r}" if message.cert_identity else "")
        + (f", claims {dict(message.claims)!r}" if message.claims else "")
    )
    where = {r.name: f"{r.file}:{r.line}" for r in table.entries}
    print(f"rule: {result.rule} ({where[result.rule]})" if result.rule else "rule: (none matched)")
    if result.error is not None:
        e = result.error
        print(
            f"refused: {e.code}: {e.message} (MQTT reason 0x{e.mqtt_reason:02x}, "
            f"HTTP {e.http_status})"
        )
    elif result.dropped:
        print("dropped: acknowledged to the client and not produced")
    for record in result.records:
        label = "dead-letter" if result.dead_lettered else "kafka"
        print(
            f"{label}: cluster {record.cluster} topic {record.topic} key {_text(record.key)!r}"
            + (f" partition {record.partition}" if record.partition is not None else "")
        )
        for name, value in record.headers:
            print(f"  header {name}: {_text(value)}")


def rules_test(
    directory: str,
    topic: str,
    payload: str | None = None,
    client_id: str = DEFAULT_CLIENT_ID,
    username: str | None = None,
    source: str = "mqtt",
    qos: int = 0,
    json_out: bool = False,
    user_properties: list[tuple[str, str]] | None = None,
    cert_identity: str | None = None,
    claims: list[tuple[str, str]] | None = None,
) -> int:
    """Route one imaginary publish through the rules in ``directory`` and show the result."""
    loaded = _load_with_payload(directory, json_out, payload)
    if loaded is None:
        return 1
    table, body = loaded
    message = Message(
        source=source,
        topic=topic,
        payload=body,
        qos=qos,
        client_id=client_id,
        username=username,
        cert_identity=cert_identity,
        claims=dict(claims) if claims else None,
        user_properties=user_properties or [],
        # A fresh session: a kafka.sequence rule shows the stamps of its first message.
        sequence=Sequence() if source == "mqtt" else None,
    )
    result = route(table, message)
    if json_out:
        print(json.dumps(_result_json(table, result), indent=2))
    else:
        _print_result(table, message, result)
    return 0


def _properties(d: Delivery) -> list[tuple[str, Any]]:
    """The MQTT 5 properties a delivery carries (from the record's mqtt-* headers)."""
    out: list[tuple[str, Any]] = []
    if d.properties is not None:
        for name, value in msgspec.structs.asdict(d.properties).items():
            if value is None or value == []:
                continue
            if isinstance(value, bytes):
                value = _text(value)
            elif name == "user_properties":
                value = [list(pair) for pair in value]
            out.append((name, value))
    if d.expiry is not None:
        out.append(("message_expiry_interval", d.expiry))
    return out


def rules_test_downlink(
    directory: str,
    kafka_topic: str,
    key: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    partition: int = 0,
    payload: str | None = None,
    cluster: str = "default",
    json_out: bool = False,
) -> int:
    """Route one imaginary Kafka record through the ``downlink:`` rules and show the result."""
    loaded = _load_with_payload(directory, json_out, payload)
    if loaded is None:
        return 1
    table, body = loaded
    record = ConsumedRecord(
        topic=kafka_topic, partition=partition, offset=0, cluster=cluster,
        key=None if key is None else key.encode(), value=body,
        headers=tuple((name, value.encode()) for name, value in headers or ()),
    )
    deliveries, skipped = table.downlink.route(record)
    where = {r.name: f"{r.file}:{r.line}" for r in table.downlink.rules}
    if json_out:
        print(json.dumps({
            "version": table.version,
            "deliveries": [
                {"rule": d.rule, "where": where[d.rule], "topic": d.topic, "qos": d.qos,
                 "retain": d.retain, "delete": d.delete, "properties": dict(_properties(d))}
                for d in deliveries
            ],
            "skipped": [{"rule": s.rule, "where": where[s.rule], "reason": s.reason}
                        for s in skipped],
        }, indent=2))
        return 0
    print(
        f"rules version {table.version}: record in Kafka topic {kafka_topic!r} "
        f"(cluster {cluster}, partition {partition}), key {key!r}"
    )
    if not deliveries and not skipped:
        print(f"no downlink rule reads Kafka topic {kafka_topic!r} of cluster {cluster}")
    for d in deliveries:
        print(f"rule {d.rule} ({where[d.rule]}): publish to MQTT topic {d.topic!r} "
              f"qos {d.qos} retain {str(d.retain).lower()}"
              + (" (empty: deletes the retained message)" if d.delete else ""))
        for name, value in _properties(d):
            print(f"  {name}: {value}")
    for s in skipped:
        print(f"rule {s.rule} ({where[s.rule]}): skipped: {s.reason}")
    return 0


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name, value


def add_rules_parser(subparsers: Any) -> None:
    """Register ``rules check`` and ``rules test`` on an argparse subparsers object."""
    rules = subparsers.add_parser("rules", help="check routing rules, or test a topic")
    sub = rules.add_subparsers(dest="rules_command", required=True)

    check = sub.add_parser("check", help="validate every rule file; list every error")
    check.add_argument("directory", nargs="?", default=None,
                       help=f"rules directory (default: the config's rules.dir, or {DEFAULT_DIR})")
    check.add_argument("--config", default=None, metavar="FILE",
                       help="gateway settings YAML: also catch clusters it does not have")
    check.add_argument("--json", action="store_true", help="one JSON document for scripts")
    check.set_defaults(func=lambda a: rules_check(a.directory, a.json, a.config))

    test = sub.add_parser(
        "test", help="show exactly where a publish to TOPIC would go (or, with --downlink, "
        "which MQTT topics a Kafka record would reach)")
    test.add_argument("topic", nargs="?", help="the MQTT topic of the publish (not with "
                      "--downlink)")
    test.add_argument("--downlink", metavar="KAFKA_TOPIC",
                      help="test the downlink rules with a record in KAFKA_TOPIC")
    test.add_argument("--key", help="--downlink: the record's key (none if not given)")
    test.add_argument("--header", type=_name_value, action="append", default=[],
                      metavar="NAME=VALUE", help="--downlink: a record header (repeatable)")
    test.add_argument("--partition", type=int, default=0, help="--downlink: the partition")
    test.add_argument("--cluster", default="default", help="--downlink: the Kafka cluster")
    test.add_argument("--payload", help="payload text, or @FILE to read a file")
    test.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    test.add_argument("--username", help="the verified name (password-file user, JWT sub)")
    test.add_argument("--cert-identity", help="the client certificate's identity (CN)")
    test.add_argument("--claim", type=_name_value, action="append", default=[],
                      metavar="NAME=VALUE", help="a verified JWT claim (repeatable)")
    test.add_argument("--source", default="mqtt", choices=["mqtt", "http", "bridge"])
    test.add_argument("--qos", type=int, default=0, choices=[0, 1, 2])
    test.add_argument(
        "--user-property",
        type=_name_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an MQTT 5 user property (repeatable)",
    )
    test.add_argument("--rules", default=DEFAULT_DIR, metavar="DIR")
    test.add_argument("--json", action="store_true", help="one JSON document for scripts")
    test.set_defaults(func=_test_command)


def _test_command(a: argparse.Namespace) -> int:
    if a.downlink is not None:
        if a.topic is not None:
            print("give either an MQTT topic or --downlink KAFKA_TOPIC, not both",
                  file=sys.stderr)
            return 1
        return rules_test_downlink(a.rules, a.downlink, a.key, a.header, a.partition,
                                   a.payload, a.cluster, a.json)
    if a.topic is None:
        print("rules test needs an MQTT topic (or --downlink KAFKA_TOPIC)", file=sys.stderr)
        return 1
    return rules_test(
        a.rules, a.topic, a.payload, a.client_id, a.username, a.source, a.qos, a.json,
        a.user_property, a.cert_identity, a.claim,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lastmile")
    add_rules_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
