"""The Kafka sink: one confluent-kafka Producer per cluster per worker process.

``produce()`` is a C call made on the event loop.  Delivery reports are served
by ``poll()`` on one thread per producer; the thread collects them and hands
them back to the loop in batches (one ``call_soon_threadsafe`` per batch), where
each record's callback runs.  Device connections never reach this module.

Per record, the poll thread runs one small closure that appends a tuple: no
lock, because reports are only ever appended by the thread inside ``poll()`` /
``flush()``, and that same thread takes the batch (``flush`` runs only after
the poll thread has stopped).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from gateway.config import producer_settings
from gateway.config.schema import Cluster
from gateway.errors import DeliveryFailed, GatewayError, ShuttingDown, Unavailable
from gateway.model import Delivery, Record

log = structlog.get_logger("lastmile.kafka")

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
        self._thread: threading.Thread | None = None
        self._running = False
        # Appended by the thread inside poll() / flush(), taken by that same thread.
        self._reports: list[tuple[Record, DeliveryCallback, Any, Any]] = []
        # Records librdkafka's queue could not take yet (BufferError); retried in order.
        self._backlog: deque[tuple[Record, DeliveryCallback]] = deque()
        self.delivered = 0
        self.failed = 0
        self.restarts = 0
        self._restart_needed = False
        # Producers replaced after a fatal error, polled until their queues are empty.
        self._retiring: list[Producer] = []
        self._gone: set[Producer] = set()  # empty, removal from _retiring posted

    @property
    def in_flight(self) -> int:
        """Records handed over and not yet reported (read for metrics, not per record)."""
        producers = [p for p in (self._producer, *self._retiring) if p is not None]
        return len(self._backlog) + sum(len(p) for p in producers)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Create the producer and check the cluster answers metadata in time."""
        self._loop = asyncio.get_running_loop()
        self._producer = Producer({**self._settings, "error_cb": self._on_error})
        await self._loop.run_in_executor(None, self._check_metadata)
        self._running = True
        self._thread = threading.Thread(target=self._poll_forever, name=f"kafka-{self.name}",
                                        daemon=True)
        self._thread.start()
        log.info("kafka_sink_started", cluster=self.name, bootstrap=self.bootstrap)

    def _check_metadata(self) -> None:
        settings: dict[str, Any] = {"bootstrap.servers": self.bootstrap,
                                    "logger": _LibrdkafkaLog(self.name)}
        admin = AdminClient(settings)
        try:
            md = admin.list_topics(timeout=self._connect_timeout)
        except KafkaException as exc:
            raise Unavailable(
                f"Kafka cluster '{self.name}' at {self.bootstrap} did not answer within "
                f"{self._connect_timeout:g}s: {exc.args[0].str() if exc.args else exc}"
            ) from exc
        log.info("kafka_cluster_reachable", cluster=self.name, brokers=len(md.brokers))

    async def close(self, timeout: float) -> int:
        """Flush with a deadline; fail what is left. Returns the count not delivered."""
        assert self._loop is not None
        self._running = False
        if self._thread is not None:
            await self._loop.run_in_executor(None, self._thread.join)
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
        self._produce_one(record, callback)

    def _produce_one(self, record: Record, callback: DeliveryCallback) -> bool:
        assert self._producer is not None
        sink = self

        def on_delivery(err: Any, msg: Any) -> None:
            # Runs on the poll thread, inside poll(); that thread also takes the batch.
            sink._reports.append((record, callback, err, msg))

        partition = record.partition
        headers: Any = record.headers or None  # the stub wants list[tuple[str, str | bytes]]
        try:
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

    def _drain_backlog(self) -> None:
        while self._backlog:
            record, callback = self._backlog.popleft()
            if not self._produce_one(record, callback):
                # Put it back at the front: order matters.
                self._backlog.appendleft(self._backlog.pop())
                return

    # --- delivery reports --------------------------------------------------------

    def _poll_forever(self) -> None:
        assert self._producer is not None and self._loop is not None
        loop = self._loop
        while self._running:
            if self._restart_needed:
                self._restart_producer()
            assert self._producer is not None
            self._producer.poll(0.05)
            emptied = self._poll_retiring()
            batch = self._take_reports()
            if batch or emptied:
                try:
                    loop.call_soon_threadsafe(self._dispatch, batch)
                    for old in emptied:  # after its last reports: FIFO on the loop
                        loop.call_soon_threadsafe(self._retired, old)
                except RuntimeError:  # loop closed during shutdown
                    return

    def _restart_producer(self) -> None:
        """Replace a producer that can no longer send (poll thread only).

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

    def _take_reports(self) -> list[tuple[Record, DeliveryCallback, Any, Any]]:
        batch, self._reports = self._reports, []
        return batch

    def _dispatch(self, batch: list[tuple[Record, DeliveryCallback, Any, Any]]) -> None:
        name = self.name
        delivered = 0
        for record, callback, err, msg in batch:
            if err is None:
                delivered += 1
                delivery = Delivery(cluster=name, topic=msg.topic(),
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
        # Called from the poll thread; librdkafka retries transient errors itself.
        if err.fatal():
            self._restart_needed = True
        log.warning("kafka_client_error", cluster=self.name, code=err.name(), reason=err.str(),
                    fatal=err.fatal(), at=time.time())
