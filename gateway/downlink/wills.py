"""Will messages: published through the uplink rules when a connection ends ungracefully.

The session says when a will is due (``Disconnected.will_due``: socket loss,
keep-alive timeout, protocol error, takeover; never after a normal
DISCONNECT).  The will goes to ``pipeline.publish`` as a ``Message`` from the
client, with its identity, like a PUBLISH would, so the uplink rules route and
authorize it.  MQTT 5's Will Delay Interval (bounded by the session expiry,
3.1.3.2.2) holds it back; a reconnect of the client id within the delay
cancels it.  On by ``downlink.wills`` (off by default: a gateway that did not
publish wills before does not start to after an upgrade).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from gateway.model import Message, Outcome
from gateway.protocols.mqtt.packets import Will

log = structlog.get_logger("lastmile.wills")


def will_message(will: Will, client_id: str, username: str | None, cert: str | None,
                 claims: Any) -> Message:
    props = will.properties
    message = Message(source="mqtt", topic=will.topic, payload=will.payload, qos=will.qos,
                      retain=will.retain, client_id=client_id, username=username,
                      cert_identity=cert, claims=claims, received_at=time.time())
    if props is not None:
        message.user_properties = props.user_properties or []
        message.content_type = props.content_type
        message.payload_format = props.payload_format_indicator
        message.message_expiry = props.message_expiry_interval
        message.correlation_data = props.correlation_data
        message.response_topic = props.response_topic
    return message


class Wills:
    def __init__(self, publish: Callable[[Message, Callable[[Outcome], None]], None]) -> None:
        self.publish = publish
        self.pending: dict[str, asyncio.TimerHandle] = {}  # client id -> delayed will
        self.published = 0
        self.failed = 0
        self.cancelled = 0

    def due(self, message: Message, delay: int) -> None:
        """The connection of ``message.client_id`` ended without DISCONNECT."""
        cid = message.client_id
        self.connected(cid)  # an older delayed will of this id is replaced
        if delay > 0:
            self.pending[cid] = asyncio.get_running_loop().call_later(
                delay, self._send, message)
            return
        self._send(message)

    def connected(self, client_id: str) -> None:
        """The client id connected again: its delayed will is not sent."""
        timer = self.pending.pop(client_id, None)
        if timer is not None:
            timer.cancel()
            self.cancelled += 1

    def _send(self, message: Message) -> None:
        self.pending.pop(message.client_id, None)

        def done(outcome: Outcome) -> None:
            if outcome.ok:
                self.published += 1
                return
            self.failed += 1
            error = outcome.error
            log.info("mqtt_will_refused", client_id=message.client_id, topic=message.topic,
                     error=error.code if error is not None else "failed")

        self.publish(message, done)

    def ended(self, conn: Any) -> None:
        """``conn`` (an ``MqttConnection``) ended with its will due."""
        session = conn.session
        will = session.will
        if will is None:
            return
        identity = session.identity
        cert, claims = (conn.cert_identity, None) if identity is None else (
            identity.cert, identity.claims)
        delay = 0
        if will.properties is not None and will.properties.will_delay_interval:
            delay = min(will.properties.will_delay_interval, session.expiry_interval)
        self.due(will_message(will, session.client_id, session.username, cert, claims), delay)

    def close(self) -> None:
        """Shutdown: delayed wills not yet due are dropped (the gateway stops with them)."""
        for timer in self.pending.values():
            timer.cancel()
        self.pending.clear()
