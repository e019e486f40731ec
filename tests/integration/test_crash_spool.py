"""`kill -9` of `lastmile serve` with the spool on: every PUBACKed message reaches Kafka.

Real QoS 1 publishers (paho-mqtt) keep publishing while Kafka hangs (so acks
come from the spool), the gateway is killed with SIGKILL, Kafka comes back,
the gateway restarts on the same spool directory and replays it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.helpers import Broker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class PahoPublisher:
    """One QoS 1 client publishing numbered messages; remembers which were PUBACKed."""

    def __init__(self, port: int, rate: float = 100.0) -> None:
        self.client_id = f"crash-{uuid.uuid4().hex[:8]}"
        self.port, self.rate = port, rate
        self.mids: dict[int, int] = {}
        self.acked: set[int] = set()
        self.sent = 0
        self.stop = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=paho.MQTTv311)
        self.client.max_inflight_messages_set(100)
        self.client.on_publish = self._on_publish
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # No lock of ours here: paho calls this holding its own lock, and publish() takes
        # that lock too, so sharing one lock with _run would deadlock. set.add is atomic.
        self.acked.add(mid)

    def start(self) -> PahoPublisher:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self.thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            info = self.client.publish(f"bench/{self.client_id}/seq", b"%d" % n, qos=1)
            self.mids[info.mid] = n  # read only after halt(): PUBACKs may come first
            self.sent = n = n + 1
            time.sleep(1.0 / self.rate)

    def halt(self) -> set[int]:
        """Stop publishing; returns the numbers whose PUBACK arrived."""
        self.stop.set()
        self.thread.join(5)
        self.client.loop_stop()
        return {self.mids[m] for m in set(self.acked) if m in self.mids}


def kafka_values(broker: Broker, client_id: str, want: set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    got: list[int] = []
    while time.monotonic() < deadline:
        got = [int(m.value()) for m in broker.read_all("bench")
               if m.key() == client_id.encode()]
        if want <= set(got):
            break
        time.sleep(0.5)
    return got


# PUBACKs each publisher must see before the next step. Past paho's in-flight window
# (100), more PUBACKs while Kafka hangs can only have come from the spool.
WARM = 50
SPOOLED = 300
# Records never time out in librdkafka here (a timeout also sends them to the spool):
# PUBACKs during the hang can only come from the spool taking over after spill_after_ms.
NO_TIMEOUT = {"kafka__clusters__default__message_timeout_ms": 600_000}


def acks_continue(pubs: list[PahoPublisher], more: int, what: str,
                  timeout: float = 60.0) -> None:
    """Wait until every publisher has ``more`` PUBACKs beyond those it has now."""
    base = {id(p): len(p.acked) for p in pubs}
    wait_until(lambda: all(len(p.acked) >= base[id(p)] + more for p in pubs), timeout,
               what=what)


@pytest.mark.timeout(180)
def test_kill9_during_kafka_outage_loses_no_puback(gateway_factory: Any,
                                                   fresh_broker: Broker) -> None:
    proc, ports = gateway_factory(bootstrap=fresh_broker.bootstrap, spool__spill_after_ms=1000,
                                  **NO_TIMEOUT)
    proc.start(("127.0.0.1", ports["mqtt"]))
    pubs = [PahoPublisher(ports["mqtt"]).start() for _ in range(4)]
    acks_continue(pubs, WARM, "the publishers' first PUBACKs")
    fresh_broker.pause()  # Kafka hangs: from now on PUBACKs come from the spool
    acks_continue(pubs, SPOOLED, "PUBACKs from the spool while Kafka hangs")
    proc.kill9()  # while publishers run and librdkafka holds unconfirmed records
    acked = {p.client_id: p.halt() for p in pubs}
    fresh_broker.resume()

    proc.start(("127.0.0.1", ports["mqtt"]))  # same config, same spool directory
    try:
        for client_id, numbers in acked.items():
            got = kafka_values(fresh_broker, client_id, numbers, timeout=40)
            missing = numbers - set(got)
            assert not missing, f"{client_id}: {len(missing)} PUBACKed messages not in Kafka"
    finally:
        proc.stop()
    events = [json.loads(line) for line in proc.log_text().splitlines()
              if line.startswith("{") and '"spool_' in line]
    # One line per start for the normal spool (the high-priority one, high/, logs its own).
    recovered = [e["records"] for e in events if e["event"] == "spool_recovered"
                 and not e["dir"].endswith("/high")]
    assert len(recovered) == 2 and recovered[1] > 0  # the restart really replayed a spool
    assert not [e for e in events if e["event"] == "spool_record_lost_after_ack"]
