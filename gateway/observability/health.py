"""Liveness and readiness of the whole gateway (every worker), from worker status.

Each worker publishes its status from its own event loop every ``STATUS_INTERVAL_S``
(a timer on the loop: a wedged loop stops publishing).  Under the supervisor the
status goes to a small JSON file per worker in a directory the supervisor made
(``LASTMILE_HEALTH_DIR``), and the supervisor, which serves the metrics listener,
reads them all; a single worker keeps its status in memory for its own listener
thread.  ``evaluate`` turns the statuses into one answer for the pod:

- live: no running worker that finished starting has a status older than
  ``stall_timeout_s`` (its event loop is wedged: a blocking call, SIGSTOP).  A
  worker that died is the supervisor's to restart, and does not fail liveness.
- ready: every worker runs, ticks, has started (rules loaded, listeners open),
  is not paused by backpressure, reaches each Kafka cluster or has a spool that
  accepts records, and the gateway is not draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog

if TYPE_CHECKING:
    from gateway.observability.metrics import Watched
    from gateway.sinks.kafka import KafkaSink

    class Observed(Watched, Protocol):
        started: bool
        status_changed: Callable[[], None] | None

        @property
        def draining(self) -> bool: ...

log = structlog.get_logger("lastmile.health")

HEALTH_DIR_ENV = "LASTMILE_HEALTH_DIR"
STATUS_INTERVAL_S = 0.5
PROBE_EVERY_S = 2.0  # a metadata probe of an unreachable cluster, at most this often
PROBE_TIMEOUT_S = 2.0

# /readyz summary: these keys are combined with max over workers, the rest summed.
_MAX_KEYS = frozenset({"oldest_record_age_seconds", "draining", "held_for_high_priority",
                       "via_spool"})


class KafkaWatch:
    """Whether each Kafka cluster answers, as this worker's producer sees it.

    Down once librdkafka reports every broker down; up again when a record is
    delivered or a metadata request (tried every ``PROBE_EVERY_S`` while down)
    succeeds.  A cluster never reported down is up: the worker checked it at start.
    """

    def __init__(self, sinks: Mapping[str, KafkaSink]) -> None:
        self.sinks = sinks
        self._up_at: dict[str, float] = {}  # the last evidence it answers (monotonic)
        self._delivered: dict[str, int] = {}  # delivered count when found down
        self._probing: set[str] = set()
        self._probed_at: dict[str, float] = {}

    def reachable(self) -> dict[str, bool]:
        now = time.monotonic()
        out = {}
        for name, sink in self.sinks.items():
            down_at = sink.all_brokers_down_at
            if down_at is None or down_at <= self._up_at.get(name, 0.0):
                self._delivered.pop(name, None)
                out[name] = True
                continue
            delivered = self._delivered.setdefault(name, sink.delivered)
            if sink.delivered > delivered:
                self._up_at[name] = now
                out[name] = True
                continue
            out[name] = False
            self._probe(name, sink, now)
        return out

    def _probe(self, name: str, sink: KafkaSink, now: float) -> None:
        if name in self._probing or now - self._probed_at.get(name, -PROBE_EVERY_S) < PROBE_EVERY_S:
            return
        self._probing.add(name)
        self._probed_at[name] = now
        future = asyncio.get_running_loop().run_in_executor(None, sink.probe, PROBE_TIMEOUT_S)

        def done(f: asyncio.Future[bool]) -> None:
            self._probing.discard(name)
            if not f.cancelled() and f.exception() is None and f.result():
                self._up_at[name] = now  # a down report after the probe began still counts

        future.add_done_callback(done)


def _spool_state(buffer: Any) -> str:
    """off, accepting, full or broken (PrioritySpoolBuffer: the worse of both)."""
    parts = [getattr(buffer, "normal", None), getattr(buffer, "high", None)]
    spools = [b for b in parts if b is not None] or [buffer]
    if not all(hasattr(b, "broken") for b in spools):
        return "off"
    if any(b.broken for b in spools):
        return "broken"
    if any(b.full for b in spools):
        return "full"
    return "accepting"


def worker_status(app: Observed, kafka: KafkaWatch) -> dict[str, Any]:
    """One worker's view (on its loop): what /readyz needs, and why not ready."""
    reasons: list[str] = []
    router, pipeline = app.router, app.pipeline
    status: dict[str, Any] = {
        "worker": app.worker_id, "pid": os.getpid(), "tick": time.monotonic(),
        "started": app.started, "draining": app.draining,
        "rules_version": router.table.version if router is not None else None,
        "rules": router.table.rules if router is not None else 0,
    }
    if not app.started:
        reasons.append("starting")
    if app.draining:
        reasons.append("draining")
    if router is None:
        reasons.append("rules not loaded")
    spool = _spool_state(pipeline.buffer) if pipeline is not None else "off"
    status["spool_state"] = spool
    reachable = kafka.reachable()
    status["kafka"] = reachable
    for cluster, up in reachable.items():
        if not up and spool != "accepting":
            reasons.append(f"Kafka cluster {cluster} unreachable and the spool is {spool}")
    if pipeline is not None:
        status["paused"] = pipeline.flow.paused
        if pipeline.flow.paused:
            reasons.append("backpressure: sources paused")
        status["buffer"] = pipeline.buffer.stats()
        status["spool"] = pipeline.buffer.drain()
    status["reasons"] = reasons
    return status


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class StatusPublisher:
    """Publishes ``worker_status`` every ``interval`` from the worker's event loop."""

    def __init__(self, app: Observed, kafka: KafkaWatch, directory: str | None,
                 interval: float = STATUS_INTERVAL_S) -> None:
        self.app = app
        self.kafka = kafka
        self.path = (Path(directory) / f"worker-{app.worker_id}.json") if directory else None
        self.interval = interval
        self.latest: dict[str, Any] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._failed_at = -60.0

    def start(self) -> None:
        self._tick()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)
        self.publish()

    def publish(self) -> None:
        try:
            status = worker_status(self.app, self.kafka)
            if self.path is not None:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_bytes(_encode(status))
                os.replace(tmp, self.path)
            self.latest = status
        except Exception:  # say so (once a minute); the stale status fails the probes
            now = time.monotonic()
            if now - self._failed_at >= 60:
                self._failed_at = now
                log.exception("health_status_failed")


def read_status(directory: str, worker: int) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, msgspec.DecodeError):
        status = _decode((Path(directory) / f"worker-{worker}.json").read_bytes())
        if isinstance(status, dict):
            return status
    return None


@dataclass
class WorkerView:
    worker: int
    running: bool  # the process exists (not died, not being restarted)
    status: dict[str, Any] | None  # its latest status (None: none yet)
    restarts: int = 0


@dataclass
class Verdict:
    live: bool
    ready: bool
    body: dict[str, Any]
    up: dict[int, bool]  # per worker: running and ticking
    wedged: list[str]  # why not live


def evaluate(workers: list[WorkerView], draining: bool, stall_timeout_s: float,
             now: float | None = None) -> Verdict:
    now = time.monotonic() if now is None else now
    wedged: list[str] = []
    reasons = ["draining: the gateway is shutting down"] if draining else []
    up: dict[int, bool] = {}
    per: dict[str, Any] = {}
    statuses = []
    for view in workers:
        name, status = f"worker {view.worker}", view.status
        up[view.worker] = False
        if not view.running:
            reasons.append(f"{name} is not running (restarting)")
            per[str(view.worker)] = {"running": False, "restarts": view.restarts}
            continue
        if status is None:
            reasons.append(f"{name} is starting")
            per[str(view.worker)] = {"running": True, "restarts": view.restarts}
            continue
        age = max(0.0, now - float(status["tick"]))
        per[str(view.worker)] = {**status, "running": True, "restarts": view.restarts,
                                 "age_seconds": round(age, 3)}
        statuses.append(status)
        if age > stall_timeout_s:
            reason = f"{name}: event loop stalled for {age:.1f} s (limit {stall_timeout_s:g} s)"
            reasons.append(reason)
            if status.get("started") and not (draining or status.get("draining")):
                wedged.append(reason)  # a drain has its own deadline (the supervisor's)
            continue
        up[view.worker] = True
        reasons += [f"{name}: {reason}" for reason in status.get("reasons", ())]
    ready, live = not reasons, not wedged
    versions = sorted({s["rules_version"] for s in statuses if s.get("rules_version")})
    body: dict[str, Any] = {
        "ready": ready, "live": live, "draining": draining, "reasons": reasons,
        "paused": any(s.get("paused") for s in statuses),
        "rules_version": versions[0] if len(versions) == 1 else versions or None,
        "buffer": _combine([s.get("buffer") or {} for s in statuses]),
        "spool": {priority: _combine([s.get("spool", {}).get(priority, {}) for s in statuses])
                  for priority in sorted({p for s in statuses for p in s.get("spool", {})})},
        "workers": per,
    }
    return Verdict(live, ready, body, up, wedged)


def _combine(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key in out:
                out[key] = max(out[key], value) if key in _MAX_KEYS else out[key] + value
            else:
                out[key] = value
    return out


class PodSource(Protocol):
    """What the metrics listener asks at each request."""

    stall_timeout_s: float

    def views(self) -> list[WorkerView]: ...

    @property
    def draining(self) -> bool: ...


class LocalSource:
    """One worker serving its own listener (``workers: 1``, no supervisor)."""

    def __init__(self, app: Observed, publisher: StatusPublisher, stall_timeout_s: float
                 ) -> None:
        self.app = app
        self.publisher = publisher
        self.stall_timeout_s = stall_timeout_s

    def views(self) -> list[WorkerView]:
        return [WorkerView(self.app.worker_id, True, self.publisher.latest)]

    @property
    def draining(self) -> bool:
        return self.app.draining


def verdict(source: PodSource) -> Verdict:
    return evaluate(source.views(), source.draining, source.stall_timeout_s)


def pod_families(source: PodSource) -> list[Any]:
    """lastmile_ready, per-worker up and restarts, rules and Kafka reachability."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    views = source.views()
    result = evaluate(views, source.draining, source.stall_timeout_s)
    ready = GaugeMetricFamily("lastmile_ready", "1 while /readyz says ready (the whole pod)",
                              value=1 if result.ready else 0)
    up = GaugeMetricFamily("lastmile_worker_up", "1 while the worker runs and its event loop "
                           "ticks", labels=["worker"])
    restarts = CounterMetricFamily("lastmile_worker_restarts",
                                   "Workers restarted by the supervisor after they died",
                                   labels=["worker"])
    info = GaugeMetricFamily("lastmile_rules_info", "1 for each rules version in force",
                             labels=["version"])
    loaded = GaugeMetricFamily("lastmile_rules_loaded", "Rules in the table in force (max "
                               "over workers)")
    reachable = GaugeMetricFamily("lastmile_kafka_reachable", "1 while every worker reaches "
                                  "the Kafka cluster", labels=["cluster"])
    clusters: dict[str, bool] = {}
    versions: set[str] = set()
    rules = 0
    for view in views:
        up.add_metric([str(view.worker)], 1 if result.up.get(view.worker) else 0)
        restarts.add_metric([str(view.worker)], view.restarts)
        status = view.status if view.running else None
        if status is None:
            continue
        if status.get("rules_version"):
            versions.add(status["rules_version"])
        rules = max(rules, int(status.get("rules", 0)))
        for cluster, ok in status.get("kafka", {}).items():
            clusters[cluster] = clusters.get(cluster, True) and bool(ok)
    for version in sorted(versions):
        info.add_metric([version], 1)
    loaded.add_metric([], rules)
    for cluster, ok in sorted(clusters.items()):
        reachable.add_metric([cluster], 1 if ok else 0)
    return [ready, up, restarts, info, loaded, reachable]

