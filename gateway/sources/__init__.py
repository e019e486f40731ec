"""Starts every enabled source listener for one gateway process."""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.app import App
    from gateway.config.schema import TlsListener


def tls_context(listener: TlsListener) -> ssl.SSLContext:
    """Server TLS context; with ``require_client_cert`` clients need a cert from ``cafile``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert listener.certfile and listener.keyfile
    context.load_cert_chain(listener.certfile, listener.keyfile)
    if listener.cafile:
        context.load_verify_locations(listener.cafile)
        context.verify_mode = ssl.CERT_REQUIRED if listener.require_client_cert \
            else ssl.CERT_OPTIONAL
    return context


async def start_mqtt(app: App) -> None:
    from gateway.protocols.mqtt.events import MqttLimits
    from gateway.sources.mqtt_server import MqttServer

    cfg = app.config
    listeners = cfg.listeners
    if not (listeners.mqtt.enabled or listeners.mqtts.enabled or listeners.ws.enabled):
        return
    limits = MqttLimits(
        max_packet_size=cfg.limits.max_packet_size,
        receive_maximum=cfg.limits.max_inflight,
        connect_timeout=cfg.limits.connect_timeout_s,
        max_keep_alive=cfg.limits.max_keepalive_s,
        topic_alias_maximum=cfg.limits.topic_alias_maximum,
        max_connections=cfg.limits.max_connections,
    )
    assert app.pipeline is not None
    from gateway.sources.mqtt_registry import open_shared

    # Under the supervisor (workers > 1) client ids and QoS 2 ids are shared by the workers.
    shared = open_shared(app.worker_id, limits, asyncio.get_running_loop().time())
    server = MqttServer(app.pipeline, limits, shared=shared)
    app.servers["mqtt"] = server
    server.start_background()  # also for MQTT over WebSocket with no TCP listener
    if listeners.mqtt.enabled:
        await server.start(listeners.mqtt.host, listeners.mqtt.port, reuse_port=app.reuse_port)
    if listeners.mqtts.enabled:
        await server.start(listeners.mqtts.host, listeners.mqtts.port,
                           ssl=tls_context(listeners.mqtts), reuse_port=app.reuse_port)

    async def close(timeout: float) -> None:
        await server.stop_accepting()
        await server.close(timeout)

    app.add_cleanup("mqtt listeners", close)


async def start_sources(app: App) -> None:
    """Start listeners in order; each registers its own cleanup on the app."""
    from gateway.observability.http import start_metrics
    from gateway.sources.http_server import start_http

    await start_metrics(app)
    # HTTP before MQTT so shutdown (reverse order) ends MQTT sessions, WebSocket ones
    # included, before the HTTP listener goes; /mqtt finds the MQTT server per request.
    await start_http(app)
    await start_mqtt(app)
