"""Validated rule specs -> an immutable ``RuleTable`` the router reads without locks.

Everything that can be decided before a message arrives is decided here:
filters go into the trie, globs become regexes, templates are parsed, and
every inconsistency becomes a located load error instead of a runtime surprise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import msgspec

from gateway.model import Message
from gateway.routing.allow import compile_allow
from gateway.routing.downlink import DownlinkRules
from gateway.routing.rules import MatchSpec, Path, RuleSpec
from gateway.routing.templates import (
    Template,
    TemplateError,
    check_kafka_topic_template,
    compile_template,
    valid_kafka_topic,
)
from gateway.routing.trie import (
    Allow,
    FilterError,
    Glob,
    TopicFilter,
    Trie,
    parse_filter,
)

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
DEFAULT_KEY = "{client_id}"
# Kafka header names the gateway writes itself (dead-letter metadata, sequence stamps):
# no rule template and no client may set one.  Compared in lower case.
RESERVED_HEADER_PREFIX = "lastmile-"

Problem = tuple[str, Path]  # message, key path relative to the rule


@dataclass(frozen=True, slots=True)
class DeadLetter:
    cluster: str
    topic: str


class CompiledRule:
    """One rule, ready to apply.  Immutable by convention; shared across reloads never."""

    __slots__ = (
        "action",
        "allow",
        "client_id",
        "cluster",
        "continue_",
        "dead_letter_invalid",
        "file",
        "filter",
        "header_names",
        "headers",
        "high_priority",
        "index",
        "key",
        "line",
        "max_bytes",
        "mqtt_properties",
        "name",
        "payload_json",
        "reason",
        "sequence",
        "sources",
        "topic",
        "topic_claims",
        "username",
        "where",
    )

    def __init__(self, spec: RuleSpec, index: int, file: str, line: int | None) -> None:
        self.index = index
        self.name = spec.name
        self.file = file
        self.line = line
        self.action = spec.action
        self.continue_ = spec.continue_
        self.high_priority = spec.priority == "high"
        verb = "not allowed to publish" if spec.action == "deny" else "rejected"
        self.reason = spec.reason or f"{verb} by rule {spec.name}"
        self.filter: TopicFilter = TopicFilter("", (), ())
        self.sources: frozenset[str] | None = None
        self.client_id: Glob | None = None
        self.username: Glob | None = None
        self.allow: Allow | None = None
        # (capture name, globs): the rule applies only when every capture matches (``where``).
        self.where: tuple[tuple[str, Glob], ...] = ()
        self.payload_json = spec.payload is not None and spec.payload.format == "json"
        self.max_bytes = spec.payload.max_bytes if spec.payload else None
        self.dead_letter_invalid = False
        self.cluster = spec.kafka.cluster if spec.kafka else ""
        # Stamp lastmile-client-id / -session / -seq on this rule's records.
        self.sequence = spec.kafka.sequence if spec.kafka else False
        self.mqtt_properties = spec.kafka.mqtt_properties if spec.kafka else False
        self.topic: Template | None = None
        self.key: Template | None = None
        self.headers: tuple[tuple[str, Template], ...] = ()
        # Lower-cased names the templates set: a client header may not shadow them.
        self.header_names: frozenset[str] = frozenset()
        # Claims the Kafka topic renders from: without them the topic would be another one.
        self.topic_claims: tuple[str, ...] = ()

    def applies(self, message: Message) -> bool:
        """The per-message match conditions: client id and username.

        The topic filter and ``source`` depend on (topic, source) alone, so the
        router decides them once per cache entry, not here.
        """
        if self.client_id is not None and not self.client_id.matches(message.client_id):
            return False
        return self.username is None or self.username.matches(message.username)


class Candidate:
    """One rule a (topic, source) pair matches, with what that pair alone decides.

    Built by the router on the first message of a topic and kept in the table's
    cache: captures, and the topic / key / headers when their templates read
    nothing but the topic, the source and captures (``None``: render per message).
    """

    __slots__ = ("captures", "checks_identity", "headers", "key", "key_static", "rule", "topic")

    def __init__(self, rule: CompiledRule, captures: dict[str, str]) -> None:
        self.rule = rule
        self.captures = captures
        # Client id / username conditions still need each message.
        self.checks_identity = rule.client_id is not None or rule.username is not None
        self.topic: str | None = None  # pre-rendered and valid
        self.key_static = False
        self.key: bytes | None = None  # pre-rendered key when key_static (None: no key)
        self.headers: tuple[tuple[str, bytes], ...] | None = None  # pre-rendered, in order


# Entries in one table's routing cache; past it the cache starts again empty.
CACHE_SIZE = 32_768
# Longer topics are routed without the cache (bounded memory per entry).
CACHE_TOPIC_MAX = 256


class RuleTable:
    """The compiled rule set; replaced whole on reload, never mutated.

    ``cache`` (source -> topic -> candidates) belongs to this table only, so a
    reload, which swaps in a new table, starts with an empty cache by construction.
    """

    def __init__(
        self,
        entries: list[CompiledRule],
        *,
        version: str = "",
        files: tuple[str, ...] = (),
        dead_letter: DeadLetter | None = None,
        unmatched: str = "reject",
        cache_size: int = CACHE_SIZE,
        downlink: DownlinkRules | None = None,
    ) -> None:
        self.entries = tuple(entries)
        # Kafka -> MQTT rules (``downlink:`` sections); not served on the wire yet.
        self.downlink = downlink if downlink is not None else DownlinkRules()
        self.cache: dict[str, dict[str, tuple[Candidate, ...]]] = {}
        self.cache_size = cache_size
        self.cached = 0  # entries over all sources
        self.rules = len(self.entries)  # a count, for logs and `rules check`
        self.version = version
        self.files = files
        self.dead_letter = dead_letter
        self.unmatched = unmatched
        self.trie = Trie((r.index, r.filter.levels) for r in self.entries)
        clusters = {r.cluster for r in self.entries if r.action == "kafka"}
        if dead_letter is not None:
            clusters.add(dead_letter.cluster)
        # The app checks these against config/gateway.yaml's kafka clusters at startup.
        self.clusters = frozenset(clusters)


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _compile_match(rule: CompiledRule, spec: RuleSpec, problems: list[Problem]) -> None:
    match = spec.match if isinstance(spec.match, MatchSpec) else MatchSpec(topic=spec.match)
    where: Path = ("match", "topic") if isinstance(spec.match, MatchSpec) else ("match",)
    try:
        rule.filter = parse_filter(match.topic)
    except FilterError as exc:
        problems.append((str(exc), where))
    sources = _as_list(match.source)
    rule.sources = frozenset(sources) if sources is not None else None
    client_ids = _as_list(match.client_id)
    rule.client_id = Glob(client_ids) if client_ids is not None else None
    usernames = _as_list(match.username)
    rule.username = Glob(usernames) if usernames is not None else None


def _capture_names(rule: CompiledRule) -> list[str]:
    return [n for n, _ in rule.filter.captures]


def _unknown_capture(name: str, rule: CompiledRule) -> str:
    names = ", ".join(f"{{{n}}}" for n in _capture_names(rule)) or "none"
    return f"unknown capture {{{name}}}; this rule's match captures: {names}"


def _compile_where(rule: CompiledRule, spec: RuleSpec, problems: list[Problem]) -> None:
    if spec.where is None:
        return
    if not spec.where:
        problems.append(("where lists no capture; remove it or name one", ("where",)))
    captures = _capture_names(rule)
    where = []
    for name, globs in spec.where.items():
        if name not in captures:
            problems.append((_unknown_capture(name, rule), ("where", name)))
        elif not globs:
            problems.append((f"where.{name} lists no value; nothing would match", ("where", name)))
        else:
            where.append((name, Glob(globs)))
    rule.where = tuple(where)


def _check_action(spec: RuleSpec, problems: list[Problem]) -> None:
    if spec.action == "kafka":
        if spec.kafka is None:
            problems.append(("action kafka needs a 'kafka:' block with a topic", ("kafka",)))
        if spec.reason is not None:
            problems.append(("'reason' is only for action reject or deny", ("reason",)))
        return
    # drop, reject and deny never reach Kafka, so these keys would silently do nothing.
    for key in ("kafka", "payload", "allow"):
        if getattr(spec, key) is not None:
            problems.append((f"'{key}' has no effect with action {spec.action}", (key,)))
    if spec.priority != "normal":
        problems.append((f"'priority' has no effect with action {spec.action}", ("priority",)))
    if spec.continue_:
        problems.append((f"'continue' has no effect with action {spec.action}", ("continue",)))
    if spec.action == "drop" and spec.reason is not None:
        problems.append(("'reason' is only for action reject or deny", ("reason",)))


def _template(
    source: str, rule: CompiledRule, where: Path, problems: list[Problem], allow_json: bool = True
) -> Template | None:
    names = [n for n, _ in rule.filter.captures]
    try:
        template = compile_template(source, names, allow_json)
    except TemplateError as exc:
        problems.append((str(exc), where))
        return None
    if template.uses_json and not rule.payload_json:
        problems.append(("{json:...} needs 'payload: {format: json}' on this rule", where))
    return template


def _compile_kafka(rule: CompiledRule, spec: RuleSpec, problems: list[Problem]) -> None:
    kafka = spec.kafka
    if kafka is None or spec.action != "kafka":
        return
    if not kafka.cluster:
        problems.append(("cluster must not be empty", ("kafka", "cluster")))
    where: Path = ("kafka", "topic")
    rule.topic = _template(kafka.topic, rule, where, problems, allow_json=False)
    if rule.topic is not None:
        try:
            check_kafka_topic_template(rule.topic)
        except TemplateError as exc:
            problems.append((str(exc), where))
    key = DEFAULT_KEY if kafka.key is msgspec.UNSET else kafka.key
    if key is not None:
        rule.key = _template(key, rule, ("kafka", "key"), problems)
    headers = []
    for name, source in kafka.headers.items():
        if name.lower().startswith(RESERVED_HEADER_PREFIX):
            problems.append((
                f"header names starting with '{RESERVED_HEADER_PREFIX}' are reserved for the "
                "gateway (dead-letter metadata, sequence stamps); choose another name",
                ("kafka", "headers", name)))
            continue
        template = _template(source, rule, ("kafka", "headers", name), problems)
        if template is not None:
            headers.append((name, template))
    rule.headers = tuple(headers)
    rule.header_names = frozenset(name.lower() for name in kafka.headers)
    if rule.topic is not None:
        rule.topic_claims = rule.topic.claims


def _compile_payload_and_allow(
    rule: CompiledRule, spec: RuleSpec, has_dead_letter: bool, problems: list[Problem]
) -> None:
    if spec.payload is not None:
        if spec.payload.max_bytes is not None and spec.payload.max_bytes <= 0:
            problems.append(("max_bytes must be a positive number", ("payload", "max_bytes")))
        on_invalid = spec.payload.on_invalid
        if on_invalid == "dead-letter" and not has_dead_letter:
            where: Path = ("payload", "on_invalid")
            problems.append(("dead-letter needs a global dead_letter", where))
        rule.dead_letter_invalid = has_dead_letter and on_invalid != "reject"
    else:
        rule.dead_letter_invalid = has_dead_letter
    if spec.allow is not None:
        rule.allow = compile_allow(spec.allow, _capture_names(rule),
                                   partial(_unknown_capture, rule=rule), problems)


def compile_rule(
    spec: RuleSpec, index: int, file: str, line: int | None, has_dead_letter: bool
) -> tuple[CompiledRule, list[Problem]]:
    """Compile one rule; the rule is only usable when the problem list is empty."""
    problems: list[Problem] = []
    if not _NAME.fullmatch(spec.name):
        problems.append(("rule names use letters, digits, '.', '_' and '-'", ("name",)))
    rule = CompiledRule(spec, index, file, line)
    _compile_match(rule, spec, problems)
    _compile_where(rule, spec, problems)
    _check_action(spec, problems)
    _compile_payload_and_allow(rule, spec, has_dead_letter, problems)
    _compile_kafka(rule, spec, problems)
    return rule, problems


def check_dead_letter(cluster: str, topic: str) -> list[Problem]:
    problems: list[Problem] = []
    if not valid_kafka_topic(topic):
        problems.append((f"invalid Kafka topic name {topic!r}", ("dead_letter", "topic")))
    if not cluster:
        problems.append(("cluster must not be empty", ("dead_letter", "cluster")))
    return problems
