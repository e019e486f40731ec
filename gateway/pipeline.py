"""Message -> routing -> Records -> buffer, and the one ack back to the source.

This is the only door into the gateway for every source (MQTT, HTTP, bridge)::

    pipeline.publish(message, on_done)   # on_done(Outcome) runs exactly once
    pipeline.publish_many(messages, on_done)  # an HTTP batch: on_done(list[Outcome]) once
    pipeline.flow.paused                 # True: stop reading from clients
    pipeline.flow.subscribe(listener)    # listener(True) pause / listener(False) resume

``on_done`` may run synchronously (a rule rejected or dropped the message) or
later on the event loop (when every record is safe or one failed).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Protocol

import structlog

from gateway.buffer import Buffer, FlowControl
from gateway.errors import GatewayError, NotAuthorized, ShuttingDown
from gateway.model import Ack, Message, Outcome, Record

# Refuses a routed record Kafka would always refuse (size, partition), before any ack.
Admit = Callable[[Record], GatewayError | None]

log = structlog.get_logger("lastmile.pipeline")

# publish_not_authorized: one line per (identity, rule) per interval, and at most
# REFUSAL_LOG_BUDGET lines per interval overall (client ids are the client's choice,
# so "per identity" alone would not bound a client that changes its id every time).
REFUSAL_LOG_INTERVAL_S = 10.0
REFUSAL_LOG_BUDGET = 100
REFUSAL_LOG_KEYS = 10_000
_TOPIC_LOGGED = 256  # characters of a refused topic written to the log

# Young-generation threshold and the two older ones (CPython's default: 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Garbage-collector settings for a worker process (call once, at startup).

    Every message allocates a dozen short-lived objects, and up to the buffer's
    high-water mark of them stay alive while Kafka confirms (hundreds of
    thousands under a QoS 0 flood). With the default thresholds the collector
    keeps walking that live set: a third of the CPU per message at full QoS 0
    rate (docs/performance.md). Objects made at startup are frozen out of
    collection, and young collections run every 50,000 allocations.  Nearly all
    per-message objects are freed by reference counting; the rare cycles
    (a closed connection and its session) still go at the next collection.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class RouteResultLike(Protocol):
    records: list[Record]
    error: GatewayError | None
    dropped: bool
    dead_lettered: bool
    rule: str
    refused_by: str


class RefusalLog:
    """Decides which authorization refusals are written, so a flood cannot flood the log.

    ``admit(key)`` returns None to stay silent, or how many lines were held back
    since (for this key, and for keys the overall budget or pruning silenced).
    """

    __slots__ = ("_budget", "_clock", "_interval", "_lines", "_max_keys", "_others",
                 "_seen", "_window")

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL_S,
                 budget: int = REFUSAL_LOG_BUDGET, max_keys: int = REFUSAL_LOG_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._budget = budget
        self._max_keys = max_keys
        self._clock = clock
        self._seen: dict[Hashable, list[float]] = {}  # key -> [last written, held back]
        self._window = -interval
        self._lines = 0
        self._others = 0  # held back by the budget or forgotten by pruning

    def admit(self, key: Hashable) -> tuple[int, int] | None:
        """None: stay silent.  Else (held back for this key, held back for others)."""
        now = self._clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self._interval:
            entry[1] += 1
            return None
        if now - self._window >= self._interval:
            self._window, self._lines = now, 0
        if self._lines >= self._budget:
            self._others += 1
            return None
        self._lines += 1
        if entry is None and len(self._seen) >= self._max_keys:
            self._prune(now)
        held = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        others, self._others = self._others, 0
        return held, others

    def _prune(self, now: float) -> None:
        stale = [k for k, e in self._seen.items() if now - e[0] >= self._interval]
        if len(stale) < len(self._seen) // 2:
            stale = list(self._seen)  # mostly fresh keys: start over rather than scan often
        for key in stale:
            self._others += int(self._seen.pop(key)[1])


class RouterLike(Protocol):
    def route(self, message: Message) -> RouteResultLike: ...


class Pipeline:
    __slots__ = ("_closing", "admit", "buffer", "counters", "flow", "refusal_log", "router")

    def __init__(self, router: RouterLike, buffer: Buffer, admit: Admit | None = None) -> None:
        self.router = router
        self.admit = admit
        self.buffer = buffer
        self.flow: FlowControl = buffer.flow
        self._closing = False
        # Routing outcomes (routed, dropped, dead-lettered, refused) are counted by the
        # router; the pipeline counts only what passes its own door.
        self.counters: dict[str, int] = {"messages": 0, "records": 0, "shutting_down": 0}
        self.refusal_log = RefusalLog()

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        records = self._take(message, on_done)
        if records:
            submit = self.buffer.submit
            for record in records:
                submit(record)

    def publish_many(self, messages: Sequence[Message],
                     on_done: Callable[[list[Outcome]], None]) -> None:
        """``publish`` of each message (an HTTP batch); ``on_done(outcomes)`` runs once,
        with every message's outcome in order, when the last one is known.

        Each message is routed, admitted and acknowledged on its own, as by
        ``publish``; what is shared is the bookkeeping: one collector rather
        than a callback per message, and one ``buffer.submit_many`` for the
        records of the whole batch, in order.
        """
        batch = _Outcomes(len(messages), on_done)
        settle = batch.settle
        pending: list[Record] = []
        for index, message in enumerate(messages):
            if message.partition is not None and pending:
                # Admitting an explicit partition reads the buffer's state (acks from the
                # spool or from Kafka): hand over the records before it first, as
                # ``publish`` would have.
                self.buffer.submit_many(pending)
                pending = []
            records = self._take(message, partial(settle, index))
            if records:
                pending += records
        if pending:
            self.buffer.submit_many(pending)
        if not messages:
            on_done([])

    def _take(self, message: Message, on_done: Callable[[Outcome], None]) -> list[Record]:
        """Route and admit ``message``; its records, each with the message's ``Ack``
        (none: ``on_done`` already ran, the message is refused or dropped)."""
        counters = self.counters
        counters["messages"] += 1
        if self._closing:
            counters["shutting_down"] += 1
            on_done(Outcome(ok=False, error=ShuttingDown()))
            return _NONE
        result = self.router.route(message)
        if result.error is not None:
            if isinstance(result.error, NotAuthorized):
                self._not_authorized(message, result.error, result.refused_by)
            on_done(Outcome(ok=False, error=result.error, rule=result.rule))
            return _NONE
        if result.dropped:
            on_done(Outcome(ok=True, dropped=True, rule=result.rule))
            return _NONE
        records = result.records
        admit = self.admit
        if admit is not None:
            for record in records:
                refused = admit(record)
                if refused is not None:
                    on_done(Outcome(ok=False, error=refused, rule=result.rule))
                    return _NONE
        ack = Ack(on_done, len(records), result.rule, result.dead_lettered)
        counters["records"] += len(records)
        for record in records:
            record.ack = ack
        return records

    def _not_authorized(self, message: Message, error: GatewayError, rule: str) -> None:
        """Log a refusal by ``allow`` / ``deny`` with who and where (the router counts it)."""
        admitted = self.refusal_log.admit(
            (message.username, message.cert_identity, message.client_id, rule))
        if admitted is None:
            return
        held, others = admitted
        log.warning("publish_not_authorized", username=message.username,
                    cert_identity=message.cert_identity, client_id=message.client_id,
                    source=message.source, topic=message.topic[:_TOPIC_LOGGED], rule=rule,
                    reason=error.message, suppressed=held, others_suppressed=others)

    def stop_intake(self) -> None:
        """New publishes fail with ShuttingDown; records already taken still resolve."""
        self._closing = True


_NONE: list[Record] = []  # never appended to


class _Outcomes:
    """The outcomes of a ``publish_many`` by index; the callback runs once, when the last
    one is known (each message's ``Ack`` settles it exactly once)."""

    __slots__ = ("callback", "left", "outcomes")

    def __init__(self, n: int, callback: Callable[[list[Outcome]], None]) -> None:
        self.callback = callback
        self.outcomes: list[Outcome] = [_UNKNOWN] * n
        self.left = n

    def settle(self, index: int, outcome: Outcome) -> None:
        self.outcomes[index] = outcome
        self.left -= 1
        if not self.left:
            self.callback(self.outcomes)


_UNKNOWN = Outcome(ok=False)  # a placeholder, replaced before the callback runs
