"""Source listeners for one gateway process, started by ``gateway.app`` in order.

Each ``start_*`` gets only what it needs (the pipeline, its config section, the
reuse-port flag) and returns its server and a cleanup; the app owns the order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.auth import Authenticator
    from gateway.config.schema import Config
    from gateway.downlink.service import Downlink
    from gateway.pipeline import Pipeline
    from gateway.sources.mqtt_server import MqttServer

Cleanup = Callable[[float], Awaitable[object]]


def mqtt_enabled(config: Config) -> bool:
    listeners = config.listeners
    return listeners.mqtt.enabled or listeners.mqtts.enabled or listeners.ws.enabled


async def start_mqtt(pipeline: Pipeline, config: Config, reuse_port: bool, worker_id: int = 0,
                     *, auth: Authenticator | None = None,
                     downlink: Downlink | None = None) -> tuple[MqttServer, Cleanup]:
    """The MQTT server (TCP and TLS listeners; WebSocket clients reach it through HTTP).

    ``auth`` decides every CONNECT (TCP, TLS and WebSocket alike); None lets every
    client in unchecked, which only tests and embedded use want.
    """
    from gateway.protocols.mqtt.events import MqttLimits
    from gateway.sources.mqtt_server import MqttServer

    listeners = config.listeners
    limits = MqttLimits(
        max_packet_size=config.limits.max_packet_size,
        receive_maximum=config.limits.max_inflight,
        connect_timeout=config.limits.connect_timeout_s,
        max_keep_alive=config.limits.max_keepalive_s,
        topic_alias_maximum=config.limits.topic_alias_maximum,
        topic_alias_max_bytes=config.limits.topic_alias_max_bytes,
        partial_packet_timeout=config.limits.partial_packet_timeout_s,
        max_connections=config.limits.max_connections,
        max_sessions=config.limits.max_sessions,
        max_client_id_bytes=config.limits.max_client_id_bytes,
        max_write_buffer_bytes=config.limits.max_write_buffer_bytes,
        slow_reader_timeout=config.limits.slow_reader_timeout_s,
        connect_rate=config.limits.connect_rate_per_s,
        connect_burst=config.limits.connect_burst,
        max_connections_per_source=config.limits.max_connections_per_source,
    )
    from gateway.sources.mqtt_registry import open_shared

    # Under the supervisor (workers > 1) client ids and QoS 2 ids are shared by the workers.
    shared = open_shared(worker_id, limits, asyncio.get_running_loop().time())
    server = MqttServer(pipeline, limits, shared=shared, auth=auth)
    server.downlink = downlink  # Kafka -> subscribers (None: SUBSCRIBE is refused)
    down = config.downlink
    if down.presence_topic and down.presence_cluster not in config.kafka.clusters:
        from gateway.errors import ConfigError

        raise ConfigError(f"downlink.presence_cluster '{down.presence_cluster}' is not a "
                          "cluster of kafka.clusters", key="downlink.presence_cluster")
    if down.wills or down.presence_topic:
        from gateway.downlink.wills import Lifecycle, Presence, Wills

        server.lifecycle = Lifecycle(
            Wills(pipeline.publish) if down.wills else None,
            Presence(pipeline.buffer.submit, down.presence_topic, down.presence_cluster)
            if down.presence_topic else None)
    server.start_background()  # also for MQTT over WebSocket with no TCP listener
    if listeners.mqtt.enabled:
        await server.start(listeners.mqtt.host, listeners.mqtt.port, reuse_port=reuse_port)
    tls = None
    if listeners.mqtts.enabled:
        from gateway.tls import ServerTls

        tls = ServerTls(listeners.mqtts, "mqtts")  # follows certificate file changes
        await server.start(listeners.mqtts.host, listeners.mqtts.port,
                           ssl=tls.context, reuse_port=reuse_port)
        tls.start()

    async def close(timeout: float) -> None:
        if server.lifecycle is not None:
            server.lifecycle.close()
        if tls is not None:
            await tls.close()
        await server.stop_accepting()
        await server.close(timeout)

    return server, close
