"""The downlink wired: Kafka records to MQTT subscribers of one worker (docs/downlink.md).

``Downlink`` owns the worker's subscription trie, retained store, offset
tracker and one ``OutboundFlow`` per client with subscriptions.  The MQTT
listener calls it at a few points only: a SUBSCRIBE / UNSUBSCRIBE / ack of an
outgoing PUBLISH (``packet``, through the session's hook), a CONNACK
(``attach``), a closed connection (``detach``) and a transport that can take
output again (``writable``).  ``DownlinkConsumer`` (one per Kafka cluster per
worker) hands batches of records to ``on_batch`` on the loop.

Delivery pulls: after a batch, each touched client that is online gets its
flow pulled while its transport's buffer is under the write bound, so a slow
client fills its own bounded queue (``limits.downlink_queue``, policy
``limits.downlink_full_policy``, counted in ``dropped``) and nobody else's.

With workers > 1 a client's session moves with the MQTT session handover
(``gateway.sources.mqtt_registry``): ``begin_take`` / ``take`` on the new owner,
``give`` / ``export`` on the old one (docs/downlink.md, "To another worker").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import msgspec
import structlog

from gateway.auth import Identity
from gateway.downlink.aliases import TopicAliases
from gateway.downlink.fanout import expiry_deadline, fan_out
from gateway.downlink.outbound import (
    QUEUED,
    SENT,
    FullPolicy,
    OffsetTracker,
    OutboundFlow,
    Outgoing,
)
from gateway.downlink.record import ConsumedRecord
from gateway.downlink.retained import Retained, RetainedStore
from gateway.downlink.subscribe import Wants, handle_subscribe, handle_unsubscribe, retained_for
from gateway.downlink.subscriptions import FilterRefused, SubscriptionTrie, parse_filter
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.encode import encode
from gateway.protocols.mqtt.properties import EMPTY, Properties
from gateway.protocols.mqtt.subscribe_codec import Options
from gateway.routing.downlink import DownlinkRules

if TYPE_CHECKING:
    from gateway.protocols.mqtt.events import Connected
    from gateway.protocols.mqtt.session import MqttSession

log = structlog.get_logger("lastmile.downlink")

PULL_BATCH = 64  # messages encoded per write
# A session leaving this worker: at most this long waiting for this worker's consumer
# to reach the positions the new owner had when it asked (docs/downlink.md).
HANDOVER_WAIT_S = 3.0
TAKE_BUFFER = 50_000  # records kept for sessions being taken over (the whole worker)
TAKE_KEEP_S = 10.0  # a takeover never finished stops buffering after this
# The old owner holds a handed-over session's offsets this long (3 commit intervals).
HOLD_AFTER_HANDOVER_S = 3.0
PartitionKey = tuple[str, str, int]  # (cluster, topic, partition)
# In-flight QoS 1/2 messages per client when it announces no Receive Maximum (3.1.1).
DEFAULT_WINDOW = 64


class Link(Protocol):
    """The slice of ``MqttConnection`` the downlink uses."""

    session: MqttSession
    transport: asyncio.Transport | None
    held: bool


class _Recorder(Mapping[str, OutboundFlow]):
    """``flows`` as fan_out sees it, noting which clients got something."""

    def __init__(self, flows: dict[str, OutboundFlow], touched: set[str],
                 floors: dict[str, dict[PartitionKey, int]]) -> None:
        self.flows = flows
        self.touched = touched
        self.floors = floors  # sessions taken over: records below these came with them
        self.at: tuple[PartitionKey, int] = (("", "", 0), 0)  # the record being fanned out

    def __getitem__(self, key: str) -> OutboundFlow:
        flow = self.flows[key]
        floors = self.floors.get(key) if self.floors else None
        if floors:
            partition, offset = self.at
            floor = floors.get(partition)
            if floor is not None:
                if offset < floor:
                    raise KeyError(key)  # the old owner queued it already
                del floors[partition]  # past it: from here on as any other
        self.touched.add(key)
        return flow

    def __iter__(self) -> Iterator[str]:
        return iter(self.flows)

    def __len__(self) -> int:
        return len(self.flows)


class Downlink:
    def __init__(
        self, rules: Callable[[], DownlinkRules], *, queue_limit: int = 1000,
        full_policy: FullPolicy = "drop-oldest", write_limit: int = 64 << 10,
    ) -> None:
        self.rules = rules  # the current table's downlink rules (a reload swaps them)
        self.queue_limit = queue_limit
        self.full_policy: FullPolicy = full_policy
        self.write_limit = write_limit
        self.trie = SubscriptionTrie()
        self.retained = RetainedStore()
        self.tracker = OffsetTracker()
        self.flows: dict[str, OutboundFlow] = {}  # client id -> its outgoing side
        self.links: dict[str, Link] = {}  # client id -> its live connection
        # Outgoing topic aliases of the live connection (MQTT 5, the client allowed some):
        self._aliases: dict[str, TopicAliases] = {}
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        self._dirty: set[str] = set()
        self._resume: set[str] = set()  # reconnected: resend what was in flight first
        self._pump_scheduled = False
        self._full_logged: set[str] = set()  # clients whose full queue was logged
        self.consumers: list[DownlinkConsumer] = []
        # Subscriptions made while a replay refills the retained store: their retained
        # messages wait for its end (client id, what it wants, protocol version, _seq then).
        self._deferred: list[tuple[str, Wants, int, int]] = []
        self._seq = 0  # live records fanned out while some wait
        self._live_at: dict[str, int] = {}  # MQTT topic -> _seq of its last live message
        # Sessions moving between workers (workers > 1, docs/downlink.md):
        self._giving: dict[str, _Giving] = {}  # leaving: waiting for our positions
        self._taking: dict[str, _Taking] = {}  # arriving: records fanned out meanwhile
        self._floors: dict[str, dict[PartitionKey, int]] = {}  # arrived: what came with it
        self.elsewhere: dict[str, int] = {}  # client id -> worker whose state file has it
        self.hold_after_handover = HOLD_AFTER_HANDOVER_S
        self.handed_over = 0  # sessions given to another worker
        self.taken_over = 0  # sessions taken from another worker
        # Persistent sessions' subscriptions survive a restart in this file (None: not kept):
        # client id -> seconds of session expiry, for those that subscribed.
        self.state_file: Path | None = None
        self.expiry: dict[str, int] = {}
        self._offline_until: dict[str, float] = {}  # wall clock, for the state file
        self._state_dirty = False
        # Counters (plain ints, read by metrics and tests).
        self.records = 0  # consumed records handled
        self.queued = 0  # messages queued to clients
        self.sent = 0  # PUBLISH written
        self.skipped = 0  # records a rule could not render a topic for
        self.too_large = 0  # over the client's Maximum Packet Size: dropped
        self.refused_filters = 0  # SUBACK failure codes
        self.dropped_ended = 0  # full-queue drops of flows that are gone (``dropped``)

    @property
    def dropped(self) -> int:
        """Messages dropped by full queues (ended sessions' flows included)."""
        return self.dropped_ended + sum(flow.dropped for flow in self.flows.values())

    # --- the session's hook ------------------------------------------------------

    def packet(self, session: MqttSession, packet: p.AnyPacket) -> bytes | None:
        cid = session.client_id
        if isinstance(packet, p.Connect):
            if packet.clean_start:
                self._end(cid)  # before the SUBSCRIBEs pipelined behind this CONNECT
            return None
        flow = self.flows.get(cid)
        if not len(self.rules()) and flow is None:
            return None  # served as without a downlink
        version = session.version
        max_size = session.client_max_packet_size or None
        if isinstance(packet, p.Subscribe):
            identity = session.identity or Identity(method="anonymous", name=session.username)
            replaying = self.replaying
            answer = handle_subscribe(packet, version, cid, identity, self.rules(), self.trie,
                                      None if replaying else self.retained,
                                      max_packet_size=max_size)
            self.refused_filters += sum(1 for code in answer.codes if code >= 0x80)
            if replaying:  # the retained store is not complete yet: at the replay's end
                self._deferred.extend((cid, wants, version, self._seq) for wants in answer.wants)
            if any(code < 0x80 for code in answer.codes):
                self._changed(cid, session.expiry_interval)
                flow = self._flow(session)
                for message in answer.retained:
                    flow.enqueue(message)
                if answer.retained:
                    self._mark(cid)
            return answer.reply
        if isinstance(packet, p.Unsubscribe):
            self._changed(cid, session.expiry_interval)
            return handle_unsubscribe(packet, version, cid, self.trie,
                                      max_packet_size=max_size).reply
        if flow is None:
            return None  # an ack for nothing we sent: the session's protocol error
        if isinstance(packet, p.Puback):
            flow.on_puback(packet.packet_id, packet.reason_code)
        elif isinstance(packet, p.Pubrec):
            if flow.on_pubrec(packet.packet_id, packet.reason_code):
                return encode(p.Pubrel(packet_id=packet.packet_id), version)
        elif isinstance(packet, p.Pubcomp):
            flow.on_pubcomp(packet.packet_id)
        else:
            return None
        self._mark(cid)
        return b""

    @property
    def replaying(self) -> bool:
        """Whether a consumer still re-reads records to refill the retained store."""
        return any(consumer.replaying for consumer in self.consumers)

    def replayed(self) -> None:
        """A consumer's replay ended: once all have, the subscriptions made meanwhile get
        the retained messages of their filters (newest per topic, once), except those of
        topics they got a live message on since (newer than any retained one)."""
        if self.replaying or not self._deferred:
            return
        # The same filter subscribed again meanwhile: once, as of the last SUBSCRIBE.
        deferred = {(cid, w.filter): (cid, w, v, since) for cid, w, v, since in self._deferred}
        self._deferred = []
        live_at, self._live_at = self._live_at, {}
        log.info("downlink_retained_after_replay", subscriptions=len(deferred))
        for cid, wants, version, since in deferred.values():
            flow = self.flows.get(cid)
            if flow is None or not any(sub.filter.text == wants.filter
                                       for sub in self.trie.subscriptions(cid)):
                continue  # ended or unsubscribed meanwhile
            for message in retained_for(self.retained, wants, version):
                if live_at.get(message.topic, -1) <= since:
                    flow.enqueue(message)
            self._mark(cid)

    def _flow(self, session: MqttSession) -> OutboundFlow:
        flow = self.flows.get(session.client_id)
        if flow is None:
            flow = self.flows[session.client_id] = OutboundFlow(
                receive_maximum=_window(session), queue_limit=self.queue_limit,
                full_policy=self.full_policy)
        return flow

    # --- connections -------------------------------------------------------------

    def attach(self, link: Link, event: Connected) -> None:
        """CONNACK queued for ``link`` (a clean start has dropped the old state already,
        at the CONNECT): a persistent session resends what was in flight, then goes on."""
        cid = event.client_id
        timer = self._expiries.pop(cid, None)
        if timer is not None:
            timer.cancel()
        if self._offline_until.pop(cid, None) is not None:
            self._state_dirty = True
        self.links[cid] = link
        self._aliases.pop(cid, None)  # a new connection: the client knows no alias
        flow = self.flows.get(cid)
        if flow is not None:
            flow.receive_maximum = _window(link.session)
            self._resume.add(cid)
            self._mark(cid)  # after the CONNACK, which is written when the events are done

    def detach(self, link: Link, expiry: int) -> None:
        """``link`` closed; its subscriptions and queue live on for ``expiry`` seconds."""
        cid = link.session.client_id
        if self.links.get(cid) is not link:
            return  # taken over: the new connection has the client now
        del self.links[cid]
        self._aliases.pop(cid, None)
        self._resume.discard(cid)
        if expiry <= 0 or (cid not in self.flows and not self.trie.subscriptions(cid)):
            self._end(cid)
            return
        self._offline(cid, expiry, time.time() + expiry)

    def _offline(self, cid: str, expiry: int, until: float) -> None:
        loop = asyncio.get_running_loop()
        self._expiries[cid] = loop.call_later(max(0.0, until - time.time()), self._expire, cid)
        self.expiry[cid] = expiry
        self._offline_until[cid] = until
        self._state_dirty = True

    def _expire(self, cid: str) -> None:
        self._expiries.pop(cid, None)
        if cid not in self.links:
            self._end(cid)

    def _changed(self, cid: str, expiry: int) -> None:
        if expiry > 0 or cid in self.expiry:
            self.expiry[cid] = expiry
            self._state_dirty = True

    def _end(self, cid: str) -> None:
        if self.expiry.pop(cid, None) is not None:
            self._state_dirty = True
        self._offline_until.pop(cid, None)
        self.trie.remove_client(cid)
        self._full_logged.discard(cid)
        flow = self.flows.pop(cid, None)
        if flow is not None:
            self.dropped_ended += flow.dropped
            flow.close()  # what it held counts as finished: the offsets move on

    def writable(self, link: Link) -> None:
        """The transport drained below its low-water mark: send on."""
        cid = link.session.client_id
        if self.links.get(cid) is link:
            self._mark(cid)

    # --- persistent sessions across a restart --------------------------------------

    def save_state(self) -> None:
        """Write the persistent sessions' subscriptions (on the commit timer, if changed)."""
        if self.state_file is None or not self._state_dirty:
            return
        self._state_dirty = False
        state = {}
        for cid, expiry in self.expiry.items():
            subs = self.trie.subscriptions(cid)
            if expiry <= 0 or not subs:
                continue
            state[cid] = {
                "expiry": expiry, "until": self._offline_until.get(cid),
                "subs": [[s.filter.text, *s.options, s.identifier] for s in subs],
            }
        tmp = self.state_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            self._state_dirty = True
            log.warning("downlink_state_write_failed", path=str(self.state_file), error=str(exc))

    def load_state(self, path: Path) -> int:
        """Read what ``save_state`` wrote (before consuming): the sessions come back
        offline, their queues fill from the re-read records until they reconnect."""
        self.state_file = path
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("downlink_state_unreadable", path=str(path), error=str(exc))
            return 0
        now = time.time()
        loaded = 0
        for cid, entry in state.items():
            expiry = int(entry["expiry"])
            until = entry["until"] if entry["until"] is not None else now + expiry
            if until <= now:
                continue
            for text, qos, no_local, rap, handling, ident in entry["subs"]:
                try:
                    topic_filter = parse_filter(text)
                except FilterRefused:
                    continue
                self.trie.subscribe(cid, topic_filter, Options(qos, no_local, rap, handling),
                                    ident)
            self.flows[cid] = OutboundFlow(receive_maximum=DEFAULT_WINDOW,
                                           queue_limit=self.queue_limit,
                                           full_policy=self.full_policy)
            self._offline(cid, expiry, until)
            loaded += 1
        return loaded

    # --- records -----------------------------------------------------------------

    def on_batch(self, records: list[ConsumedRecord], replay: Callable[[ConsumedRecord], bool]
                 ) -> None:
        """One batch from a consumer, on the loop; ``replay`` says which records are
        re-read only to fill the retained store (before the committed position)."""
        rules = self.rules()
        touched: set[str] = set()
        flows = _Recorder(self.flows, touched, self._floors)
        links = self.links
        if self._taking:
            self._buffer(records, replay)
        for record in records:
            if replay(record):
                deliveries, _skipped = rules.route(record)
                for delivery in deliveries:
                    if delivery.retain:
                        self.retained.set(Retained(
                            delivery.topic, delivery.payload, delivery.qos,
                            delivery.properties,
                            expiry_deadline(delivery.expiry, record.timestamp)))
                continue
            self.records += 1
            if self._deferred:  # subscriptions wait for retained messages: note the topic
                self._seq += 1
                for delivery in rules.route(record)[0]:
                    self._live_at[delivery.topic] = self._seq
            flows.at = ((record.cluster, record.topic, record.partition), record.offset)
            try:
                result = fan_out(record, rules, self.trie, flows, self.tracker, self.retained,
                                 links.__contains__)
            except ValueError:
                # The partition went back (librdkafka reset an out-of-range position):
                # follow it; what was pending there is re-read, not committed past.
                log.warning("downlink_partition_rewound", cluster=record.cluster,
                            topic=record.topic, partition=record.partition,
                            offset=record.offset)
                self.tracker.forget((record.cluster, record.topic, record.partition))
                result = fan_out(record, rules, self.trie, flows, self.tracker, self.retained,
                                 links.__contains__)
            self.queued += result.queued
            self.skipped += len(result.skipped)
        for cid in touched:
            self._mark(cid)
            flow = self.flows[cid]
            if flow.dropped and cid not in self._full_logged:
                # Once per client's queue: a fleet of slow clients must not flood the log.
                self._full_logged.add(cid)
                log.warning("downlink_queue_full", client_id=cid, limit=flow.queue_limit,
                            policy=flow.full_policy, online=cid in links)
        if self._giving:
            for cid in [c for c, giving in self._giving.items() if self._reached(giving.want)]:
                self._give_now(cid)

    # --- output ------------------------------------------------------------------

    def _mark(self, cid: str) -> None:
        self._dirty.add(cid)
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump_dirty)

    def _pump_dirty(self) -> None:
        self._pump_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for cid in dirty:
            link = self.links.get(cid)
            if link is not None:
                try:
                    self._pump(cid, link)
                except Exception:
                    log.exception("downlink_pump_error", client_id=cid)

    def _pump(self, cid: str, link: Link) -> None:
        flow = self.flows.get(cid)
        transport = link.transport
        session = link.session
        if (flow is None or transport is None or transport.is_closing() or link.held
                or session.closing):
            return
        version = session.version
        limit = session.client_max_packet_size
        aliases = self._aliases.get(cid)
        if aliases is None and version == 5 and session.client_topic_alias_maximum > 0:
            aliases = self._aliases[cid] = TopicAliases(session.client_topic_alias_maximum)
        if cid in self._resume:
            self._resume.discard(cid)
            chunks = []
            for message in flow.resume():
                if message.state == "released":
                    chunks.append(encode(p.Pubrel(packet_id=message.packet_id), version))
                else:
                    chunks.append(self._encode(message, version))  # the full topic
            if chunks:
                transport.write(b"".join(chunks))
        while transport.get_write_buffer_size() < self.write_limit:
            batch = flow.pull(PULL_BATCH)
            if not batch:
                return
            chunks = []
            for message in batch:
                alias, with_topic = (aliases.choose(message.topic) if aliases is not None
                                     else (0, True))
                data = self._encode(message, version, alias, with_topic)
                if limit and len(data) > limit and alias and with_topic:
                    alias, data = 0, self._encode(message, version)  # 3 bytes less
                if limit and len(data) > limit:
                    # [MQTT-3.1.2-25]: never send more than the client takes; the message
                    # counts as refused by it.
                    self.too_large += 1
                    if message.qos == 1:
                        flow.on_puback(message.packet_id, 0x95)
                    elif message.qos == 2:
                        flow.on_pubrec(message.packet_id, 0x95)
                    continue
                if alias and aliases is not None:
                    aliases.sent(message.topic, alias)
                chunks.append(data)
            self.sent += len(chunks)
            if chunks:
                transport.write(b"".join(chunks))

    @staticmethod
    def _encode(message: Outgoing, version: int, alias: int = 0, with_topic: bool = True
                ) -> bytes:
        """``message`` as a PUBLISH; with ``alias`` (MQTT 5 topic alias), the topic only
        when ``with_topic`` (the client does not know the alias's topic yet)."""
        props = message.properties if version == 5 else None
        if version == 5 and message.expires:
            # MQTT 5 3.3.2.3.3: the interval sent is what remains of it.
            remaining = max(1, math.ceil(message.expires - time.monotonic()))
            props = msgspec.structs.replace(props or EMPTY, message_expiry_interval=remaining)
        if alias:
            props = msgspec.structs.replace(props or EMPTY, topic_alias=alias)
        return encode(p.Publish(
            topic=message.topic if with_topic else "", payload=message.payload,
            qos=message.qos, retain=message.retain, dup=message.dup,
            packet_id=message.packet_id, properties=props,
        ), version)

    # --- sessions moving between workers (workers > 1) ----------------------------

    def positions(self) -> list[list[Any]]:
        """[cluster, topic, partition, offset]: where this worker's fan-out is, per
        partition (the next record it will fan out)."""
        out: list[list[Any]] = []
        parts = self.tracker.partitions
        for consumer in self.consumers:
            for (topic, partition), start in consumer.fanout_start.items():
                part = parts.get((consumer.cluster, topic, partition))
                at = part.next if part is not None and part.next >= 0 else start
                out.append([consumer.cluster, topic, partition, at])
        return out

    def _position(self, key: PartitionKey) -> int | None:
        part = self.tracker.partitions.get(key)
        if part is not None and part.next >= 0:
            return part.next
        for consumer in self.consumers:
            if consumer.cluster == key[0]:
                return consumer.fanout_start.get((key[1], key[2]))
        return None

    def _reached(self, want: list[list[Any]]) -> bool:
        for cluster, topic, partition, offset in want:
            at = self._position((cluster, topic, partition))
            if at is not None and at < offset:
                return False
        return True

    def holder(self, client_id: str) -> int | None:
        """The worker whose state file (at this worker's start) has ``client_id``'s
        persistent session: after a restart, a connect here takes it from there."""
        holder = self.elsewhere.pop(client_id, None)
        if holder is None or client_id in self.flows or self.trie.subscriptions(client_id):
            return None  # ours (a file written twice would be the older one there)
        return holder

    def begin_take(self, client_id: str) -> list[list[Any]]:
        """This worker asks for ``client_id``'s session: our positions, for the old owner
        to reach before it lets go; what we fan out from now on is kept for the client."""
        giving = self._giving.pop(client_id, None)
        if giving is not None:  # back before we let go: it stays here
            giving.timer.cancel()
            giving.done(None)
        self._taking[client_id] = _Taking(time.monotonic() + TAKE_KEEP_S)
        return self.positions()

    def _buffer(self, records: list[ConsumedRecord],
                replay: Callable[[ConsumedRecord], bool]) -> None:
        now = time.monotonic()
        for cid in [c for c, t in self._taking.items() if t.deadline < now]:
            del self._taking[cid]
        kept = [r for r in records if not replay(r)]
        total = sum(len(t.records) for t in self._taking.values())
        for cid, taking in self._taking.items():
            if taking.overflow:
                continue  # stopped at its first gap: never a later record without it
            if total + len(kept) > TAKE_BUFFER:
                taking.overflow = True
                log.warning("downlink_takeover_buffer_full", client_id=cid, limit=TAKE_BUFFER)
                continue
            taking.records.extend(kept)
            total += len(kept)

    def give(self, client_id: str, want: list[list[Any]] | None,
             done: Callable[[bytes | None], None]) -> None:
        """Another worker took ``client_id`` over: once our fan-out is where the new
        owner's was when it asked (``want``; at most ``HANDOVER_WAIT_S``), ``done`` gets
        the session (``export``), or None when there is none here."""
        self._taking.pop(client_id, None)
        old = self._giving.pop(client_id, None)
        if old is not None:
            old.timer.cancel()
            old.done(None)  # a newer claim: the older one gets nothing
        self.links.pop(client_id, None)  # its connection is being ended
        self._aliases.pop(client_id, None)
        self._resume.discard(client_id)
        if client_id not in self.flows and not self.trie.subscriptions(client_id):
            done(None)
            return
        if not want or self._reached(want):
            done(self.export(client_id))
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(HANDOVER_WAIT_S, self._give_late, client_id)
        self._giving[client_id] = _Giving(want, done, timer)

    def _give_late(self, client_id: str) -> None:
        giving = self._giving.get(client_id)
        if giving is not None:
            log.warning("downlink_handover_behind", client_id=client_id,
                        wanted=giving.want, at=self.positions())
            self._give_now(client_id)

    def _give_now(self, client_id: str) -> None:
        giving = self._giving.pop(client_id)
        giving.timer.cancel()
        giving.done(self.export(client_id))

    def export(self, client_id: str) -> bytes:
        """``client_id``'s session as bytes for ``take`` on another worker, and its end
        here: its messages' offsets are no longer held by this worker."""
        flow = self.flows.get(client_id)
        messages: list[list[Any]] = []
        last_id = 0
        if flow is not None:
            last_id = flow._last_id
            for m in [*flow.inflight.values(), *flow.queue]:
                origin = m.origin
                messages.append([
                    m.topic, m.payload, m.qos, m.retain, m.packet_id, m.state, m.dup,
                    msgspec.msgpack.encode(m.properties) if m.properties is not None else None,
                    max(0.001, m.expires - time.monotonic()) if m.expires else 0.0,
                    [*cast(PartitionKey, origin.partition), origin.offset]
                    if origin is not None else None,
                ])
        doc: dict[str, Any] = {
            "expiry": self.expiry.get(client_id, 0),
            "subs": [[s.filter.text, *s.options, s.identifier]
                     for s in self.trie.subscriptions(client_id)],
            "last_id": last_id, "messages": messages, "positions": self.positions(),
        }
        timer = self._expiries.pop(client_id, None)
        if timer is not None:
            timer.cancel()
        self._floors.pop(client_id, None)
        if flow is not None:
            # Its offsets stay held here a little longer: until the new owner's commit,
            # sent at once, has landed (else a crash of it in between would lose them).
            del self.flows[client_id]
            self.dropped_ended += flow.dropped
            asyncio.get_running_loop().call_later(self.hold_after_handover, flow.close)
        self._end(client_id)
        self._state_dirty = True
        self.handed_over += 1
        log.info("downlink_session_handed_over", client_id=client_id,
                 messages=len(messages), subscriptions=len(doc["subs"]))
        self.save_state()  # the session is the new owner's now, in its file only
        return msgspec.msgpack.encode(doc)

    def take(self, session: MqttSession, data: bytes | None) -> None:
        """The old owner let go of ``session``'s client id (``data``: its ``export``, None
        for nothing, or a session the client does not keep): the subscriptions, the
        messages in flight (resent, DUP) and queued, and what we fanned out meanwhile
        past where the old owner was."""
        cid = session.client_id
        taking = self._taking.pop(cid, None)
        if data is None:
            return
        try:
            doc = msgspec.msgpack.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("downlink_handover_unreadable", client_id=cid, error=str(exc))
            return
        # A SUBSCRIBE pipelined behind the CONNECT may have been served here already:
        # its subscriptions are the newer ones, its queue goes after the old one.
        mine = {sub.filter.text for sub in self.trie.subscriptions(cid)}
        for text, qos, no_local, rap, handling, ident in doc["subs"]:
            if text in mine:
                continue
            try:
                topic_filter = parse_filter(text)
            except FilterRefused:
                continue
            self.trie.subscribe(cid, topic_filter, Options(qos, no_local, rap, handling), ident)
        flow = self._flow(session)
        if not flow.inflight:
            flow._last_id = doc["last_id"]
        starts = {tuple(k): v for *k, v in self.positions()}
        now = time.monotonic()
        queued: list[Outgoing] = []
        for (topic, payload, qos, retain, pid, state, dup, props, remaining,
             origin) in doc["messages"]:
            pending = None
            if origin is not None:
                key = (origin[0], origin[1], origin[2])
                pending = self.tracker.adopt(key, origin[3], starts.get(key, origin[3]))
            message = Outgoing(
                topic, payload, qos, retain, origin=pending,
                properties=msgspec.msgpack.decode(props, type=Properties)
                if props is not None else None,
                expires=now + remaining if remaining else 0.0)
            if state == QUEUED or (state == SENT and pid in flow.inflight):
                queued.append(message)  # (an id taken here: sent again as new)
            elif pid not in flow.inflight:
                message.packet_id, message.state, message.dup = pid, state, dup
                flow.inflight[pid] = message
            else:  # released, its id taken here: the client has it, only PUBCOMP is lost
                message._finish()
        flow.queue.extendleft(reversed(queued))
        floors = {(c, t, part): at for c, t, part, at in doc["positions"]}
        if floors:
            self._floors[cid] = floors
        if taking is not None and taking.records:
            self._refan(cid, taking.records)
        if doc["expiry"]:
            self._changed(cid, doc["expiry"])
        self._state_dirty = True
        self.taken_over += 1
        log.info("downlink_session_taken_over", client_id=cid, messages=len(doc["messages"]),
                 meanwhile=len(taking.records) if taking is not None else None,
                 queued=len(flow), online=cid in self.links)
        if cid in self.links:
            self._resume.add(cid)
            self._mark(cid)
        self.save_state()
        for consumer in self.consumers:  # the offsets we hold now, committed soon
            consumer.commit(self.committable(consumer.cluster))

    def _refan(self, cid: str, records: list[ConsumedRecord]) -> None:
        """Records fanned out here while ``cid`` was on its way: to it, from its floors."""
        rules = self.rules()
        floors = self._floors.get(cid, {})
        starts = {tuple(k): v for *k, v in self.positions()}
        for record in records:
            key = (record.cluster, record.topic, record.partition)
            floor = floors.get(key)
            if floor is not None and record.offset < floor:
                continue
            pending = self.tracker.adopt(key, record.offset, starts.get(key, record.offset))
            result = fan_out(record, rules, self.trie, self.flows, self.tracker, None,
                             pending=pending, only=cid)
            self.queued += result.queued

    # --- offsets -----------------------------------------------------------------

    def committable(self, cluster: str) -> dict[tuple[str, int], int]:
        """(topic, partition) -> the offset every subscriber is done with, for ``cluster``."""
        out: dict[tuple[str, int], int] = {}
        for key, offset in self.tracker.committable().items():
            c, topic, partition = cast(tuple[str, str, int], key)  # fan_out's partition key
            if c == cluster:
                out[(topic, partition)] = offset
        return out


class _Giving:
    __slots__ = ("done", "timer", "want")

    def __init__(self, want: list[list[Any]], done: Callable[[bytes | None], None],
                 timer: asyncio.TimerHandle) -> None:
        self.want = want
        self.done = done
        self.timer = timer


class _Taking:
    __slots__ = ("deadline", "overflow", "records")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.records: list[ConsumedRecord] = []
        self.overflow = False


def _window(session: MqttSession) -> int:
    if session.version == 5:
        return session.client_receive_maximum
    return DEFAULT_WINDOW


def _seconds(timestamp: tuple[int, int]) -> float:
    kind, ms = timestamp  # kind 0: confluent_kafka.TIMESTAMP_NOT_AVAILABLE
    return ms / 1000 if kind != 0 and ms > 0 else 0.0


def group_id(worker_id: int) -> str:
    """Positions are committed per gateway host and worker (positions only, no membership)."""
    host = os.environ.get("LASTMILE_POD") or os.environ.get("HOSTNAME") or socket.gethostname()
    return f"lastmile-{host}-w{worker_id}"


def consumer_settings(bootstrap: str, producer: Mapping[str, Any], group: str) -> dict[str, Any]:
    """The consumer's librdkafka settings: the cluster's connection and security keys."""
    settings: dict[str, Any] = {
        k: v for k, v in producer.items()
        if k.startswith(("security.", "ssl.", "sasl.", "client.", "socket.", "broker."))
    }
    settings.update({
        "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
        "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    })
    return settings


class DownlinkConsumer:
    """One Kafka consumer of one cluster for this worker: ``assign`` of every partition
    of the downlink topics (no group membership), a poll thread, batches to the loop.

    Where it starts: each partition at the position committed under ``group``
    (what every subscriber had finished), else at the beginning.  A topic a
    ``retain: true`` rule reads is read from the beginning always, the records
    before the committed position only refilling the retained store.
    """

    def __init__(
        self, cluster: str, settings: dict[str, Any], topics: frozenset[str],
        retained_topics: frozenset[str], deliver: Callable[..., None],
        *, max_batches: int = 4,
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.topics = topics
        self.retained_topics = retained_topics
        self.deliver = deliver
        self.replay_until: dict[tuple[str, int], int] = {}
        # Partitions whose replay (records before the committed position) the loop has not
        # finished: on the loop; ``_replay_left`` is the poll thread's view of them.
        self.replaying: set[tuple[str, int]] = set()
        self._replay_left: dict[tuple[str, int], int] = {}
        self.replayed: Callable[[], None] = lambda: None  # the loop finished every replay
        self.missing: set[str] = set(topics)  # no partitions seen yet
        self._consumer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._batches = threading.Semaphore(max_batches)  # handed to the loop, not done
        self._committed: dict[tuple[str, int], int] = {}
        # Where fan-out starts per partition: the committed position, else 0 (beginning).
        self.fanout_start: dict[tuple[str, int], int] = {}
        self._to_commit: list[Any] | None = None  # positions for the poll thread to commit
        # Kafka-side lag, kept by the poll thread (the only user of the consumer): per
        # (topic, partition), the records between what it read and the high watermark
        # librdkafka last saw (cached, no request); replaced whole, read by the metrics.
        self.lag: dict[tuple[str, int], int] = {}
        self._read: dict[tuple[str, int], int | None] = {}  # next offset; None: the start
        self._assigned: list[Any] = []
        self._next_lag = 0.0
        self.consumed = 0
        self.errors = 0

    def replay(self, record: ConsumedRecord) -> bool:
        until = self.replay_until.get((record.topic, record.partition))
        return until is not None and record.offset < until

    async def start(self) -> None:
        from confluent_kafka import Consumer

        self._loop = asyncio.get_running_loop()
        self._consumer = Consumer(self.settings)
        await self._loop.run_in_executor(None, self._assign_missing)
        self._running = True
        self._thread = threading.Thread(target=self._poll_forever, name=f"downlink-{self.cluster}",
                                        daemon=True)
        self._thread.start()

    def _assign_missing(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        consumer = self._consumer
        at_start = not self._running
        wanted: list[Any] = []
        for topic in sorted(self.missing):
            try:
                md = consumer.list_topics(topic, timeout=10)
            except KafkaException as exc:
                log.warning("downlink_metadata_failed", cluster=self.cluster, topic=topic,
                            error=str(exc))
                continue
            meta = md.topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                log.warning("downlink_topic_missing", cluster=self.cluster, topic=topic)
                continue
            self.missing.discard(topic)
            wanted.extend(TopicPartition(topic, part) for part in sorted(meta.partitions))
        if not wanted:
            return
        committed = consumer.committed(wanted, timeout=10)
        start = []
        for tp in committed:
            key = (tp.topic, tp.partition)
            position = tp.offset if tp.offset >= 0 else None
            if position is not None:
                self._committed[key] = position
            if tp.topic in self.retained_topics:
                if position is None and at_start:
                    # First start: what the topic holds now is history, replayed into the
                    # retained store (not fanned out as live messages to early subscribers).
                    # A topic that appears later is new: all of it is fanned out.
                    position = self._high_watermark(tp)
                position = position or 0
                self.fanout_start[key] = position
                self.replay_until[key] = position
                if position:
                    self._replay_left[key] = position
                start.append(TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING))
            else:
                self.fanout_start[key] = position or 0
                start.append(TopicPartition(tp.topic, tp.partition,
                                            OFFSET_BEGINNING if position is None else position))
        if self._replay_left:
            self._tell_loop(self._replay_begun, set(self._replay_left))
        consumer.incremental_assign(start)
        for tp in start:
            self._read[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
        self._assigned = [*self._assigned, *start]
        log.info("downlink_assigned", cluster=self.cluster, partitions=len(start),
                 committed={f"{t}:{p}": o for (t, p), o in self._committed.items()})

    def _high_watermark(self, tp: Any) -> int:
        from confluent_kafka import KafkaException

        try:
            return max(0, int(self._consumer.get_watermark_offsets(tp, timeout=10)[1]))
        except KafkaException as exc:
            log.warning("downlink_watermark_failed", cluster=self.cluster, topic=tp.topic,
                        partition=tp.partition, error=str(exc))
            return 0

    def _poll_forever(self) -> None:
        consumer = self._consumer
        next_check = time.monotonic() + 5.0
        while self._running:
            if self._to_commit is not None:
                self._commit_now()
            self._measure_lag(handed=True)
            if self.missing and time.monotonic() >= next_check:
                next_check = time.monotonic() + 5.0
                with contextlib.suppress(Exception):
                    self._assign_missing()
            try:
                # Wait for the first record only, then take what is already there:
                # consume(500, timeout) waits for all 500 or the whole timeout.
                first = consumer.poll(0.1)
                messages = [] if first is None else [first, *consumer.consume(499, 0)]
            except Exception as exc:  # pragma: no cover - closed under us at shutdown
                if self._running:
                    log.warning("downlink_consume_failed", cluster=self.cluster, error=str(exc))
                    time.sleep(0.5)
                continue
            batch: list[ConsumedRecord] = []
            read = self._read
            for msg in messages:
                err = msg.error()
                if err is not None:
                    self.errors += 1
                    log.warning("downlink_consume_error", cluster=self.cluster, error=str(err))
                    continue
                read[(msg.topic(), msg.partition())] = msg.offset() + 1
                batch.append(ConsumedRecord(
                    topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
                    key=msg.key(), value=msg.value(), headers=tuple(msg.headers() or ()),
                    cluster=self.cluster, timestamp=_seconds(msg.timestamp()),
                ))
            if not batch:
                continue
            done = self._replays_reached(batch) if self._replay_left else None
            self.consumed += len(batch)
            # At most max_batches wait for the loop: a busy loop slows the consumer down.
            while self._running and not self._batches.acquire(timeout=0.5):
                self._measure_lag()  # behind: that is when the lag matters
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._hand, batch, done)
            except RuntimeError:  # pragma: no cover - the loop closed at shutdown
                return

    def _tell_loop(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
            self._loop.call_soon_threadsafe(callback, *args)

    def _replays_reached(self, batch: list[ConsumedRecord]) -> set[tuple[str, int]] | None:
        """Poll thread: the partitions whose replay ends with ``batch`` (a record at or past
        the last one before the committed position)."""
        done = None
        left = self._replay_left
        for record in batch:
            key = (record.topic, record.partition)
            until = left.get(key)
            if until is not None and record.offset >= until - 1:
                del left[key]
                done = done or set()
                done.add(key)
        return done

    def _replay_begun(self, keys: set[tuple[str, int]]) -> None:
        self.replaying |= keys

    def _replay_ended(self, keys: set[tuple[str, int]]) -> None:
        if self.replaying and keys & self.replaying:
            self.replaying -= keys
            if not self.replaying:
                log.info("downlink_replay_done", cluster=self.cluster)
                self.replayed()

    def _measure_lag(self, every: float = 1.0, handed: bool = False) -> None:
        """On the poll thread, at most once per ``every`` seconds: ``lag`` from librdkafka's
        cached watermarks (a partition whose high watermark is not known yet is left out).
        With ``handed`` (every record read is on its way to the loop), a partition still
        replaying with no lag has nothing more to replay (compaction removed its last
        records before the committed position)."""
        now = time.monotonic()
        if now < self._next_lag:
            return
        self._next_lag = now + every
        lag: dict[tuple[str, int], int] = {}
        for tp in self._assigned:
            key = (tp.topic, tp.partition)
            try:
                low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except Exception:  # pragma: no cover - closed under us at shutdown
                continue
            if high < 0:
                continue
            at = self._read.get(key)
            lag[key] = max(0, high - (at if at is not None else max(low, 0)))
        self.lag = lag
        if handed and self._replay_left:
            done = {key for key in self._replay_left if lag.get(key) == 0}
            if done:
                for key in done:
                    del self._replay_left[key]
                self._tell_loop(self._replay_ended, done)

    def _hand(self, batch: list[ConsumedRecord], done: set[tuple[str, int]] | None = None
              ) -> None:
        try:
            self.deliver(batch, self.replay)
            if done:
                self._replay_ended(done)
        except Exception:
            log.exception("downlink_batch_error", cluster=self.cluster)
        finally:
            self._batches.release()

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Commit the positions that moved (called on the loop; the poll thread commits:
        a commit from another thread while it sits in ``consume`` blocks the loop)."""
        from confluent_kafka import TopicPartition

        moved = [TopicPartition(t, part, off) for (t, part), off in offsets.items()
                 if self._committed.get((t, part)) != off]
        if not moved or self._consumer is None:
            return
        for tp in moved:
            self._committed[(tp.topic, tp.partition)] = tp.offset
        self._to_commit = moved  # replaces an older set not taken yet: newer positions

    def _commit_now(self) -> None:
        moved, self._to_commit = self._to_commit, None
        if moved:
            try:
                self._consumer.commit(offsets=moved, asynchronous=True)
            except Exception as exc:
                log.warning("downlink_commit_failed", cluster=self.cluster, error=str(exc))

    async def close(self, final: Mapping[tuple[str, int], int]) -> None:
        self._running = False
        thread = self._thread
        loop = asyncio.get_running_loop()
        if thread is not None:
            await loop.run_in_executor(None, thread.join, 5.0)
        consumer = self._consumer
        if consumer is None:
            return
        from confluent_kafka import TopicPartition

        def finish() -> None:
            # Every position, not only the moved ones: the poll thread may have stopped
            # before it took the last periodic commit (``_committed`` already has it).
            moved = [TopicPartition(t, part, off) for (t, part), off in final.items()]
            if moved:
                with contextlib.suppress(Exception):
                    consumer.commit(offsets=moved, asynchronous=False)
            consumer.close()

        await loop.run_in_executor(None, finish)
        self._consumer = None


def other_sessions(directory: Path, worker_id: int, workers: int) -> dict[str, int]:
    """Client id -> worker, for the persistent sessions in the other workers' state files
    (of the ``workers`` running): after a restart, a client landing here takes its
    session from the one that has it."""
    out: dict[str, int] = {}
    now = time.time()
    for path in sorted(directory.glob("downlink-sessions-w*.json")):
        try:
            worker = int(path.stem.rsplit("-w", 1)[1])
        except ValueError:
            continue
        if worker == worker_id or worker >= workers:
            continue
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # its worker logs it when it loads it
        for cid, entry in state.items():
            until = entry.get("until")
            if until is None or until > now:
                out[cid] = worker
    return out


COMMIT_INTERVAL = 1.0  # seconds between commits of the finished positions


async def start_downlink(
    rules: Callable[[], DownlinkRules], config: Any, bootstrap: Mapping[str, str],
    worker_id: int,
) -> tuple[Downlink, Callable[[float], Any]] | None:
    """The downlink of this worker, consuming (the MQTT server gets it as ``downlink``)
    and its cleanup; None when there are no downlink rules.

    The Kafka topics are the ones the rules read at start: a reload that adds
    a topic needs a restart to be consumed.
    """
    table = rules()
    if not len(table):
        return None
    limits = config.limits
    service = Downlink(rules, queue_limit=limits.downlink_queue,
                       full_policy=limits.downlink_full_policy,
                       write_limit=limits.max_write_buffer_bytes)
    group = group_id(worker_id)
    state = Path(config.spool.dir) / f"downlink-sessions-w{worker_id}.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    sessions = service.load_state(state)
    if config.workers > 1:
        service.elsewhere = other_sessions(state.parent, worker_id, config.workers)
    try:
        for cluster in sorted(table.clusters):
            cfg = config.kafka.clusters[cluster]
            retained = frozenset(r.kafka_topic for r in table.rules
                                 if r.cluster == cluster and r.retain)
            consumer = DownlinkConsumer(
                cluster, consumer_settings(bootstrap.get(cluster) or cfg.bootstrap_servers,
                                           cfg.producer, group),
                table.kafka_topics(cluster), retained, service.on_batch)
            consumer.replayed = service.replayed
            service.consumers.append(consumer)
            await consumer.start()
    except BaseException:
        for consumer in service.consumers:
            await consumer.close({})
        raise

    async def commit_forever() -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL)
            service.save_state()
            for consumer in service.consumers:
                consumer.commit(service.committable(consumer.cluster))

    task = asyncio.create_task(commit_forever(), name="downlink-commit")
    log.info("downlink_started", rules=len(table), group=group, sessions=sessions,
             topics=sorted(f"{c.cluster}:{t}" for c in service.consumers for t in c.topics))

    async def close(_timeout: float) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for consumer in service.consumers:
            await consumer.close(service.committable(consumer.cluster))
        service.save_state()

    return service, close
