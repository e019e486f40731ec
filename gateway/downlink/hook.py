"""What an MQTT session asks of the downlink (the one seam between the two).

The session's ``context`` (its connection) has a ``downlink`` attribute: None
when the gateway serves no downlink rules, else an object with ``packet``.
Kept apart so the sans-IO session imports no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from gateway.protocols.mqtt import packets as p

if TYPE_CHECKING:
    from gateway.protocols.mqtt.session import MqttSession


class DownlinkHook(Protocol):
    def packet(self, session: MqttSession, packet: p.AnyPacket) -> bytes | None:
        """SUBSCRIBE, UNSUBSCRIBE, or an ack of an outgoing PUBLISH: the bytes to answer
        (b"" for none), or None when the downlink does not serve it (no rules)."""
        ...
