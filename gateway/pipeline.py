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
from collections.abc import Callable
from typing import Protocol

import structlog

from gateway.buffer import Buffer, FlowControl
from gateway.errors import GatewayError, ShuttingDown
from gateway.model import Ack, Message, Outcome, Record

# Refuses a routed record Kafka would always refuse (size, partition), before any ack.
Admit = Callable[[Record], GatewayError | None]

log = structlog.get_logger("lastmile.pipeline")

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


class RouterLike(Protocol):
    def route(self, message: Message) -> RouteResultLike: ...


class Pipeline:
    __slots__ = ("_closing", "admit", "buffer", "counters", "flow", "router")

    def __init__(self, router: RouterLike, buffer: Buffer, admit: Admit | None = None) -> None:
        self.router = router
        self.admit = admit
        self.buffer = buffer
        self.flow: FlowControl = buffer.flow
        self._closing = False
        # Routing outcomes (routed, dropped, dead-lettered, refused) are counted by the
        # router; the pipeline counts only what passes its own door.
        self.counters: dict[str, int] = {"messages": 0, "records": 0, "shutting_down": 0}

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        counters = self.counters
        counters["messages"] += 1
        if self._closing:
            counters["shutting_down"] += 1
            on_done(Outcome(ok=False, error=ShuttingDown()))
            return
        result = self.router.route(message)
        if result.error is not None:
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

    def stop_intake(self) -> None:
        """New publishes fail with ShuttingDown; records already taken still resolve."""
        self._closing = True
