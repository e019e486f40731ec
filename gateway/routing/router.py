"""Message -> RouteResult: pure, no I/O, one read of the current table per message.

Semantics, in the order operators read them in docs/rules.md:
- candidates come from the trie in rule order; a rule whose extra conditions
  (source, client id, username) fail is skipped as if its filter had not matched;
- the first applying rule decides; a kafka rule with ``continue: true`` adds its
  record and lets later rules add theirs (fan-out);
- a refusal anywhere (reject, deny, allow, payload check) refuses the whole message:
  no partial fan-out, only the dead-letter record when the rule sends it there;
- a client header named ``lastmile-*``, or named like a header the rule's
  templates set, refuses the message (``reserved_header``): never dropped silently,
  never dead-lettered;
- drop ends evaluation; records already added by ``continue`` rules stand;
- a message that produces records of a ``kafka.sequence`` rule draws one number
  from its session's counter, once routing has accepted it (a refusal draws
  none), and every stamped record of that message carries the same number.
"""

from __future__ import annotations

import msgspec

from gateway.errors import (
    GatewayError,
    NoMatchingRule,
    NotAuthorized,
    PayloadInvalid,
    PayloadTooLarge,
    Rejected,
    ReservedHeader,
    TopicInvalid,
)
from gateway.model import Message, Record
from gateway.routing import mqtt_headers
from gateway.routing.compile import (
    CACHE_TOPIC_MAX,
    RESERVED_HEADER_PREFIX,
    Candidate,
    CompiledRule,
    DeadLetter,
    RuleTable,
)
from gateway.routing.templates import Context, valid_kafka_topic

_json_decode = msgspec.json.Decoder().decode


class RouteResult(msgspec.Struct):
    records: list[Record]
    error: GatewayError | None = None
    dropped: bool = False
    dead_lettered: bool = False
    rule: str = ""  # the first rule that applied
    refused_by: str = ""  # the rule that refused the message, when one did


class _Invalid(Exception):
    """A payload or rendered value the rule refuses; may go to the dead-letter topic."""

    def __init__(self, error: GatewayError, rule: CompiledRule) -> None:
        super().__init__(error.message)
        self.error = error
        self.rule = rule


def _check_payload(rule: CompiledRule, message: Message, ctx: Context) -> None:
    if rule.max_bytes is not None and len(message.payload) > rule.max_bytes:
        raise _Invalid(
            PayloadTooLarge(
                f"payload is {len(message.payload)} bytes; rule allows {rule.max_bytes}"
            ),
            rule,
        )
    if rule.payload_json and ctx.document is None:
        try:
            ctx.document = _json_decode(message.payload)
        except msgspec.DecodeError as exc:
            raise _Invalid(PayloadInvalid(f"payload is not valid JSON: {exc}"), rule) from exc


def _captures(rule: CompiledRule, levels: list[str]) -> dict[str, str]:
    return {name: levels[i] for name, i in rule.filter.captures}


_NO_CAPTURES: dict[str, str] = {}


def _plan(table: RuleTable, topic: str, source: str) -> tuple[Candidate, ...]:
    """The rules ``topic`` matches from ``source``, in order, with what they alone decide."""
    levels = topic.split("/")
    entries = table.entries
    probe = Message(source=source, topic=topic, payload=b"")
    out = []
    for index in table.trie.match(levels):
        rule = entries[index]
        if rule.sources is not None and source not in rule.sources:
            continue
        captures = _captures(rule, levels) if rule.filter.captures else _NO_CAPTURES
        if rule.where and not all(g.matches(captures[n]) for n, g in rule.where):
            continue  # like a filter that did not match
        cand = Candidate(rule, captures)
        if rule.action == "kafka":
            _prerender(cand, Context(probe, captures, None))
        out.append(cand)
    return tuple(out)


def _prerender(cand: Candidate, ctx: Context) -> None:
    rule = cand.rule
    names = [n for n, _ in rule.filter.captures]
    template = rule.topic
    if template is not None and template.per_topic(names):
        topic = template.render(ctx)
        if template.constant is not None or valid_kafka_topic(topic):
            cand.topic = topic  # an invalid one is left to the per-message path to refuse
    key = rule.key
    if key is None or key.per_topic(names):
        cand.key_static = True
        text = key.render(ctx) if key is not None else ""
        cand.key = text.encode() or None
    if all(t.per_topic(names) for _, t in rule.headers):
        rendered = ((name, t.render(ctx)) for name, t in rule.headers)
        cand.headers = tuple((name, v.encode()) for name, v in rendered if v)


class _Refused(Exception):
    """A refusal no ``on_invalid`` applies to: the client is told, nothing is dead-lettered."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


def _check_topic_claims(rule: CompiledRule, message: Message) -> None:
    # An absent claim would render another, valid topic ("t..x"): refuse instead.
    claims = message.claims or {}
    for name in rule.topic_claims:
        if not claims.get(name):
            raise _Refused(NotAuthorized(
                f"rule {rule.name} routes by claim {name!r}, which this client's "
                "credentials do not carry"))


def _reserved(headers: list[tuple[str, bytes]]) -> str | None:
    for name, _ in headers:
        if name.lower().startswith(RESERVED_HEADER_PREFIX):
            return name
    return None


def _candidates(table: RuleTable, message: Message) -> tuple[Candidate, ...]:
    topic = message.topic
    by_topic = table.cache.get(message.source)
    if by_topic is not None:
        found = by_topic.get(topic)
        if found is not None:
            return found
    plan = _plan(table, topic, message.source)
    if len(topic) <= CACHE_TOPIC_MAX:
        if table.cached >= table.cache_size:
            table.cache.clear()  # cheaper than LRU bookkeeping on every hit
            table.cached = 0
            by_topic = None
        if by_topic is None:
            by_topic = table.cache.setdefault(message.source, {})
        by_topic[topic] = plan
        table.cached += 1
    return plan


def _record_planned(cand: Candidate, message: Message, ctx: Context) -> Record:
    """``_record`` with the parts the cache pre-rendered taken as they are."""
    rule = cand.rule
    topic = cand.topic
    if message.headers and rule.header_names:
        for name, _ in message.headers:
            if name.lower() in rule.header_names:
                raise _Refused(ReservedHeader(
                    f"header {name!r} is set by rule {rule.name}; a client may not set it",
                    header=name))
    try:
        if topic is None:
            assert rule.topic is not None  # compile guarantees it for action kafka
            if rule.topic_claims:
                _check_topic_claims(rule, message)
            topic = rule.topic.render(ctx)
        if cand.key_static:
            key = cand.key
        else:
            assert rule.key is not None  # key_static is set when there is no key template
            key = rule.key.render(ctx).encode() or None
    except LookupError as exc:
        # The key decides partition and order; a key that cannot be built is a payload error.
        raise _Invalid(PayloadInvalid(str(exc)), rule) from exc
    static = cand.headers
    if static is not None:
        headers = list(static)
    else:
        headers = []
        for name, template in rule.headers:
            try:
                value = template.render(ctx)
            except LookupError:
                continue  # an optional JSON field absent from this payload
            if value:  # left out when empty, e.g. a user property absent on this publish
                headers.append((name, value.encode()))
    if cand.topic is None and not valid_kafka_topic(topic):
        raise _Invalid(TopicInvalid(f"rendered Kafka topic {topic!r} is not a legal name"), rule)
    if message.headers:
        headers.extend(message.headers)  # explicit hints extend what templates produce
    if rule.mqtt_properties:
        headers.extend(mqtt_headers.to_headers(message))
    return Record(
        cluster=rule.cluster,
        topic=topic,
        value=message.payload,
        # An explicit key (HTTP batch, REST proxy) wins; an empty key means "no key".
        key=message.key if message.key is not None else key,
        headers=headers,
        partition=message.partition,
        high_priority=rule.high_priority,
    )


def route(table: RuleTable, message: Message) -> RouteResult:
    """Apply ``table`` to ``message``.  Pure: the result says what to do.

    The trie match, the captures and whatever the templates derive from the
    topic alone are looked up in the table's cache: device topics repeat.
    """
    records: list[Record] = []
    stamped: list[Record] | None = None  # records of kafka.sequence rules
    first = ""
    ctx: Context | None = None
    if message.headers:
        reserved = _reserved(message.headers)
        if reserved is not None:
            return _refuse(ReservedHeader(
                f"header {reserved!r}: names starting with '{RESERVED_HEADER_PREFIX}' are "
                "reserved for the gateway", header=reserved), "")
    for cand in _candidates(table, message):
        rule = cand.rule
        if cand.checks_identity and not rule.applies(message):
            continue
        first = first or rule.name
        if rule.allow is not None and not rule.allow.permits(message, cand.captures):
            error = NotAuthorized(f"not allowed to publish to this topic by rule {rule.name}")
            return _refuse(error, first, rule.name)
        action = rule.action
        if action == "drop":
            if stamped:
                _stamp(stamped, message)
            return RouteResult(records, dropped=not records, rule=first)
        if action == "reject":
            return _refuse(Rejected(rule.reason), first, rule.name)
        if action == "deny":
            return _refuse(NotAuthorized(rule.reason), first, rule.name)
        if ctx is None:
            ctx = Context(message, cand.captures, None)
        else:
            ctx.captures = cand.captures
        try:
            if rule.payload_json or rule.max_bytes is not None:
                _check_payload(rule, message, ctx)
            record = _record_planned(cand, message, ctx)
            records.append(record)
            if rule.sequence:
                if stamped is None:
                    stamped = []
                stamped.append(record)
        except _Invalid as invalid:
            if invalid.rule.dead_letter_invalid:
                return _dead_letter(table, message, invalid.error, first, invalid.rule.name)
            return _refuse(invalid.error, first, rule.name)
        except _Refused as refused:
            return _refuse(refused.error, first, rule.name)
        if not rule.continue_:
            break
    if first:
        if stamped:
            _stamp(stamped, message)
        return RouteResult(records, rule=first)
    return _unmatched(table, message)


def _stamp(records: list[Record], message: Message) -> None:
    """Sequence stamps (docs/rules.md): the client id; for MQTT, session and number."""
    stamp = [("lastmile-client-id", message.client_id.encode())]
    sequence = message.sequence
    if sequence is not None:
        session, seq = sequence.next()
        stamp.append(("lastmile-session", session.encode()))
        stamp.append(("lastmile-seq", str(seq).encode()))
    for record in records:
        record.headers.extend(stamp)


def _unmatched(table: RuleTable, message: Message) -> RouteResult:
    error = NoMatchingRule(f"no rule routes topic {message.topic!r}")
    if table.unmatched == "drop":
        return RouteResult([], dropped=True)
    if table.unmatched == "dead-letter":
        return _dead_letter(table, message, error, "", "")
    return _refuse(error, "")


def _refuse(error: GatewayError, rule: str, refused_by: str = "") -> RouteResult:
    return RouteResult([], error=error, rule=rule, refused_by=refused_by)


def dead_letter_record(
    dead: DeadLetter, value: bytes, key: bytes | None, *, reason: str, detail: str,
    topic: str, headers: list[tuple[str, bytes]], rule: str | None = None, **context: str,
) -> Record:
    """The one shape of a dead-letter record: the original value and key, and why.

    ``context`` adds ``lastmile-<name>`` headers after the topic (client id, source).
    ``headers`` follow, without any ``lastmile-*`` one: nothing may shadow the gateway's.
    """
    lines = [("lastmile-reason", reason.encode()), ("lastmile-detail", detail.encode())]
    if rule is not None:
        lines.append(("lastmile-rule", rule.encode()))
    lines.append(("lastmile-topic", topic.encode()))
    lines += [(f"lastmile-{name.replace('_', '-')}", v.encode()) for name, v in context.items()]
    lines += [h for h in headers if not h[0].lower().startswith(RESERVED_HEADER_PREFIX)]
    return Record(cluster=dead.cluster, topic=dead.topic, value=value, key=key, headers=lines)


def _dead_letter(
    table: RuleTable, message: Message, error: GatewayError, first: str, rule: str
) -> RouteResult:
    dead = table.dead_letter
    assert dead is not None  # compile only enables dead-lettering when it is configured
    key = message.key if message.key is not None else (message.client_id.encode() or None)
    record = dead_letter_record(
        dead, message.payload, key, reason=error.code, detail=error.message,
        topic=message.topic, headers=message.headers, rule=rule,
        client_id=message.client_id, source=message.source,
    )
    return RouteResult([record], dead_lettered=True, rule=first)


class Router:
    """Holds the current table.  ``swap`` is one attribute assignment, so a
    message in flight finishes on the table it started with."""

    def __init__(self, table: RuleTable) -> None:
        self.table = table
        self.routed = 0
        self.dropped = 0
        self.dead_lettered = 0
        self.refused_by_reason: dict[str, int] = {}
        # Authorization refusals (allow, deny, a missing claim) per refusing rule.
        self.refused_by_rule: dict[str, int] = {}

    def route(self, message: Message) -> RouteResult:
        result = route(self.table, message)
        if result.records and not result.dead_lettered:
            self.routed += 1
        elif result.dropped:
            self.dropped += 1
        if result.dead_lettered:
            self.dead_lettered += 1
        if result.error is not None or result.dead_lettered:
            reason = result.error.code if result.error is not None else _dl_reason(result)
            self.refused_by_reason[reason] = self.refused_by_reason.get(reason, 0) + 1
            if isinstance(result.error, NotAuthorized):
                rule = result.refused_by
                self.refused_by_rule[rule] = self.refused_by_rule.get(rule, 0) + 1
        return result

    def swap(self, table: RuleTable) -> None:
        self.table = table


def _dl_reason(result: RouteResult) -> str:
    for name, value in result.records[0].headers:
        if name == "lastmile-reason":
            return value.decode()
    return "dead_letter"
