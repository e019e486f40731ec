"""End to end: QoS 1 MQTT publishers -> `lastmile serve` (spool on) -> a broker that hangs.

PUBACKs continue from the spool while Kafka is hung; after it comes back every
PUBACKed message is in Kafka and each client's messages are in the order sent.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import Broker
from tests.integration.test_crash_spool import (
    NO_TIMEOUT,
    SPOOLED,
    WARM,
    PahoPublisher,
    acks_continue,
    kafka_values,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(180)
def test_mqtt_publishers_across_a_kafka_hang(gateway_factory: Any, fresh_broker: Broker) -> None:
    proc, ports = gateway_factory(bootstrap=fresh_broker.bootstrap, spool__spill_after_ms=1000,
                                  **NO_TIMEOUT)
    proc.start(("127.0.0.1", ports["mqtt"]))
    try:
        pubs = [PahoPublisher(ports["mqtt"]).start() for _ in range(4)]
        acks_continue(pubs, WARM, "the publishers' first PUBACKs")
        fresh_broker.pause()
        # PUBACKs go on from the spool once Kafka is 1 s late (past paho's window of 100).
        acks_continue(pubs, SPOOLED, "PUBACKs from the spool while Kafka hangs")
        fresh_broker.resume()
        acks_continue(pubs, WARM, "PUBACKs after Kafka is back")
        acked = {p.client_id: p.halt() for p in pubs}
        for client_id, numbers in acked.items():
            got = kafka_values(fresh_broker, client_id, numbers, timeout=40)
            missing = numbers - set(got)
            assert not missing, f"{client_id}: {len(missing)} PUBACKed messages not in Kafka"
            seen: set[int] = set()
            last = -1
            for n in got:
                if n in seen:
                    continue  # a duplicate: at least once allows it, order is about first copies
                assert n > last, f"{client_id}: {n} reached Kafka after {last}"
                seen.add(n)
                last = n
    finally:
        proc.stop()
