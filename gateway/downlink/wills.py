"""Wills and presence: what the gateway says when a client comes and goes.

``Lifecycle`` is the MQTT listener's one hook for both (``connected``,
``disconnected``).

Will messages: published through the uplink rules when a connection ends ungracefully.

The session says when a will is due (``Disconnected.will_due``: socket loss,
keep-alive timeout, protocol error, takeover; never after a normal
DISCONNECT).  The will goes to ``pipeline.publish`` as a ``Message`` from the
client, with its identity, like a PUBLISH would, so the uplink rules route and
authorize it.  MQTT 5's Will Delay Interval (bounded by the session expiry,
3.1.3.2.2) holds it back; a reconnect of the client id within the delay
cancels it.  On by ``downlink.wills`` (off by default: a gateway that did not
publish wills before does not start to after an upgrade).

Presence (``downlink.presence_topic``): one JSON record per connect and per
end of a connection (reason, keep-alive timeout, takeover), keyed by client
id, straight to the buffer (no rules).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from gateway.model import Ack, Message, Outcome, Record
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


def _end_kind(code: int, limit: str | None) -> str:
    if code == 0x8E:
        return "takeover"
    if limit == "keep_alive":
        return "keep_alive_timeout"
    return "disconnect"


class Presence:
    """Presence events as records to ``topic`` of ``cluster``, keyed by client id."""

    def __init__(self, submit: Callable[[Record], None], topic: str, cluster: str) -> None:
        self.submit = submit
        self.topic = topic
        self.cluster = cluster
        self.sent = 0
        self.failed = 0

    def event(self, conn: Any, kind: str, **extra: Any) -> None:
        session = conn.session
        identity = session.identity
        transport = conn.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        body = {
            "event": kind, "client_id": session.client_id, "username": session.username,
            "cert": identity.cert if identity is not None else conn.cert_identity,
            "listener": f"{local[0]}:{local[1]}" if isinstance(local, tuple) else None,
            "peer": conn.peer, "version": session.version, "time": time.time(), **extra,
        }
        record = Record(cluster=self.cluster, topic=self.topic, key=session.client_id.encode(),
                        value=json.dumps(body).encode())
        record.ack = Ack(self._done, 1)
        self.submit(record)

    def _done(self, outcome: Outcome) -> None:
        if outcome.ok:
            self.sent += 1
        else:
            self.failed += 1


class Lifecycle:
    """The MQTT listener's hook: wills (``Wills``) and presence (``Presence``), either off."""

    def __init__(self, wills: Wills | None, presence: Presence | None) -> None:
        self.wills = wills
        self.presence = presence
        self.online: set[Any] = set()  # connections that got a CONNACK and did not end yet

    def connected(self, conn: Any, client_id: str) -> None:
        self.online.add(conn)
        if self.wills is not None:
            self.wills.connected(client_id)
        if self.presence is not None:
            self.presence.event(conn, "connect")

    def disconnected(self, conn: Any, reason_code: int, reason: str, will_due: bool,
                     limit: str | None) -> None:
        if conn not in self.online:
            return  # a refused CONNECT: nobody was online
        self.online.discard(conn)
        if will_due and self.wills is not None:
            self.wills.ended(conn)
        if self.presence is not None:
            self.presence.event(conn, _end_kind(reason_code, limit), reason=reason,
                                reason_code=reason_code)

    def close(self) -> None:
        if self.wills is not None:
            self.wills.close()
