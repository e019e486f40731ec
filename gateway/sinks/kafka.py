"""The Kafka sink: one confluent-kafka Producer per cluster per worker process.

``produce()`` is a C call made on the event loop, and so is ``poll()``: a timer
on the loop polls every ``POLL_BUSY_S`` while records are in flight (every
``POLL_IDLE_S`` otherwise, for client errors and restarts), and the delivery
reports of one poll are handled right there, in one batch.  There is no poll
thread: confluent-kafka takes the GIL back for every report's callback, and
from a second thread each of those was a GIL hand-over with the busy loop (up
to the 5 ms switch interval each; docs/performance.md, section 5).  Device
connections never reach this module.

Per record, ``poll()`` runs one small closure that appends a tuple; ``flush()``
at shutdown runs in an executor thread only after the poll timer has stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from gateway.config import producer_settings
from gateway.config.schema import Cluster
from gateway.errors import (
    DeliveryFailed,
    GatewayError,
    RecordTooLarge,
    ShuttingDown,
    Unavailable,
    UnknownPartition,
)
from gateway.model import Delivery, Record, record_wire_size
from gateway.observability.latency import Latency

log = structlog.get_logger("lastmile.kafka")
_monotonic = time.monotonic

# (record, delivery or None, error or None), always called on the event loop.
DeliveryCallback = Callable[[Record, Delivery | None, GatewayError | None], None]

# Errors that will not go away by retrying the same record.
_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.INVALID_RECORD,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.RECORD_LIST_TOO_LARGE,
}


# The producer, not the record, is broken: a fresh producer (new id/epoch) can send it.
# Seen when an outage outlasts message.timeout.ms: the idempotent producer bumps its
# epoch and a broker without KIP-360 answers PRODUCER_FENCED to everything after.
_PRODUCER_BROKEN = {
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError._FENCED,
    KafkaError._FATAL,
}


# At most one metadata request per topic this often for partition checks.
REFRESH_INTERVAL_S = 0.5
# How often the loop polls the producer for delivery reports: while records are in
# flight (a report waits at most this long, on top of linger.ms and the broker), and
# while none are (client errors, retiring producers).
POLL_BUSY_S = 0.001
POLL_IDLE_S = 0.05
# While records keep coming, a produce() this long after the last poll moves the
# next poll to the end of the current loop turn: under traffic a report waits about
# this long instead of the timer's 1 ms (libuv timers tick in whole milliseconds).
POLL_EAGER_S = 0.00025


def producer_broken(err: KafkaError) -> bool:
    return bool(err.fatal()) or err.code() in _PRODUCER_BROKEN


def classify(err: KafkaError) -> DeliveryFailed:
    """Turn a librdkafka error into our error with a retriable hint."""
    permanent = err.code() in _PERMANENT and not producer_broken(err)
    return DeliveryFailed(
        f"Kafka refused the record: {err.str()}",
        retriable=not permanent,
        kafka_code=err.name(),
    )


def _check_header_names(headers: list[tuple[str, bytes]]) -> None:
    """Raise for a header name librdkafka cannot take.

    confluent-kafka 2.x crashes the process (SIGSEGV) on a name that is not
    encodable as UTF-8 (a lone surrogate); the edges refuse those, this is the
    last guard.  ``isascii`` keeps the usual case to one C call per header.
    """
    for name, _ in headers:
        if not name.isascii():
            name.encode("utf-8")  # UnicodeEncodeError: this record fails alone


# Producer-only keys: idempotence would make the check's client fetch a producer id
# (and gapless is refused without it); everything else, security included, is kept.
_ADMIN_DROPPED = {"enable.idempotence", "enable.gapless.guarantee", "transactional.id",
                  "error_cb"}


def admin_settings(producer: dict[str, Any]) -> dict[str, Any]:
    """The settings the startup metadata check uses: the producer's, minus producer-only keys."""
    return {k: v for k, v in producer.items() if k not in _ADMIN_DROPPED}


class _LibrdkafkaLog:
    """librdkafka's log lines as structured events instead of raw stderr (syslog levels)."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster

    def log(self, level: int, fmt: str, *args: Any) -> None:
        text = fmt % args if args else fmt
        if level <= 3:
            log.error("librdkafka", cluster=self.cluster, message=text)
        elif level <= 5:
            log.warning("librdkafka", cluster=self.cluster, message=text)
        else:
            log.debug("librdkafka", cluster=self.cluster, message=text)


class KafkaSink:
    """Produces records to one cluster; reports each record's fate on the loop."""

    def __init__(self, name: str, cluster: Cluster, bootstrap: str | None = None) -> None:
        self.name = name
        self.bootstrap = bootstrap or cluster.bootstrap_servers
        self._settings = {**producer_settings(cluster, self.bootstrap),
                          "logger": _LibrdkafkaLog(name)}
        self._connect_timeout = cluster.connect_timeout_s
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll_handle: asyncio.Handle | None = None
        self._poll_busy = False  # the poll timer runs at POLL_BUSY_S
        self._polled_at = 0.0  # monotonic time of the last poll
        self._poll_eager = False  # a poll is queued for the end of this loop turn
        self._running = False
        # Appended inside poll() / flush(), taken by the same thread (the loop's, or the
        # executor's flush at shutdown once the poll timer has stopped).
        # (record, callback, error, message, when produced)
        self._reports: list[tuple[Record, DeliveryCallback, Any, Any, float]] = []
        # produce() -> delivery report, successful records (lastmile_kafka_delivery_latency)
        self.latency = Latency()
        # Records librdkafka's queue could not take yet (BufferError); retried in order.
        self._backlog: deque[tuple[Record, DeliveryCallback]] = deque()
        self.delivered = 0
        self.failed = 0
        # Records librdkafka took, and reports handled on the loop: in_flight is the
        # difference. librdkafka's len() also counts queued error events, so it lags.
        self._handed = 0
        self._reported = 0
        self.restarts = 0
        # When librdkafka last reported every broker down (monotonic; health reads it).
        self.all_brokers_down_at: float | None = None
        self._restart_needed = False
        # Producers replaced after a fatal error, polled until their queues are empty.
        self._retiring: list[Producer] = []
        # Partition count per topic, from metadata: client-chosen partitions are
        # checked against it before any ack (docs/contract.md).
        self.partitions: dict[str, int] = {}
        self._refreshing: set[str] = set()
        self._refreshed_at: dict[str, float] = {}
        self._gone: set[Producer] = set()  # empty, removal from _retiring posted

    @property
    def in_flight(self) -> int:
        """Records handed over and not yet reported (read for metrics, not per record)."""
        return len(self._backlog) + self._handed - self._reported

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Create the producer and check the cluster answers metadata in time."""
        self._loop = asyncio.get_running_loop()
        self._producer = Producer({**self._settings, "error_cb": self._on_error})
        await self._loop.run_in_executor(None, self._check_metadata)
        self._running = True
        self._poll_handle = self._loop.call_soon(self._poll)
        log.info("kafka_sink_started", cluster=self.name, bootstrap=self.bootstrap)

    def _check_metadata(self) -> None:
        """Ask the cluster for metadata with the producer's own settings (TLS, SASL...).

        confluent-kafka's AdminClient is a librdkafka client like the producer and
        takes the same keys, so a secured cluster is reached the way the producer
        will reach it, and a wrong security setting fails here, at startup.
        """
        errors: list[str] = []
        settings = admin_settings(self._settings)
        settings["error_cb"] = lambda err: errors.append(err.str())
        admin = AdminClient(settings)
        try:
            md = admin.list_topics(timeout=self._connect_timeout)
        except KafkaException as exc:
            reason = exc.args[0].str() if exc.args else str(exc)
            admin.poll(0)  # serves error_cb: the handshake or auth failure says why
            last = f" (last client error: {errors[-1]})" if errors else ""
            raise Unavailable(
                f"Kafka cluster '{self.name}' at {self.bootstrap} did not answer within "
                f"{self._connect_timeout:g}s: {reason}{last}"
            ) from exc
        self._learn(md)
        log.info("kafka_cluster_reachable", cluster=self.name, brokers=len(md.brokers))

    def _learn(self, md: Any) -> None:
        for topic, meta in md.topics.items():
            if meta.error is None and meta.partitions:
                self.partitions[topic] = len(meta.partitions)

    def probe(self, timeout: float) -> bool:
        """One metadata round trip with the producer: does the cluster answer now?
        Blocking (up to ``timeout``): run it off the event loop."""
        producer = self._producer
        if producer is None:
            return False
        try:
            producer.list_topics(timeout=timeout)
        except Exception:
            return False
        return True

    # --- explicit partitions -------------------------------------------------------

    def check_partition(self, topic: str, partition: int,
                        acks_before_kafka: bool) -> GatewayError | None:
        """Refuse a partition the topic does not have, before any ack.

        Known topic: decided from metadata (refreshed in the background when a
        record names a partition beyond what is known: the topic may have grown).
        Unknown topic: when the ack waits for Kafka, librdkafka itself refuses a
        bad partition first; when it would come from the spool, the record is
        refused with 503 until the metadata is known (one retry per new topic).
        """
        known = self.partitions.get(topic)
        if known is not None and partition < known:
            return None
        self._refresh(topic)
        if known is not None:
            return UnknownPartition(f"topic '{topic}' has {known} partitions; "
                                    f"partition {partition} does not exist",
                                    topic=topic, partition=partition)
        if not acks_before_kafka:
            return None
        return Unavailable(f"partitions of topic '{topic}' not known yet; retry",
                           topic=topic)

    def _refresh(self, topic: str) -> None:
        if topic in self._refreshing or self._loop is None or self._producer is None:
            return
        now = time.monotonic()
        if now - self._refreshed_at.get(topic, -REFRESH_INTERVAL_S) < REFRESH_INTERVAL_S:
            return  # a client repeating a bad partition does not hammer the cluster
        if len(self._refreshed_at) > 10_000:
            self._refreshed_at.clear()
        self._refreshed_at[topic] = now
        self._refreshing.add(topic)
        producer = self._producer

        def fetch() -> None:
            try:
                self._learn(producer.list_topics(topic, timeout=self._connect_timeout))
            except Exception as exc:  # Kafka unreachable: the next record asks again
                log.warning("kafka_metadata_failed", cluster=self.name, topic=topic,
                            reason=str(exc))
            finally:
                self._refreshing.discard(topic)

        self._loop.run_in_executor(None, fetch)

    async def close(self, timeout: float) -> int:
        """Flush with a deadline; fail what is left. Returns the count not delivered."""
        assert self._loop is not None
        self._running = False
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        left = 0
        if self._producer is not None:
            self._drain_backlog()
            left = await self._loop.run_in_executor(None, self._producer.flush, timeout)
            self._dispatch(self._take_reports())
        for record, callback in self._backlog:
            callback(record, None, ShuttingDown("not sent to Kafka before shutdown"))
        left += len(self._backlog)
        self._backlog.clear()
        if left:
            log.warning("kafka_sink_undelivered_at_shutdown", cluster=self.name, records=left)
        log.info("kafka_sink_stopped", cluster=self.name, delivered=self.delivered,
                 failed=self.failed)
        return left

    # --- produce path (event loop) ----------------------------------------------

    def produce(self, record: Record, callback: DeliveryCallback) -> None:
        """Hand one record to librdkafka; ``callback`` runs later on the loop."""
        if self._retiring:  # never ahead of a purged record not yet reported: refuse now
            self._finish(record, callback, None,
                         DeliveryFailed("Kafka producer restarting", retriable=True))
            return
        if self._backlog:
            self._backlog.append((record, callback))
            return
        produced_at = _monotonic()
        if self._produce_one(record, callback, produced_at):
            self._produced(produced_at)

    def produce_many(self, records: list[Record], callback: DeliveryCallback) -> None:
        """``produce`` of each record, in order (an HTTP batch), with one clock read and
        one poll check for all; ``callback`` runs once per record, as for ``produce``."""
        if self._retiring or self._backlog:
            for record in records:
                self.produce(record, callback)
            return
        produced_at = _monotonic()
        for index, record in enumerate(records):
            if not self._produce_one(record, callback, produced_at):  # librdkafka is full
                self._backlog.extend((rest, callback) for rest in records[index + 1:])
                break
        self._produced(produced_at)

    def _produce_one(self, record: Record, callback: DeliveryCallback,
                     produced_at: float) -> bool:
        """Hand ``record`` to librdkafka (or fail it alone); False: its queue is full and
        the record went to the backlog."""
        assert self._producer is not None
        reports = self._reports

        def on_delivery(err: Any, msg: Any) -> None:
            # Runs inside poll() (on the loop) or flush(); that same thread takes the batch.
            reports.append((record, callback, err, msg, produced_at))

        partition = record.partition
        headers: Any = record.headers or None  # the stub wants list[tuple[str, str | bytes]]
        try:
            if headers:
                _check_header_names(headers)
            self._producer.produce(
                record.topic, record.value, record.key,
                -1 if partition is None else partition,  # -1: librdkafka's partitioner
                on_delivery=on_delivery, headers=headers,
            )
        except BufferError:
            self._backlog.append((record, callback))
            return False
        except KafkaException as exc:
            self._finish(record, callback, None, classify(exc.args[0]))
            return True
        except Exception as exc:  # any other refusal fails this record only, never hangs it
            # OverflowError (partition beyond int32), TypeError, UnicodeEncodeError...:
            # the record can never be produced; it must not stay open in the buffer.
            self._finish(record, callback, None, DeliveryFailed(
                f"Kafka client refused the record: {type(exc).__name__}: {exc}",
                retriable=False, kafka_code="invalid_record"))
            return True
        self._handed += 1
        return True

    def _produced(self, produced_at: float) -> None:
        """Records were handed over: make sure a poll will collect their reports soon."""
        if not self._poll_busy:
            self._poll_soon()
        elif not self._poll_eager and produced_at - self._polled_at >= POLL_EAGER_S:
            self._poll_now()

    def _drain_backlog(self) -> None:
        produced_at = _monotonic()
        while self._backlog:
            record, callback = self._backlog.popleft()
            if not self._produce_one(record, callback, produced_at):
                # Put it back at the front: order matters.
                self._backlog.appendleft(self._backlog.pop())
                break
        self._produced(produced_at)

    # --- delivery reports --------------------------------------------------------

    def _poll_soon(self) -> None:
        """Records are in flight: poll every POLL_BUSY_S from now on."""
        self._poll_busy = True
        if self._running and self._loop is not None:
            if self._poll_handle is not None:
                self._poll_handle.cancel()
            self._poll_handle = self._loop.call_later(POLL_BUSY_S, self._poll)

    def _poll_now(self) -> None:
        """Poll at the end of this loop turn instead of at the next timer tick."""
        if self._running and self._loop is not None:
            self._poll_eager = True
            if self._poll_handle is not None:
                self._poll_handle.cancel()
            self._poll_handle = self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        """Serve librdkafka's events on the loop; the reports of one poll are one batch."""
        self._poll_handle = None
        self._poll_eager = False
        self._polled_at = _monotonic()
        if not self._running:
            return
        assert self._loop is not None
        try:
            if self._restart_needed:
                self._restart_producer()
            assert self._producer is not None
            self._producer.poll(0)
            emptied = self._poll_retiring() if self._retiring else []
            if self._reports:
                self._dispatch(self._take_reports())
            for old in emptied:  # after its last reports
                self._retired(old)
        except Exception:  # never let the timer chain die: reports would stop
            log.exception("kafka_poll_failed", cluster=self.name)
        busy = bool(self._handed != self._reported or self._backlog or self._retiring)
        self._poll_busy = busy
        self._poll_handle = self._loop.call_later(POLL_BUSY_S if busy else POLL_IDLE_S,
                                                  self._poll)

    def _restart_producer(self) -> None:
        """Replace a producer that can no longer send (on the loop, from ``_poll``).

        What the old one still holds is purged, and its delivery reports
        (retriable errors) reach the records' callbacks, so the buffer retries or
        spools them.  Until the loop has run the last of those callbacks,
        ``produce()`` refuses at once (retriable): a new record on the new
        producer could otherwise reach Kafka before an older purged one of its
        key is spooled (docs/spool.md, "Order across the two paths").
        """
        self._restart_needed = False
        new = Producer({**self._settings, "error_cb": self._on_error})
        old = self._producer
        if old is not None:
            self._retiring.append(old)  # first: produce() refuses from here on
        self._producer = new
        self.restarts += 1
        log.warning("kafka_producer_restarted", cluster=self.name, restarts=self.restarts)

    def _poll_retiring(self) -> list[Producer]:
        """Purge and poll retired producers; returns those now empty (removed on the loop)."""
        emptied = []
        for old in list(self._retiring):
            old.purge()  # again: a produce() racing the swap may have slipped in
            old.poll(0)
            if len(old) == 0 and old not in self._gone:
                self._gone.add(old)
                emptied.append(old)
        return emptied

    def _retired(self, old: Producer) -> None:
        self._retiring.remove(old)
        self._gone.discard(old)

    def _take_reports(self) -> list[tuple[Record, DeliveryCallback, Any, Any, float]]:
        batch = self._reports[:]
        self._reports.clear()  # the same list: on_delivery closures hold it
        return batch

    def _dispatch(self, batch: list[tuple[Record, DeliveryCallback, Any, Any, float]]) -> None:
        name = self.name
        delivered = 0
        self._reported += len(batch)
        now = _monotonic()
        observe = self.latency.observe
        for record, callback, err, msg, produced_at in batch:
            if err is None:
                delivered += 1
                observe(now - produced_at)
                # record.topic: the topic produced to (msg.topic() would copy it again)
                delivery = Delivery(cluster=name, topic=record.topic,
                                    partition=msg.partition(), offset=msg.offset())
                try:
                    callback(record, delivery, None)
                except Exception:  # a callback bug must not stop other deliveries
                    log.exception("delivery_callback_failed", cluster=name, topic=record.topic)
            else:
                if producer_broken(err):
                    self._restart_needed = True
                self._finish(record, callback, None, classify(err))
        # Counted once per batch; failures count themselves in _finish.
        self.delivered += delivered
        if self._backlog:
            self._drain_backlog()

    def _finish(self, record: Record, callback: DeliveryCallback,
                delivery: Delivery | None, error: GatewayError | None) -> None:
        if error is None:
            self.delivered += 1
        else:
            self.failed += 1
        try:
            callback(record, delivery, error)
        except Exception:  # a callback bug must not stop other deliveries
            log.exception("delivery_callback_failed", cluster=self.name, topic=record.topic)

    def _on_error(self, err: KafkaError) -> None:
        # Called inside poll() on the loop; librdkafka retries transient errors itself.
        if err.fatal():
            self._restart_needed = True
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.all_brokers_down_at = time.monotonic()
        log.warning("kafka_client_error", cluster=self.name, code=err.name(), reason=err.str(),
                    fatal=err.fatal(), at=time.time())


Admit = Callable[[Record], GatewayError | None]


def admission(sinks: dict[str, KafkaSink], max_record_bytes: int,
              acks_before_kafka: Callable[[], bool]) -> Admit:
    """The check between routing and the buffer: refuse what Kafka will always refuse.

    Runs before any ack, so a client hears 413 / 404 (MQTT 5: 0x83) instead of
    an ack for a record that could only end in the dead-letter topic.
    """

    def admit(record: Record) -> GatewayError | None:
        size = record_wire_size(record)
        if size > max_record_bytes:
            return RecordTooLarge(
                f"the Kafka record would be {size} bytes (value, key and headers); "
                f"the limit is {max_record_bytes}", size=size, limit=max_record_bytes)
        if record.partition is not None:
            sink = sinks.get(record.cluster)
            if sink is not None:
                return sink.check_partition(record.topic, record.partition,
                                            acks_before_kafka())
        return None

    return admit
