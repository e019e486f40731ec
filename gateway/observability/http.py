"""The metrics listener: /metrics (Prometheus), /healthz (alive), /readyz (can take traffic)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from gateway.config.schema import Listener
from gateway.observability.metrics import Pump, Watched

log = structlog.get_logger("lastmile.metrics")


def _ready(app: Watched) -> tuple[bool, dict[str, object]]:
    detail: dict[str, object] = {"worker": app.worker_id}
    pipeline = app.pipeline
    ok = pipeline is not None and not pipeline.flow.paused
    counters: dict[str, object] = {}
    if pipeline is not None:
        detail["paused"] = pipeline.flow.paused
        detail["buffer"] = pipeline.buffer.stats()
        # Per priority: backlog_records/bytes, oldest_record_age_seconds, drain rate.
        detail["spool"] = pipeline.buffer.drain()
        counters.update(pipeline.counters)
    if app.router is not None:
        router = app.router
        detail["rules_version"] = router.table.version
        counters.update(routed=router.routed, dropped=router.dropped,
                        dead_lettered=router.dead_lettered,
                        refused=dict(router.refused_by_reason))
    detail["counters"] = counters
    return ok, detail


async def start_metrics(app: Watched, listener: Listener, reuse_port: bool
                        ) -> Callable[[float], Awaitable[None]] | None:
    """The metrics listener and its pump; returns the cleanup, or None when off."""
    if not listener.enabled:
        return None

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Under the supervisor: any worker answers with the sum over all workers.
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ok, detail = _ready(app)
        return web.json_response({"ready": ok, **detail}, status=200 if ok else 503)

    web_app = web.Application()
    web_app.router.add_get("/metrics", metrics)
    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, listener.host, listener.port, reuse_port=reuse_port or None)
    await site.start()
    log.info("metrics_listening", host=listener.host, port=listener.port)

    pump = asyncio.create_task(Pump(app).run(), name="metrics-pump")

    async def cleanup(_timeout: float) -> None:
        pump.cancel()
        await runner.cleanup()

    return cleanup
