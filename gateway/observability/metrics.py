"""Prometheus metrics for every stage.

Hot paths keep plain integer counters on their own objects (an attribute
increment costs nothing); a pump copies them into prometheus-client metrics
once a second.  That keeps protocol and sink code free of metric calls and
works unchanged in prometheus-client's multiprocess mode, where every worker
writes its own files and the supervisor's /metrics sums them.  Names, types and
labels: docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, get_args

import structlog
from prometheus_client import (
    PROCESS_COLLECTOR,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import Metric

from gateway.auth import REFUSAL_CODES, Method
from gateway.errors import (
    NoMatchingRule,
    NotAuthorized,
    PayloadInvalid,
    PayloadTooLarge,
    Rejected,
    ReservedHeader,
    TopicInvalid,
)
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

# Routing refusals (and dead-letters) by reason: every code routing can give.
ROUTING_REASONS = tuple(cls.code for cls in (
    NoMatchingRule, NotAuthorized, ReservedHeader, TopicInvalid, PayloadInvalid,
    PayloadTooLarge, Rejected))

RECEIVED = Counter("lastmile_messages_received",
                   "Messages handed to routing by every source (MQTT, HTTP, bridge)")
OUTCOMES = Counter("lastmile_messages", "What became of the messages received: routed, "
                   "dropped, dead_lettered, refused (by routing), shutting_down", ["outcome"])
SUBMITTED = Counter("lastmile_records_submitted",
                    "Records handed to the buffer (one per target of a routed message)")
RECORDS = Counter("lastmile_records", "Kafka delivery reports by result (delivered, failed)",
                  ["cluster", "result"])
RULES_RELOADS = Counter("lastmile_rules_reloads", "Rules reloads by result (ok, failed)",
                        ["result"])
REFUSED = Counter("lastmile_refused", "Messages refused or dead-lettered by routing, by reason",
                  ["reason"])
AUTHZ_REFUSED = Counter("lastmile_authorization_refused",
                        "Publishes refused by a rule's allow or deny, by rule", ["rule"])
BUFFER_RECORDS = Counter("lastmile_buffer_records",
                         "Buffer and spool record events: submitted, delivered, spooled_acks, "
                         "spilled, failed, spool_write_failed, skipped, dead_lettered, "
                         "lost_after_ack, replay_retries", ["event"])
BUFFER_EVENTS = ("submitted", "delivered", "spooled_acks", "spilled", "failed",
                 "spool_write_failed", "skipped", "dead_lettered", "lost_after_ack",
                 "replay_retries")
SPOOL_FSYNCS = Counter("lastmile_spool_fsyncs", "Spool group commits (fsync)")
SPOOL_WRITE_ERRORS = Counter("lastmile_spool_write_errors",
                             "Spool writes that failed (disk full, I/O error)")
SPOOL_SEGMENTS = Gauge("lastmile_spool_segments", "Spool segment files",
                       multiprocess_mode="livesum")
SPOOL_REPLAY_IN_FLIGHT = Gauge("lastmile_spool_replay_in_flight_records",
                               "Spooled records handed to Kafka by the replayer, not yet reported",
                               multiprocess_mode="livesum")
SPOOL_WAITING = Gauge("lastmile_spool_waiting_records",
                      "Records that must go to the spool, not appended yet",
                      multiprocess_mode="livesum")
SPOOL_WRITE_AHEAD = Gauge("lastmile_spool_write_ahead",
                          "1 while records are written to the spool before they are acknowledged",
                          multiprocess_mode="livemax")
# buffer.stats() keys and where they go.
_STAT_GAUGES = {"spool_segments": SPOOL_SEGMENTS, "replay_in_flight": SPOOL_REPLAY_IN_FLIGHT,
                "waiting_for_spool": SPOOL_WAITING, "via_spool": SPOOL_WRITE_AHEAD}
_STAT_COUNTERS = {"spool_fsyncs": SPOOL_FSYNCS, "spool_write_errors": SPOOL_WRITE_ERRORS}
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
SPOOL_REPLAYED = Counter("lastmile_spool_replayed_records",
                         "Spooled records confirmed by Kafka (rate() of it: the drain rate)",
                         ["priority"])
SPOOL_REPLAYED_BYTES = Counter("lastmile_spool_replayed_bytes",
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
MQTT_REFUSED = Counter("lastmile_mqtt_refused_connections",
                       "MQTT connections closed unread: over limits.max_connections")
MQTT_LIMIT_CLOSES = Counter("lastmile_mqtt_limit_closes",
                            "MQTT connections closed by a per-connection bound: keep_alive "
                            "(1.5 x the keep alive in force, capped by limits.max_keepalive_s), "
                            "partial_packet (limits.partial_packet_timeout_s), "
                            "topic_alias_bytes (limits.topic_alias_max_bytes), slow_reader "
                            "(output unread above limits.max_write_buffer_bytes for "
                            "limits.slow_reader_timeout_s)", ["limit"])
MQTT_CONNECT_LIMITS = Counter("lastmile_mqtt_connect_limits",
                              "MQTT connections refused by a connect limit: connect_rate "
                              "(limits.connect_rate_per_s: CONNACK 0x9F, 3.1.1 closed), "
                              "per_source (limits.max_connections_per_source: closed unread)",
                              ["limit"])
SESSIONS = Gauge("lastmile_mqtt_sessions_retained",
                 "Disconnected MQTT sessions kept for a reconnect (limits.max_sessions per worker)",
                 multiprocess_mode="livesum")
SESSION_EVENTS = Counter("lastmile_mqtt_sessions",
                         "MQTT sessions expired, evicted (over limits.max_sessions), and CONNECTs "
                         "refused for a client id over limits.max_client_id_bytes", ["event"])
HTTP_CONNECTIONS = Gauge("lastmile_http_connections",
                         "Open HTTP connections (limits.http_max_connections per worker)",
                         multiprocess_mode="livesum")
HTTP_REFUSED = Counter("lastmile_http_refused",
                       "HTTP connections and requests refused or closed by a limit: "
                       "max_connections, header_timeout, keepalive_timeout, body_timeout, "
                       "inflight_body_bytes, idempotency_key_too_long", ["reason"])
HTTP_BODY_BYTES = Gauge("lastmile_http_inflight_body_bytes",
                        "Bytes of HTTP request bodies being read "
                        "(limits.http_max_inflight_body_bytes)", multiprocess_mode="livesum")
HTTP_IDEMPOTENCY_BYTES = Gauge("lastmile_http_idempotency_bytes",
                               "Bytes held by the idempotency cache (limits.idempotency_max_*)",
                               multiprocess_mode="livesum")
HTTP_IDEMPOTENCY_KEYS = Gauge("lastmile_http_idempotency_keys", "Idempotency cache entries",
                              multiprocess_mode="livesum")
HTTP_PENDING_HEADS = Gauge("lastmile_http_pending_heads",
                           "HTTP connections waiting for a complete request head",
                           multiprocess_mode="livesum")
PENDING_BYTES = Gauge("lastmile_buffer_pending_bytes", "Bytes waiting for Kafka or the spool",
                      multiprocess_mode="livesum")
PAUSED = Gauge("lastmile_backpressure_paused", "1 while sources are paused",
               multiprocess_mode="livemax")
IN_FLIGHT = Gauge("lastmile_kafka_in_flight_records",
                  "Records handed to librdkafka, no delivery report yet", ["cluster"],
                  multiprocess_mode="livesum")
AUTH_ACCEPTED = Counter("lastmile_auth_accepted",
                        "Clients let in (MQTT CONNECT, HTTP request), by method", ["method"])
AUTH_REFUSED = Counter("lastmile_auth_refused",
                       "Clients refused (MQTT CONNACK 0x04/0x05/0x86/0x87, HTTP 401), by reason",
                       ["reason"])
AUTH_THROTTLED = Counter("lastmile_auth_throttled",
                         "Authentication attempts held back: their address kept failing")
LOOP_LAG = Gauge("lastmile_event_loop_lag_seconds",
                 "Worst delay of a worker's event loop over the last second: how late a "
                 "timer due now runs (what a ready ack waits behind)", ["worker"],
                 multiprocess_mode="livemax")
LOOP_LAG_HIST = Histogram("lastmile_event_loop_lag_samples_seconds",
                          "Event-loop lag samples (one every 50 ms per worker)",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                   1.0, 2.5, 5.0))
MQTT_STATE = Gauge("lastmile_mqtt_state",
                   "MQTT per-connection structures, each a count: connections, registry (client "
                   "ids with a live connection), sessions_live (client states in the session "
                   "store), write_paused, auth_pending (CONNECTs waiting for a verdict), "
                   "per_source (addresses counted by limits.max_connections_per_source), "
                   "connects_waiting (CONNECTs waiting for their turn in a storm), handovers "
                   "(client ids waiting for another worker, workers > 1)", ["name"],
                   multiprocess_mode="livesum")
# --- downlink (issue 17, docs/downlink.md): Kafka records to MQTT subscribers ------------
DOWNLINK_RECORDS = Counter("lastmile_downlink_records",
                           "Kafka records the downlink consumed, by cluster (read by the "
                           "worker's consumer, before fan-out)", ["cluster"])
DOWNLINK_CONSUME_ERRORS = Counter("lastmile_downlink_consume_errors",
                                  "Errors the downlink consumer reported, by cluster", ["cluster"])
DOWNLINK_FANNED = Counter("lastmile_downlink_records_fanned_out",
                          "Consumed records fanned out to the subscriptions (not the replay "
                          "that refills the retained store)")
DOWNLINK_SKIPPED = Counter("lastmile_downlink_records_skipped",
                           "Records a downlink rule could not render an MQTT topic for")
DOWNLINK_QUEUED = Counter("lastmile_downlink_messages_queued",
                          "Messages queued to subscribers (one per matching subscription)")
DOWNLINK_SENT = Counter("lastmile_downlink_messages_sent", "PUBLISH packets written to subscribers")
DOWNLINK_DROPPED = Counter("lastmile_downlink_messages_dropped",
                           "Messages not delivered: queue_full (over limits.downlink_queue, "
                           "by limits.downlink_full_policy), too_large (over the client's "
                           "Maximum Packet Size)", ["reason"])
DOWNLINK_DEPTH = Gauge("lastmile_downlink_queue_messages",
                       "Messages held for subscribers, summed over clients: waiting (not sent) "
                       "and in_flight (sent, QoS 1/2 ack not yet received)", ["state"],
                       multiprocess_mode="livesum")
DOWNLINK_CLIENTS = Gauge("lastmile_downlink_clients",
                         "Clients with downlink state: online, offline (a persistent session "
                         "kept until its expiry)", ["state"], multiprocess_mode="livesum")
DOWNLINK_SUBSCRIPTIONS = Gauge("lastmile_downlink_subscriptions",
                               "Subscriptions in the worker's trie", multiprocess_mode="livesum")
DOWNLINK_UNCOMMITTED = Gauge("lastmile_downlink_uncommitted_records",
                             "Records consumed whose deliveries are not all finished (offsets "
                             "held back from the commit), by cluster", ["cluster"],
                             multiprocess_mode="livesum")
DOWNLINK_COMMITTED = Gauge("lastmile_downlink_committed_offsets",
                           "Sum of the committed downlink positions over the partitions "
                           "(rate(): records committed per second), by cluster; the highest "
                           "worker's", ["cluster"], multiprocess_mode="livemax")
DOWNLINK_LAG = Gauge("lastmile_downlink_consumer_lag",
                     "Records in a downlink partition past what the worker's consumer has "
                     "read (librdkafka's cached high watermark), by cluster, topic and "
                     "partition; the most behind worker's", ["cluster", "topic", "partition"],
                     multiprocess_mode="livemax")
WILLS_PUBLISHED = Counter("lastmile_wills_published",
                          "Will messages published through the uplink rules")
PRESENCE_SENT = Counter("lastmile_presence_events", "Presence records handed to the buffer")
PUMP_FAILURES = Counter("lastmile_metrics_pump_failures",
                        "Failed copies of a component's counters into the metrics "
                        "(logged as metrics_pump_failed)")

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: multiprocess mode has none either

# Per-worker process metrics under the usual names (prometheus-client's own process
# collector is per registry, and in multiprocess mode nobody runs it).
with contextlib.suppress(KeyError):
    REGISTRY.unregister(PROCESS_COLLECTOR)
_PROCESS_HELP = {
    "process_cpu_seconds_total": "Total user and system CPU time spent in seconds",
    "process_resident_memory_bytes": "Resident memory size in bytes",
    "process_virtual_memory_bytes": "Virtual memory size in bytes",
    "process_open_fds": "Number of open file descriptors",
    "process_max_fds": "Maximum number of open file descriptors",
    "process_start_time_seconds": "Start time of the process since unix epoch in seconds",
}
PROCESS_CPU = Counter("process_cpu_seconds", _PROCESS_HELP["process_cpu_seconds_total"],
                      ["worker"])
_PROCESS_GAUGES = {name: Gauge(name, doc, ["worker"], multiprocess_mode="livesum")
                   for name, doc in _PROCESS_HELP.items() if not name.endswith("_total")}

# Exported at 0 before their first event: an alert on increase() sees the first one.
for _outcome in ("routed", "dropped", "dead_lettered", "refused", "shutting_down"):
    OUTCOMES.labels(_outcome)
for _reason in ROUTING_REASONS:
    REFUSED.labels(_reason)
for _event in BUFFER_EVENTS:
    BUFFER_RECORDS.labels(_event)
for _result in ("ok", "failed"):
    RULES_RELOADS.labels(_result)
for _limit in ("keep_alive", "partial_packet", "topic_alias_bytes", "slow_reader"):
    MQTT_LIMIT_CLOSES.labels(_limit)
for _limit in ("connect_rate", "per_source"):
    MQTT_CONNECT_LIMITS.labels(_limit)
for _event in ("expired", "evicted", "refused_client_id"):
    SESSION_EVENTS.labels(_event)
for _method in get_args(Method):
    AUTH_ACCEPTED.labels(_method)
for _reason in REFUSAL_CODES:
    AUTH_REFUSED.labels(_reason)
for _reason in ("queue_full", "too_large"):
    DOWNLINK_DROPPED.labels(_reason)
for _state in ("waiting", "in_flight"):
    DOWNLINK_DEPTH.labels(_state)
for _state in ("online", "offline"):
    DOWNLINK_CLIENTS.labels(_state)


def process_samples() -> dict[str, float]:
    """This process's CPU, memory, descriptors and start time (empty off Linux)."""
    out: dict[str, float] = {}
    for family in ProcessCollector(registry=None).collect():
        for sample in family.samples:
            out[sample.name] = sample.value
    return out

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
    """Copies component counters into Prometheus metrics as deltas, once a second.

    Each component is copied on its own: one that fails (a bug, a component half
    started) is counted and logged, at most once a minute per component, and the
    others are still copied.
    """

    LOG_EVERY_S = 60.0

    def __init__(self, app: Watched, lag: LoopLag | None = None) -> None:
        self.app = app
        self.worker = str(getattr(app, "worker_id", 0))
        self.lag = lag if lag is not None else LoopLag()
        self._last: dict[tuple[str, ...], int] = {}
        self._cpu = 0.0
        self._failures: dict[str, list[float]] = {}  # section -> [count, last logged at]
        self._seen_sinks: set[str] = set()
        self._authz_version = ""
        self._latency_last: dict[tuple[str, ...], list[float]] = {}
        self._downlink_clusters: set[str] = set()

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

    def tick(self) -> None:
        for name, section in (("loop", self._loop), ("process", self._process),
                              ("pipeline", self._pipeline), ("kafka", self._kafka),
                              ("rules", self._rules), ("mqtt", self._mqtt),
                              ("auth", self._auth), ("http", self._http),
                              ("downlink", self._downlink), ("latency", self._latencies)):
            try:
                section()
            except Exception:  # metrics never take the gateway down, but say why
                self._failed(name)

    def _failed(self, section: str) -> None:
        PUMP_FAILURES.inc()
        now = time.monotonic()
        state = self._failures.setdefault(section, [0, -self.LOG_EVERY_S])
        state[0] += 1
        if now - state[1] >= self.LOG_EVERY_S:
            log.exception("metrics_pump_failed", section=section, failures=int(state[0]))
            state[1] = now

    def _loop(self) -> None:
        worst, samples = self.lag.take()
        LOOP_LAG.labels(self.worker).set(worst)
        for lag in samples:
            LOOP_LAG_HIST.observe(lag)

    def _process(self) -> None:
        values = process_samples()
        cpu = values.pop("process_cpu_seconds_total", None)
        if cpu is not None:
            if cpu > self._cpu:
                PROCESS_CPU.labels(self.worker).inc(cpu - self._cpu)
            self._cpu = cpu
        for name, value in values.items():
            gauge = _PROCESS_GAUGES.get(name)
            if gauge is not None:
                gauge.labels(self.worker).set(value)

    def _pipeline(self) -> None:
        pipeline = self.app.pipeline
        if pipeline is None:
            return
        counters = pipeline.counters
        self._delta(RECEIVED, (), counters["messages"])
        self._delta(SUBMITTED, (), counters["records"])
        self._delta(OUTCOMES, ("shutting_down",), counters["shutting_down"])
        PENDING_BYTES.set(pipeline.flow.pending_bytes)
        PAUSED.set(1 if pipeline.flow.paused else 0)
        for name, value in pipeline.buffer.stats().items():
            if name in _STAT_GAUGES:
                _STAT_GAUGES[name].set(value)
            elif name in _STAT_COUNTERS:
                self._delta(_STAT_COUNTERS[name], (), value)
            elif name in BUFFER_EVENTS:
                self._delta(BUFFER_RECORDS, (name,), value)
        for priority, d in pipeline.buffer.drain().items():
            SPOOL_BACKLOG_RECORDS.labels(priority).set(d["backlog_records"])
            SPOOL_BACKLOG_BYTES.labels(priority).set(d["backlog_bytes"])
            SPOOL_OLDEST_AGE.labels(priority).set(d["oldest_record_age_seconds"])
            SPOOL_DRAIN_RATE.labels(priority).set(d["drain_records_per_second"])
            SPOOL_DRAIN_BYTES.labels(priority).set(d["drain_bytes_per_second"])
            SPOOL_DRAINING.labels(priority).set(d["draining"])
            SPOOL_REPLAYED.labels(priority)  # exported at 0 before the first replay
            SPOOL_REPLAYED_BYTES.labels(priority)
            self._delta(SPOOL_REPLAYED, (priority,), int(d["replayed_records"]))
            self._delta(SPOOL_REPLAYED_BYTES, (priority,), int(d["replayed_bytes"]))

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

    def _kafka(self) -> None:
        for name, sink in self.app.sinks.items():
            if name not in self._seen_sinks:
                self._seen_sinks.add(name)
                for result in ("delivered", "failed"):
                    RECORDS.labels(name, result)
            self._counters(RECORDS, {"delivered": sink.delivered, "failed": sink.failed}, name)
            IN_FLIGHT.labels(name).set(sink.in_flight)

    def _rules(self) -> None:
        app = self.app
        if app.reloader is not None:
            self._counters(RULES_RELOADS, {"ok": app.reloader.reloads_ok,
                                           "failed": app.reloader.reloads_failed})
        router = app.router
        if router is None:
            return
        refused = router.refused_by_reason
        self._counters(OUTCOMES, {"routed": router.routed, "dropped": router.dropped,
                                  "dead_lettered": router.dead_lettered,
                                  "refused": sum(refused.values()) - router.dead_lettered})
        self._counters(REFUSED, refused)
        self._counters(AUTHZ_REFUSED, router.refused_by_rule)
        table = router.table
        if table.version != self._authz_version:
            self._authz_version = table.version
            for rule in table.entries:  # seen at 0 before the first refusal
                if rule.allow is not None or rule.action == "deny" or rule.topic_claims:
                    AUTHZ_REFUSED.labels(rule.name)

    def _mqtt(self) -> None:
        mqtt = self.app.mqtt
        if mqtt is None:
            return
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

    def _downlink(self) -> None:
        for cluster in self.app.sinks:  # every cluster at 0, downlink rules or not
            if cluster not in self._downlink_clusters:
                self._downlink_clusters.add(cluster)
                for metric in (DOWNLINK_RECORDS, DOWNLINK_CONSUME_ERRORS, DOWNLINK_UNCOMMITTED,
                               DOWNLINK_COMMITTED):
                    metric.labels(cluster)
        mqtt = self.app.mqtt
        if mqtt is None:
            return
        lifecycle = mqtt.lifecycle
        if lifecycle is not None:
            if lifecycle.wills is not None:
                self._delta(WILLS_PUBLISHED, (), lifecycle.wills.published)
            if lifecycle.presence is not None:
                self._delta(PRESENCE_SENT, (), lifecycle.presence.sent)
        downlink = mqtt.downlink
        if downlink is None:
            return
        self._delta(DOWNLINK_FANNED, (), downlink.records)
        self._delta(DOWNLINK_SKIPPED, (), downlink.skipped)
        self._delta(DOWNLINK_QUEUED, (), downlink.queued)
        self._delta(DOWNLINK_SENT, (), downlink.sent)
        self._delta(DOWNLINK_DROPPED, ("too_large",), downlink.too_large)
        # One pass over the clients (10,000 cost ~1 ms a second).  Drops of ended sessions
        # are kept in ``dropped_ended``: the sum never goes down.
        drops, waiting, in_flight = downlink.dropped_ended, 0, 0
        for flow in downlink.flows.values():
            drops += flow.dropped
            waiting += len(flow.queue)
            in_flight += len(flow.inflight)
        self._delta(DOWNLINK_DROPPED, ("queue_full",), drops)
        DOWNLINK_DEPTH.labels("waiting").set(waiting)
        DOWNLINK_DEPTH.labels("in_flight").set(in_flight)
        online = len(downlink.links)
        DOWNLINK_CLIENTS.labels("online").set(online)
        DOWNLINK_CLIENTS.labels("offline").set(max(0, len(downlink.flows) - online))
        DOWNLINK_SUBSCRIPTIONS.set(len(downlink.trie))
        held: dict[str, int] = {}
        for key, part in downlink.tracker.partitions.items():
            if part.pending:
                cluster = str(key[0]) if isinstance(key, tuple) else ""
                held[cluster] = held.get(cluster, 0) + part.next - part.pending[0].offset
        for consumer in downlink.consumers:
            cluster = consumer.cluster
            self._delta(DOWNLINK_RECORDS, (cluster,), consumer.consumed)
            self._delta(DOWNLINK_CONSUME_ERRORS, (cluster,), consumer.errors)
            DOWNLINK_UNCOMMITTED.labels(cluster).set(held.get(cluster, 0))
            DOWNLINK_COMMITTED.labels(cluster).set(sum(consumer._committed.values()))
            for (topic, partition), behind in consumer.lag.items():
                DOWNLINK_LAG.labels(cluster, topic, str(partition)).set(behind)

    def _auth(self) -> None:
        auth = self.app.auth
        if auth is not None:
            self._counters(AUTH_ACCEPTED, auth.accepted)
            self._counters(AUTH_REFUSED, auth.refused)
            self._delta(AUTH_THROTTLED, (), auth.throttled)

    def _http(self) -> None:
        http = self.app.http
        if http is None:
            return
        HTTP_CONNECTIONS.set(len(http.guard.connections))
        refused = http.refused()
        for reason in refused:  # every reason shows, at 0 before its first refusal
            HTTP_REFUSED.labels(reason)
        self._counters(HTTP_REFUSED, refused)
        HTTP_BODY_BYTES.set(http.bodies.used)
        HTTP_IDEMPOTENCY_BYTES.set(http.idempotency.size)
        HTTP_IDEMPOTENCY_KEYS.set(len(http.idempotency))
        HTTP_PENDING_HEADS.set(len(http.guard.heads))

    async def run(self, interval: float = 1.0) -> None:
        self.lag.start()
        try:
            while True:
                self.tick()
                await asyncio.sleep(interval)
        finally:
            self.lag.stop()


class SupervisorProcess:
    """The workers' metrics (multiprocess files) with the supervisor's own process
    metrics added under ``worker="supervisor"`` (into the same families)."""

    def __init__(self, workers: Any) -> None:
        self.workers = workers

    def collect(self) -> Iterable[Metric]:
        families = list(self.workers.collect())
        by_name = {family.name: family for family in families}
        for name, value in process_samples().items():
            family_name = name.removesuffix("_total")
            family = by_name.get(family_name)
            if family is None:
                kind = "counter" if name.endswith("_total") else "gauge"
                family = by_name[family_name] = Metric(family_name, _PROCESS_HELP[name], kind)
                families.append(family)
            family.add_sample(name, {"worker": "supervisor"}, value)
        return families
