"""Outgoing PUBLISH flows of one client, and the Kafka offsets safe to commit (sans-IO).

``OffsetTracker`` follows every consumed record until each delivery it fanned
out to is finished: acknowledged (PUBACK, or PUBREC: the client owns a QoS 2
message from then on), written (QoS 0), refused by the client (an error reason
code), dropped by a full queue's policy, or ended with its session.  The
committable offset of a partition is the lowest record not finished, so a
gateway restart re-reads, and redelivers, everything a subscriber has not
acknowledged.

``OutboundFlow`` is one client's outgoing side: a bounded queue with a
configurable full policy, the Receive Maximum window (MQTT 5 section 4.9),
packet identifiers for QoS 1/2, the PUBACK / PUBREC / PUBREL / PUBCOMP
handshakes, and what to resend on reconnect (unacknowledged PUBLISH with
DUP set, then PUBREL for what the client has received, in the original order,
[MQTT-4.4.0-1]).  No clock, no socket: the session turns what it returns into
packets.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from typing import Literal

from gateway.protocols.mqtt.properties import Properties

FullPolicy = Literal["drop-oldest", "drop-newest"]
QUEUED, SENT, RELEASED = "queued", "sent", "released"
MAX_PACKET_ID = 65_535


class Pending:
    """One consumed record while deliveries of it are unfinished (a reference count)."""

    __slots__ = ("count", "offset", "partition", "tracker")

    def __init__(self, tracker: OffsetTracker, partition: Hashable, offset: int) -> None:
        self.tracker = tracker
        self.partition = partition
        self.offset = offset
        self.count = 1  # the fan-out's own hold, released by OffsetTracker.fanned_out

    def hold(self) -> None:
        """One more delivery of this record to finish."""
        if self.count <= 0:
            raise RuntimeError("hold on a finished record")
        self.count += 1

    def release(self) -> None:
        """One delivery finished (acknowledged, written, refused, dropped or expired)."""
        if self.count <= 0:
            raise RuntimeError("release of a finished record")
        self.count -= 1
        if not self.count:
            self.tracker._finished(self)


class _Partition:
    __slots__ = ("next", "pending")

    def __init__(self) -> None:
        self.pending: deque[Pending] = deque()  # in offset order
        self.next = -1  # the offset after the last one seen


class OffsetTracker:
    """Per partition (any hashable: (topic, partition)), the offset it is safe to commit."""

    def __init__(self) -> None:
        self.partitions: dict[Hashable, _Partition] = {}

    def consumed(self, partition: Hashable, offset: int) -> Pending:
        """A record arrived; hold it until ``fanned_out`` and every delivery is finished."""
        part = self.partitions.get(partition)
        if part is None:
            part = self.partitions[partition] = _Partition()
        if offset < part.next:
            # A rewind (reassignment, seek): what was pending stays pending.
            raise ValueError(f"offset {offset} of {partition!r} after {part.next - 1}")
        part.next = offset + 1
        pending = Pending(self, partition, offset)
        part.pending.append(pending)
        return pending

    def adopt(self, partition: Hashable, offset: int, start: int) -> Pending:
        """Hold ``offset`` for a message this worker took over from another one (or
        re-fans out to one client): it may lie below what was consumed here.  ``start``
        is where this worker fans the partition out from, for one it has not consumed yet
        (the committable offset never passes it).  Release as for ``consumed``."""
        part = self.partitions.get(partition)
        if part is None:
            part = self.partitions[partition] = _Partition()
        if part.next < 0:
            part.next = start
        pending = Pending(self, partition, offset)
        queue = part.pending
        at = len(queue)
        while at and queue[at - 1].offset > offset:
            at -= 1
        queue.insert(at, pending)
        return pending

    def fanned_out(self, pending: Pending) -> None:
        """Every delivery of the record is held (``Pending.hold``); drop the fan-out's hold."""
        pending.release()

    def _finished(self, pending: Pending) -> None:
        part = self.partitions[pending.partition]
        queue = part.pending
        while queue and not queue[0].count:
            queue.popleft()

    def committable(self) -> dict[Hashable, int]:
        """Partition -> the offset to commit (Kafka's "next to read")."""
        out: dict[Hashable, int] = {}
        for key, part in self.partitions.items():
            if part.next < 0:
                continue
            # An adopted offset may lie past what was consumed here: never commit past that.
            out[key] = min(part.pending[0].offset, part.next) if part.pending else part.next
        return out

    def forget(self, partition: Hashable) -> None:
        """The partition was revoked: its records will be consumed again elsewhere."""
        self.partitions.pop(partition, None)


class Outgoing:
    """One message on its way to one client."""

    __slots__ = ("dup", "expires", "origin", "packet_id", "payload", "properties", "qos",
                 "retain", "state", "topic")

    def __init__(
        self, topic: str, payload: bytes, qos: int, retain: bool = False, *,
        properties: Properties | None = None, origin: Pending | None = None,
        expires: float = 0.0,
    ) -> None:
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS {qos}")
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties  # MQTT 5 properties (subscription identifiers, ...)
        self.origin = origin  # the consumed record, when it came from Kafka
        # MQTT 5 message expiry: time.monotonic() deadline, 0.0 for none.  A queued
        # message past it is dropped unsent; a sent one carries the remaining interval.
        self.expires = expires
        self.packet_id = 0
        self.dup = False
        self.state = QUEUED

    def _finish(self) -> None:
        origin, self.origin = self.origin, None
        if origin is not None:
            origin.release()

    def __repr__(self) -> str:
        return f"Outgoing({self.topic!r}, qos={self.qos}, id={self.packet_id}, {self.state})"


class OutboundFlow:
    """One client's outgoing QoS 0/1/2 flows.  Counters are plain ints for metrics."""

    def __init__(
        self, *, receive_maximum: int = 65_535, queue_limit: int = 1000,
        full_policy: FullPolicy = "drop-oldest",
    ) -> None:
        if not 1 <= receive_maximum <= 65_535:
            raise ValueError("receive_maximum must be 1..65535")
        if queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        if full_policy not in ("drop-oldest", "drop-newest"):
            raise ValueError(f"unknown full policy {full_policy!r}")
        self.receive_maximum = receive_maximum
        self.queue_limit = queue_limit
        self.full_policy = full_policy
        self.queue: deque[Outgoing] = deque()  # not sent yet
        self.inflight: dict[int, Outgoing] = {}  # packet id -> QoS 1/2 awaiting the client
        self._last_id = 0
        self.dropped = 0  # by the full policy
        self.refused = 0  # the client answered with an error reason code
        self.unknown_acks = 0  # acks for a packet id not in flight (ignored)
        self.expired = 0  # queued messages whose MQTT 5 message expiry passed unsent

    def __len__(self) -> int:
        return len(self.queue) + len(self.inflight)

    def enqueue(self, message: Outgoing) -> Outgoing | None:
        """Queue ``message``; return the message the full policy dropped, if any."""
        if len(self.queue) >= self.queue_limit:
            self.dropped += 1
            if self.full_policy == "drop-newest":
                message._finish()
                return message
            oldest = self.queue.popleft()
            oldest._finish()
            self.queue.append(message)
            return oldest
        self.queue.append(message)
        return None

    def window(self) -> int:
        """QoS 1/2 messages the client will take now (its Receive Maximum less in flight)."""
        return self.receive_maximum - len(self.inflight)

    def pull(self, limit: int | None = None, now: float | None = None) -> list[Outgoing]:
        """What to send now, in order; QoS 0 is finished once handed out.

        Stops at the first QoS 1/2 message the window has no room for, so the
        order of one client's messages is kept; ``limit`` bounds one batch.
        Messages whose expiry (``Outgoing.expires``) is at or before ``now``
        (default: ``time.monotonic()``) are dropped and counted.
        """
        out: list[Outgoing] = []
        queue = self.queue
        if now is None:
            now = time.monotonic()
        while queue and (limit is None or len(out) < limit):
            message = queue[0]
            if message.expires and message.expires <= now:
                queue.popleft()
                self.expired += 1
                message._finish()
                continue
            if message.qos:
                if len(self.inflight) >= self.receive_maximum:
                    break
                message.packet_id = self._next_id()
                message.state = SENT
                self.inflight[message.packet_id] = message
            queue.popleft()
            if not message.qos:
                message.state = SENT
                message._finish()
            out.append(message)
        return out

    def _next_id(self) -> int:
        for _ in range(MAX_PACKET_ID):
            self._last_id = self._last_id % MAX_PACKET_ID + 1
            if self._last_id not in self.inflight:
                return self._last_id
        raise RuntimeError("no free packet identifier")  # pragma: no cover - window <= 65535

    def on_puback(self, packet_id: int, reason_code: int = 0) -> Outgoing | None:
        """PUBACK: the QoS 1 message is done (also when the client refused it)."""
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 1:
            self.unknown_acks += 1
            return None
        del self.inflight[packet_id]
        if reason_code >= 0x80:
            self.refused += 1
        message._finish()
        return message

    def on_pubrec(self, packet_id: int, reason_code: int = 0) -> bool:
        """PUBREC: True when the session must answer PUBREL (the client took the message).

        A PUBREC for an id already released is the client's resend: answer PUBREL again.
        """
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 2:
            self.unknown_acks += 1
            return False
        if message.state == RELEASED:
            return True
        if reason_code >= 0x80:
            # The flow ends here and frees its slot (section 4.9): no PUBREL.
            del self.inflight[packet_id]
            self.refused += 1
            message._finish()
            return False
        message.state = RELEASED
        message._finish()  # the client owns it now; it stays in flight until PUBCOMP
        return True

    def on_pubcomp(self, packet_id: int) -> Outgoing | None:
        message = self.inflight.get(packet_id)
        if message is None or message.state != RELEASED:
            self.unknown_acks += 1
            return None
        del self.inflight[packet_id]
        return message

    def resume(self, receive_maximum: int | None = None) -> list[Outgoing]:
        """After a reconnect to this session: what to resend, in the original order.

        PUBLISH (DUP set) for messages in state SENT, PUBREL for RELEASED ones;
        then ``pull`` goes on with the queue.  The new connection may bring
        another Receive Maximum: what was in flight is resent all the same, new
        messages wait until the window has room.
        """
        if receive_maximum is not None:
            if not 1 <= receive_maximum <= 65_535:
                raise ValueError("receive_maximum must be 1..65535")
            self.receive_maximum = receive_maximum
        out = list(self.inflight.values())  # insertion order is the order sent
        for message in out:
            if message.state == SENT:
                message.dup = True
        return out

    def close(self) -> int:
        """The session ended (expired, cleaned, taken over clean): finish everything."""
        count = len(self)
        for message in [*self.inflight.values(), *self.queue]:
            message._finish()
        self.inflight.clear()
        self.queue.clear()
        return count
