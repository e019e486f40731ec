"""Prometheus metrics for every stage.

Hot paths keep plain integer counters on their own objects (an attribute
increment costs nothing); a pump copies them into prometheus-client metrics
once a second.  That keeps protocol and sink code free of metric calls and
works unchanged in prometheus-client's multiprocess mode, where every worker
writes its own files and any worker's /metrics sums them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, get_args

import structlog
from prometheus_client import Counter, Gauge, Histogram

from gateway.auth import REFUSAL_CODES, Method
from gateway.observability.latency import BUCKETS, Latency
from gateway.observability.looplag import LoopLag

if TYPE_CHECKING:
    from gateway.pipeline import Pipeline
    from gateway.routing import Router, RulesReloader
    from gateway.sinks.kafka import KafkaSink
    from gateway.sources.http_server import HttpIngest
    from gateway.sources.mqtt_server import MqttServer

log = structlog.get_logger("lastmile.metrics")


class Watched(Protocol):
    """What observability reads of one gateway process (``gateway.app.App`` is one).

    Attributes are read on every tick: components that start later appear then.
    """

    worker_id: int
    pipeline: Pipeline | None
    sinks: dict[str, KafkaSink]
    router: Router | None
    reloader: RulesReloader | None
    mqtt: MqttServer | None
    http: HttpIngest | None

    @property
    def auth(self) -> AuthCounters | None: ...


class AuthCounters(Protocol):
    """The counters ``gateway.auth.check.Authenticator`` keeps (every verdict it gives)."""

    @property
    def accepted(self) -> Mapping[str, int]: ...  # per method
    @property
    def refused(self) -> Mapping[str, int]: ...  # per refusal reason
    @property
    def throttled(self) -> int: ...  # attempts held back by the failed-attempt throttle

MESSAGES = Counter("lastmile_pipeline_total",
                   "Messages in, records out, and routing outcomes (routed, dropped, "
                   "dead_lettered)", ["event"])
RECORDS = Counter("lastmile_records_total", "Kafka records by result", ["cluster", "result"])
RULES_RELOADS = Counter("lastmile_rules_reloads_total", "Rules reloads by result", ["result"])
REFUSED = Counter("lastmile_refused_total", "Messages refused or dead-lettered by reason",
                  ["reason"])
AUTHZ_REFUSED = Counter("lastmile_authorization_refused_total",
                        "Publishes refused by a rule's allow or deny, by rule", ["rule"])
BUFFER = Counter("lastmile_buffer_events_total", "Buffer and spool events", ["event"])
BUFFER_STATE = Gauge("lastmile_buffer_state", "Buffer and spool levels (bytes, records, segments)",
                     ["name"], multiprocess_mode="livesum")
# stats() keys that are levels, not running totals.
_LEVELS = {"pending_bytes", "spool_bytes", "spool_records", "spool_segments", "replay_in_flight",
           "waiting_for_spool", "via_spool"}
# The drain (docs/spool.md, "Watching a drain"), per priority (normal, high).
SPOOL_BACKLOG_RECORDS = Gauge("lastmile_spool_backlog_records",
                              "Records acknowledged from the spool, not yet confirmed by Kafka",
                              ["priority"], multiprocess_mode="livesum")
SPOOL_BACKLOG_BYTES = Gauge("lastmile_spool_backlog_bytes",
                            "Bytes of the spool's segment files (unconfirmed records, and "
                            "confirmed ones in segments not yet deleted)", ["priority"],
                            multiprocess_mode="livesum")
SPOOL_OLDEST_AGE = Gauge("lastmile_spool_oldest_record_age_seconds",
                         "Age of the oldest record still owed to Kafka (0: none)", ["priority"],
                         multiprocess_mode="livemax")
SPOOL_REPLAYED = Counter("lastmile_spool_replayed_records_total",
                         "Spooled records confirmed by Kafka (rate() of it: the drain rate)",
                         ["priority"])
SPOOL_REPLAYED_BYTES = Counter("lastmile_spool_replayed_bytes_total",
                               "Bytes of spooled records confirmed by Kafka", ["priority"])
SPOOL_DRAIN_RATE = Gauge("lastmile_spool_drain_records_per_second",
                         "Spooled records confirmed by Kafka per second, last 10 s",
                         ["priority"], multiprocess_mode="livesum")
SPOOL_DRAIN_BYTES = Gauge("lastmile_spool_drain_bytes_per_second",
                          "Bytes of spooled records confirmed by Kafka per second, last 10 s",
                          ["priority"], multiprocess_mode="livesum")
SPOOL_DRAINING = Gauge("lastmile_spool_draining",
                       "1 while a backlog drains (from the first spill until caught up)",
                       ["priority"], multiprocess_mode="livemax")
CONNECTIONS = Gauge("lastmile_mqtt_connections", "Open MQTT connections",
                    multiprocess_mode="livesum")
MQTT_REFUSED = Counter("lastmile_mqtt_refused_connections_total",
                       "MQTT connections closed unread: over limits.max_connections")
MQTT_LIMIT_CLOSES = Counter("lastmile_mqtt_limit_closes_total",
                            "MQTT connections closed by a per-connection bound: keep_alive "
                            "(1.5 x the keep alive in force, capped by limits.max_keepalive_s), "
                            "partial_packet (limits.partial_packet_timeout_s), "
                            "topic_alias_bytes (limits.topic_alias_max_bytes), slow_reader "
                            "(output unread above limits.max_write_buffer_bytes for "
                            "limits.slow_reader_timeout_s)", ["limit"])
for _limit in ("keep_alive", "partial_packet", "topic_alias_bytes", "slow_reader"):
    MQTT_LIMIT_CLOSES.labels(_limit)  # exported at 0 before the first close
MQTT_CONNECT_LIMITS = Counter("lastmile_mqtt_connect_limits_total",
                              "MQTT connections refused by a connect limit: connect_rate "
                              "(limits.connect_rate_per_s: CONNACK 0x9F, 3.1.1 closed), "
                              "per_source (limits.max_connections_per_source: closed unread)",
                              ["limit"])
for _limit in ("connect_rate", "per_source"):
    MQTT_CONNECT_LIMITS.labels(_limit)
SESSIONS = Gauge("lastmile_mqtt_sessions_retained",
                 "Disconnected MQTT sessions kept for a reconnect (limits.max_sessions per worker)",
                 multiprocess_mode="livesum")
SESSION_EVENTS = Counter("lastmile_mqtt_sessions_total",
                         "MQTT sessions expired, evicted (over limits.max_sessions), and CONNECTs "
                         "refused for a client id over limits.max_client_id_bytes", ["event"])
HTTP_CONNECTIONS = Gauge("lastmile_http_connections",
                         "Open HTTP connections (limits.http_max_connections per worker)",
                         multiprocess_mode="livesum")
HTTP_REFUSED = Counter("lastmile_http_refused_total",
                       "HTTP connections and requests refused or closed by a limit: "
                       "max_connections, header_timeout, keepalive_timeout, body_timeout, "
                       "inflight_body_bytes, idempotency_key_too_long", ["reason"])
HTTP_STATE = Gauge("lastmile_http_state",
                   "HTTP levels: inflight_body_bytes (limits.http_max_inflight_body_bytes), "
                   "idempotency_bytes and idempotency_keys (limits.idempotency_max_*), "
                   "pending_heads", ["name"], multiprocess_mode="livesum")
PENDING_BYTES = Gauge("lastmile_buffer_pending_bytes", "Bytes waiting for Kafka or the spool",
                      multiprocess_mode="livesum")
PAUSED = Gauge("lastmile_backpressure_paused", "1 while sources are paused",
               multiprocess_mode="livemax")
IN_FLIGHT = Gauge("lastmile_kafka_in_flight", "Records handed to librdkafka, not yet reported",
                  ["cluster"], multiprocess_mode="livesum")
AUTH_ACCEPTED = Counter("lastmile_auth_accepted_total",
                        "Clients let in (MQTT CONNECT, HTTP request), by method", ["method"])
AUTH_REFUSED = Counter("lastmile_auth_refused_total",
                       "Clients refused (MQTT CONNACK 0x04/0x05/0x86/0x87, HTTP 401), by reason",
                       ["reason"])
AUTH_THROTTLED = Counter("lastmile_auth_throttled_total",
                         "Authentication attempts held back: their address kept failing")
# Pre-initialised: the first acceptance or refusal is an increase a rate() can see.
for _method in get_args(Method):
    AUTH_ACCEPTED.labels(_method)
for _reason in REFUSAL_CODES:
    AUTH_REFUSED.labels(_reason)
LOOP_LAG = Gauge("lastmile_event_loop_lag_seconds",
                 "Worst delay of this worker's event loop over the last second: how late a "
                 "timer due now runs (what a ready ack waits behind)",
                 multiprocess_mode="liveall")
LOOP_LAG_HIST = Histogram("lastmile_event_loop_lag_samples_seconds",
                          "Event-loop lag samples (one every 50 ms per worker)",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                   1.0, 2.5, 5.0))
MQTT_STATE = Gauge("lastmile_mqtt_state",
                   "MQTT per-connection structures: connections, registry (client ids with a "
                   "live connection), sessions_live (client states in the session store), "
                   "write_paused, auth_pending (CONNECTs waiting for a verdict), per_source "
                   "(addresses counted by limits.max_connections_per_source), connects_waiting "
                   "(CONNECTs waiting for their turn in a storm), handovers "
                   "(client ids waiting for another worker, workers > 1)", ["name"],
                   multiprocess_mode="livesum")
RULES_INFO = Gauge("lastmile_rules_info", "Active rules version (value is the rule count)",
                   ["version"], multiprocess_mode="liveall")

# --- latency histograms (issue 15): plain counts on hot objects, copied by the pump -------
ACK_LATENCY = Histogram("lastmile_ack_latency_seconds",
                        "Message received -> its ack written (MQTT PUBACK/PUBREC queued for "
                        "this loop turn's write; HTTP 2xx answer ready), per listener: "
                        "mqtt, mqtts, ws, http, https", ["listener"], buckets=BUCKETS)
KAFKA_DELIVERY_LATENCY = Histogram("lastmile_kafka_delivery_latency_seconds",
                                   "Record handed to librdkafka -> its delivery report "
                                   "handled (successful records), per cluster", ["cluster"],
                                   buckets=BUCKETS)


def copy_latency(pump_last: dict[tuple[str, ...], list[float]], metric: Any, label: str,
                 latency: Latency) -> None:
    """Add what ``latency`` counted since the last copy to ``metric{label}``.

    prometheus-client has no public call to add n observations to a bucket; its
    histogram keeps one (non-cumulative) value per bucket and a sum, which is what
    ``observe`` increments, so the deltas go there (works in multiprocess mode too).
    """
    key = (metric._name, label)
    counts = latency.counts
    last = pump_last.get(key)
    if last is None:
        last = pump_last[key] = [0.0] * (len(counts) + 1)
    child = metric.labels(label)
    for i, n in enumerate(counts):
        if n > last[i]:
            child._buckets[i].inc(n - last[i])
            last[i] = n
    total = latency.total
    if total > last[-1]:
        child._sum.inc(total - last[-1])
        last[-1] = total


class Pump:
    """Copies component counters into Prometheus metrics as deltas."""

    def __init__(self, app: Watched, lag: LoopLag | None = None) -> None:
        self.app = app
        self.lag = lag if lag is not None else LoopLag()
        self._last: dict[tuple[str, ...], int] = {}
        self._latency_last: dict[tuple[str, ...], list[float]] = {}
        self._version = ""

    def _delta(self, counter: Any, labels: tuple[str, ...], value: int) -> None:
        key = (counter._name, *labels)
        before = self._last.get(key, 0)
        if value > before:
            (counter.labels(*labels) if labels else counter).inc(value - before)
        self._last[key] = value

    def _counters(self, counter: Any, values: Mapping[str, int], *prefix: str) -> None:
        for name, value in values.items():
            if isinstance(value, int):
                self._delta(counter, (*prefix, name), value)

    def _drain(self, drain: Mapping[str, Mapping[str, float]]) -> None:
        for priority, d in drain.items():
            SPOOL_BACKLOG_RECORDS.labels(priority).set(d["backlog_records"])
            SPOOL_BACKLOG_BYTES.labels(priority).set(d["backlog_bytes"])
            SPOOL_OLDEST_AGE.labels(priority).set(d["oldest_record_age_seconds"])
            SPOOL_DRAIN_RATE.labels(priority).set(d["drain_records_per_second"])
            SPOOL_DRAIN_BYTES.labels(priority).set(d["drain_bytes_per_second"])
            SPOOL_DRAINING.labels(priority).set(d["draining"])
            self._delta(SPOOL_REPLAYED, (priority,), int(d["replayed_records"]))
            self._delta(SPOOL_REPLAYED_BYTES, (priority,), int(d["replayed_bytes"]))
            SPOOL_REPLAYED.labels(priority)  # exported at 0 before the first replay
            SPOOL_REPLAYED_BYTES.labels(priority)

    def _latencies(self) -> None:
        app = self.app
        last = self._latency_last
        if app.mqtt is not None:
            for listener, latency in list(app.mqtt.ack_latency.items()):
                copy_latency(last, ACK_LATENCY, listener, latency)
        if app.http is not None:
            for listener, latency in app.http.ack_latency.items():
                copy_latency(last, ACK_LATENCY, listener, latency)
        for name, sink in app.sinks.items():
            copy_latency(last, KAFKA_DELIVERY_LATENCY, name, sink.latency)

    def tick(self) -> None:
        app = self.app
        self._latencies()
        worst, samples = self.lag.take()
        LOOP_LAG.set(worst)
        for lag in samples:
            LOOP_LAG_HIST.observe(lag)
        if app.pipeline is not None:
            self._counters(MESSAGES, app.pipeline.counters)
            PENDING_BYTES.set(app.pipeline.flow.pending_bytes)
            PAUSED.set(1 if app.pipeline.flow.paused else 0)
            stats = app.pipeline.buffer.stats()
            for name, value in stats.items():
                if name in _LEVELS:
                    BUFFER_STATE.labels(name).set(value)
            self._counters(BUFFER, {k: v for k, v in stats.items() if k not in _LEVELS})
            self._drain(app.pipeline.buffer.drain())
        for name, sink in app.sinks.items():
            self._counters(RECORDS, {"delivered": sink.delivered, "failed": sink.failed}, name)
            IN_FLIGHT.labels(name).set(sink.in_flight)
        if app.reloader is not None:
            self._counters(RULES_RELOADS, {"ok": app.reloader.reloads_ok,
                                           "failed": app.reloader.reloads_failed})
        if app.router is not None:
            router = app.router
            self._counters(MESSAGES, {"routed": router.routed, "dropped": router.dropped,
                                      "dead_lettered": router.dead_lettered})
            self._counters(REFUSED, router.refused_by_reason)
            self._counters(AUTHZ_REFUSED, router.refused_by_rule)
            table = app.router.table
            if table.version != self._version:
                if self._version:
                    RULES_INFO.remove(self._version)
                self._version = table.version
                for rule in table.entries:  # seen at 0 before the first refusal
                    if rule.allow is not None or rule.action == "deny" or rule.topic_claims:
                        AUTHZ_REFUSED.labels(rule.name)
            RULES_INFO.labels(table.version).set(table.rules)
        mqtt = app.mqtt
        if mqtt is not None:
            CONNECTIONS.set(len(mqtt.connections))
            self._delta(MQTT_REFUSED, (), mqtt.refused_connections)
            self._counters(MQTT_LIMIT_CLOSES, mqtt.limit_closes)
            self._counters(MQTT_CONNECT_LIMITS, mqtt.connect_refusals)
            store = mqtt.store
            SESSIONS.set(store.retained)
            levels = {"connections": len(mqtt.connections), "registry": len(mqtt.registry),
                      "sessions_live": len(store), "write_paused": len(mqtt.write_paused),
                      "auth_pending": len(mqtt.auth_tasks), "per_source": len(mqtt.per_source),
                      "connects_waiting": len(mqtt.connects_waiting),
                      "handovers": mqtt.shared.handovers if mqtt.shared is not None else 0}
            for name, value in levels.items():
                MQTT_STATE.labels(name).set(value)
            self._counters(SESSION_EVENTS, {"expired": store.expired, "evicted": store.evicted,
                                            "refused_client_id": store.refused_client_ids})
        auth = app.auth
        if auth is not None:
            self._counters(AUTH_ACCEPTED, auth.accepted)
            self._counters(AUTH_REFUSED, auth.refused)
            self._delta(AUTH_THROTTLED, (), auth.throttled)

        http = app.http
        if http is not None:
            HTTP_CONNECTIONS.set(len(http.guard.connections))
            refused = http.refused()
            for reason in refused:  # every reason shows, at 0 before its first refusal
                HTTP_REFUSED.labels(reason)
            self._counters(HTTP_REFUSED, refused)
            levels = {"inflight_body_bytes": http.bodies.used,
                      "idempotency_bytes": http.idempotency.size,
                      "idempotency_keys": len(http.idempotency),
                      "pending_heads": len(http.guard.heads)}
            for name, value in levels.items():
                HTTP_STATE.labels(name).set(value)

    async def run(self, interval: float = 1.0) -> None:
        self.lag.start()
        failures = 0
        try:
            while True:
                try:
                    self.tick()
                    failures = 0
                except Exception:  # metrics never take the gateway down, but say why
                    failures += 1
                    if failures == 1 or failures % 60 == 0:
                        log.exception("metrics_pump_failed", failures=failures)
                await asyncio.sleep(interval)
        finally:
            self.lag.stop()
