"""One gateway process: staged startup, the main wait, staged shutdown.

Startup order: rules -> authenticator (password file, JWKS) -> embedded
broker (dev only) -> Kafka sinks -> buffer -> pipeline -> listeners.  Shutdown
runs the same stages in reverse with one deadline: stop accepting, stop intake,
let in-flight acks finish, flush Kafka, stop the embedded broker, close the
authenticator.  Every teardown step runs even if an earlier one
failed (errors are logged, not swallowed silently).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import structlog

from gateway.buffer import Buffer
from gateway.buffer.queue import MemoryBuffer
from gateway.config import DEAD_LETTER_DETAIL_BYTES, max_record_bytes
from gateway.config.schema import Config
from gateway.model import Record
from gateway.pipeline import Pipeline
from gateway.routing import Router, RulesReloader, load_rules
from gateway.routing.router import dead_letter_record
from gateway.sinks.embedded import EmbeddedBroker
from gateway.sinks.kafka import KafkaSink, admission
from gateway.sources import mqtt_enabled

if TYPE_CHECKING:
    from gateway.auth.check import Authenticator
    from gateway.sources.http_server import HttpIngest
    from gateway.sources.mqtt_server import MqttServer

log = structlog.get_logger("lastmile.app")

Cleanup = Callable[[float], Awaitable[object]]


class App:
    def __init__(self, config: Config, rules_dir: str | None = None, worker_id: int = 0,
                 bootstrap: dict[str, str] | None = None, reuse_port: bool = False) -> None:
        self.config = config
        self.rules_dir = rules_dir or config.rules.dir
        self.worker_id = worker_id
        # Resolved bootstrap per cluster (the supervisor resolves "embedded" once).
        self.bootstrap = dict(bootstrap or {})
        self.reuse_port = reuse_port
        self.embedded: EmbeddedBroker | None = None
        self.sinks: dict[str, KafkaSink] = {}
        self.router: Router | None = None
        self.reloader: RulesReloader | None = None
        self.buffer: Buffer | None = None
        self.pipeline: Pipeline | None = None
        self.mqtt: MqttServer | None = None
        self.http: HttpIngest | None = None
        self.auth: Authenticator | None = None
        self._cleanups: list[tuple[str, Cleanup]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._signals = 0
        self.started = False  # every stage up (readiness)
        # Set by the metrics listener: publish this worker's status now (health).
        self.status_changed: Callable[[], None] | None = None

    # --- startup ------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._start_rules()  # first: a bad rules file needs no Kafka to be reported
            await self._start_auth()  # so does a bad password file or JWKS
            await self._start_kafka()
            await self._start_buffer()
            await self._start_sources()
        except BaseException:
            await self.stop()
            raise
        self.started = True
        if self.status_changed is not None:
            self.status_changed()
        log.info("gateway_started", worker=self.worker_id,
                 rules_version=self.router.table.version if self.router else None)

    def resolve_embedded(self) -> None:
        """Start the dev broker when a cluster says ``embedded`` and nobody resolved it."""
        for name, cluster in self.config.kafka.clusters.items():
            if cluster.bootstrap_servers != "embedded" or name in self.bootstrap:
                continue
            if self.embedded is None:
                emb = self.config.kafka.embedded
                self.embedded = EmbeddedBroker(emb.host, emb.port)
                self.embedded.start_sync()
                self._cleanups.append(("embedded broker", self._stop_embedded))
            self.bootstrap[name] = self.embedded.bootstrap

    async def _stop_embedded(self, _timeout: float) -> None:
        if self.embedded is not None:
            await _sync(self.embedded.stop)

    async def _start_kafka(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.resolve_embedded)
        for name, cluster in self.config.kafka.clusters.items():
            if self.config.spool.enabled:
                # The spool, not librdkafka's timeout, bounds how long an ack waits
                # (spill_after_ms); a record timing out in librdkafka's queue would let
                # a younger one of its key land first (docs/spool.md, order).
                cluster = msgspec.structs.replace(cluster, message_timeout_ms=0)
            sink = KafkaSink(name, cluster, self.bootstrap.get(name))
            await sink.start()
            self.sinks[name] = sink
            self._cleanups.append((f"kafka sink {name}", sink.close))

    def _start_rules(self) -> None:
        clusters = frozenset(self.config.kafka.clusters)
        self.router = Router(load_rules(self.rules_dir, clusters))
        self.reloader = RulesReloader(self.rules_dir, self.router, clusters=clusters)
        if self.config.rules.watch:
            self._tasks.append(asyncio.create_task(self.reloader.run(), name="rules-watch"))

    async def _start_auth(self) -> None:
        """The one Authenticator of this worker: every listener asks it (closed last)."""
        from gateway.auth.check import Authenticator

        cfg = self.config.auth
        if cfg.allow_anonymous:
            # Said once per worker, loudly: an exposed gateway in this state is open to all.
            log.warning("auth_anonymous_allowed", worker=self.worker_id,
                        detail="auth.allow_anonymous is true: any client that can reach a "
                               "listener publishes without credentials (set it to false "
                               "and configure auth.password_file or auth.jwt)")
        self.auth = Authenticator(cfg, log=structlog.get_logger("lastmile.auth"))
        await self.auth.start()
        self._cleanups.append(("authenticator", self._close_auth))

    async def _close_auth(self, _timeout: float) -> None:
        if self.auth is not None:
            await self.auth.close()

    async def _start_buffer(self) -> None:
        cfg = self.config
        if cfg.spool.enabled:
            from gateway.buffer.priority import PrioritySpoolBuffer

            spool_dir = Path(cfg.spool.dir) / f"worker-{self.worker_id}"
            self.buffer = PrioritySpoolBuffer(self.sinks, cfg.spool, cfg.buffer, spool_dir,
                                      dead_letter=self._dead_letter_record)
        else:
            self.buffer = MemoryBuffer(self.sinks, cfg.buffer.high_water_bytes,
                                       cfg.buffer.low_water_bytes)
        await self.buffer.start()
        self._cleanups.append(("buffer", self.buffer.close))
        assert self.router is not None
        buffer = self.buffer
        admit = admission(self.sinks, max_record_bytes(cfg), lambda: buffer.via_spool)
        self.pipeline = Pipeline(self.router, self.buffer, admit)

    def _dead_letter_record(self, record: Record, reason: str) -> Record | None:
        """A record Kafka refused for good after it was acked: to the dead-letter topic."""
        table = self.router.table if self.router is not None else None
        dead = table.dead_letter if table is not None else None
        if dead is None or (record.cluster, record.topic) == (dead.cluster, dead.topic):
            return None
        return dead_letter_record(dead, record.value, record.key, reason="kafka_refused",
                                  detail=_cut(reason, DEAD_LETTER_DETAIL_BYTES),
                                  topic=record.topic, headers=record.headers)

    async def _start_sources(self) -> None:
        """Metrics, then HTTP, then MQTT: shutdown (reverse order) ends MQTT sessions,
        WebSocket ones included, before the HTTP listener goes."""
        from gateway.observability.http import start_metrics
        from gateway.sources import start_mqtt
        from gateway.sources.http_server import start_http

        cfg, pipeline = self.config, self.pipeline
        assert pipeline is not None
        metrics = await start_metrics(self, cfg.listeners.metrics)
        if metrics is not None:
            self._cleanups.append(("metrics listener", metrics))
        auth = self.auth
        assert auth is not None
        http = await start_http(pipeline, cfg, self.reuse_port, lambda: self.mqtt, auth=auth)
        if http is not None:
            self.http, http_cleanup = http
            self._cleanups.append(("http listener", http_cleanup))
        if mqtt_enabled(cfg):
            from gateway.downlink.service import start_downlink

            router = self.router
            assert router is not None
            downlink = await start_downlink(lambda: router.table.downlink, cfg, self.bootstrap,
                                            self.worker_id)  # before the first SUBSCRIBE
            self.mqtt, mqtt_cleanup = await start_mqtt(
                pipeline, cfg, self.reuse_port, self.worker_id, auth=auth,
                downlink=downlink[0] if downlink is not None else None)
            self._cleanups.append(("mqtt listeners", mqtt_cleanup))
            if downlink is not None:  # runs before the listeners close: commits what was acked
                self._cleanups.append(("downlink", downlink[1]))

    # --- running -----------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload_rules)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("forced_exit", signal=sig.name)
            raise SystemExit(130)  # propagates out of the loop: no graceful drain
        log.info("shutdown_requested", signal=sig.name)
        self._stop.set()
        if self.status_changed is not None:
            self.status_changed()

    def reload_rules(self) -> None:
        if self.reloader is not None:
            self.reloader.reload()

    async def wait(self) -> None:
        await self._stop.wait()

    @property
    def draining(self) -> bool:
        """A stop signal came: readiness says no from here on."""
        return self._stop.is_set()

    # --- shutdown ----------------------------------------------------------------

    async def stop(self) -> None:
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        if self.pipeline is not None:
            self.pipeline.stop_intake()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        while self._cleanups:
            name, cleanup = self._cleanups.pop()
            left = max(0.5, deadline - time.monotonic())
            try:
                await cleanup(left)
            except Exception:
                log.exception("shutdown_step_failed", step=name)
        log.info("gateway_stopped", worker=self.worker_id)


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes: the dead-letter copy must fit its room."""
    return text.encode()[:limit].decode("utf-8", "ignore")


async def _sync(fn: Callable[[], None]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, fn)


async def serve(config: Config, rules_dir: str | None = None, worker_id: int = 0,
                bootstrap: dict[str, str] | None = None, reuse_port: bool = False,
                ready: Callable[[App], None] | None = None) -> None:
    from gateway.observability import set_worker

    set_worker(worker_id)
    app = App(config, rules_dir, worker_id, bootstrap, reuse_port)
    app.install_signal_handlers()
    await app.start()
    if ready is not None:
        ready(app)
    try:
        await app.wait()
    finally:
        await app.stop()
