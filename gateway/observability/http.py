"""The metrics listener: /metrics (Prometheus), /healthz (liveness), /readyz (readiness).

One server per gateway, on a thread of its own (stdlib ``http.server``): under the
supervisor (``workers > 1``) the supervisor serves it, summing the workers'
metrics files and judging health from every worker's status; a lone worker serves
it itself.  Either way the answer is the whole gateway's, and a wedged event loop
cannot stop the listener from saying so.  See ``gateway.observability.health``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from gateway.config.schema import MetricsListener
from gateway.observability.health import (
    HEALTH_DIR_ENV,
    KafkaWatch,
    LocalSource,
    PodSource,
    StatusPublisher,
    pod_families,
    verdict,
)
from gateway.observability.metrics import Pump

if TYPE_CHECKING:
    from gateway.observability.health import Observed

log = structlog.get_logger("lastmile.metrics")


class Exposition:
    """What /metrics shows: the collectors given, then the pod's own families."""

    def __init__(self, source: PodSource, collectors: Iterable[Any]) -> None:
        self.source = source
        self.collectors = list(collectors)

    def collect(self) -> Iterable[Any]:
        for collector in self.collectors:
            yield from collector.collect()
        yield from pod_families(self.source)


class MetricsServer:
    """The listener thread; ``start`` raises OSError when the port cannot be bound."""

    def __init__(self, listener: MetricsListener, source: PodSource, exposition: Any) -> None:
        self.listener = listener
        self.source = source
        self.exposition = exposition
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a client that sends nothing does not hold a thread long

            def do_GET(self) -> None:
                server_self.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # stderr carries JSON log lines only

        family = socket.AF_INET6 if ":" in self.listener.host else socket.AF_INET
        server_cls = type("Server", (ThreadingHTTPServer,),
                          {"address_family": family, "daemon_threads": True})
        self._server = server_cls((self.listener.host, self.listener.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()
        log.info("metrics_listening", host=self.listener.host, port=self.listener.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._reply(request, 200, generate_latest(self.exposition),
                            CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                result = verdict(self.source)
                self._json(request, 200 if result.live else 503,
                           {"live": result.live, "reasons": result.wedged})
            elif path == "/readyz":
                result = verdict(self.source)
                self._json(request, 200 if result.ready else 503, result.body)
            else:
                self._json(request, 404, {"error": "not found",
                                          "paths": ["/metrics", "/healthz", "/readyz"]})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            log.exception("metrics_request_failed", path=path)
            self._json(request, 500, {"error": "internal error (logged)"})

    @staticmethod
    def _json(request: BaseHTTPRequestHandler, status: int, body: object) -> None:
        MetricsServer._reply(request, status, json.dumps(body).encode(), "application/json")

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, data: bytes, ctype: str) -> None:
        request.send_response(status)
        request.send_header("Content-Type", ctype)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


async def start_metrics(app: Observed, listener: MetricsListener
                        ) -> Callable[[float], Awaitable[None]] | None:
    """This worker's metrics pump and status; the listener too when no supervisor serves it.

    Returns the cleanup, or None when the metrics listener is off.
    """
    if not listener.enabled:
        return None
    kafka = KafkaWatch(app.sinks)
    publisher = StatusPublisher(app, kafka, os.environ.get(HEALTH_DIR_ENV))
    publisher.start()
    app.status_changed = publisher.publish
    pump = asyncio.create_task(Pump(app).run(), name="metrics-pump")
    server = None
    if publisher.path is None:  # no supervisor: this worker serves the listener
        source = LocalSource(app, publisher, listener.stall_timeout_s)
        server = MetricsServer(listener, source, Exposition(source, [REGISTRY]))
        try:
            server.start()
        except BaseException:
            publisher.stop()
            pump.cancel()
            raise

    async def cleanup(_timeout: float) -> None:
        app.status_changed = None
        pump.cancel()
        publisher.stop()
        if server is not None:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    return cleanup
