"""Message -> routing -> Records -> buffer, and the one ack back to the source.

This is the only door into the gateway for every source (MQTT, HTTP, bridge)::

    pipeline.publish(message, on_done)   # on_done(Outcome) runs exactly once
    pipeline.flow.paused                 # True: stop reading from clients
    pipeline.flow.subscribe(listener)    # listener(True) pause / listener(False) resume

``on_done`` may run synchronously (a rule rejected or dropped the message) or
later on the event loop (when every record is safe or one failed).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Hashable
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
        counters = self.counters
        counters["messages"] += 1
        if self._closing:
            counters["shutting_down"] += 1
            on_done(Outcome(ok=False, error=ShuttingDown()))
            return
        result = self.router.route(message)
        if result.error is not None:
            if isinstance(result.error, NotAuthorized):
                self._not_authorized(message, result.error, result.refused_by)
            on_done(Outcome(ok=False, error=result.error, rule=result.rule))
            return
        if result.dropped:
            on_done(Outcome(ok=True, dropped=True, rule=result.rule))
            return
        records = result.records
        admit = self.admit
        if admit is not None:
            for record in records:
                refused = admit(record)
                if refused is not None:
                    on_done(Outcome(ok=False, error=refused, rule=result.rule))
                    return
        ack = Ack(on_done, len(records), result.rule, result.dead_lettered)
        counters["records"] += len(records)
        submit = self.buffer.submit
        for record in records:
            record.ack = ack
            submit(record)

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
