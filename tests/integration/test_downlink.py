"""Kafka -> `lastmile serve` -> real MQTT subscribers (issue #17, docs/downlink.md).

Each test writes its own downlink rules over Kafka topics of its own, starts the
gateway as a process against the session's tansu broker, and checks what paho
subscribers (3.1.1 and 5.0) receive from records a Kafka producer writes.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from confluent_kafka import Producer

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from tests.helpers import Broker, log_events, running, wait_until

pytestmark = pytest.mark.integration

VERSIONS = [paho.MQTTv311, paho.MQTTv5]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def downlink_rules(rules_dir: Path, commands: str, config: str) -> None:
    (rules_dir / "60-downlink.yaml").write_text(f"""
downlink:
  - name: commands
    kafka: {{topic: {commands}}}
    mqtt: {{topic: "cmd/{{key}}", qos: 1}}
  - name: config
    kafka: {{topic: {config}}}
    mqtt: {{topic: "cfg/{{key}}", qos: 2, retain: true}}
""")


@pytest.fixture
def topics(broker: Broker, rules_dir: Path) -> tuple[str, str]:
    commands, config = unique("commands"), unique("device-config")
    broker.create_topic(commands, 2)
    broker.create_topic(config, 1)
    downlink_rules(rules_dir, commands, config)
    return commands, config


@pytest.fixture
def gateway(gateway_factory: Any, topics: tuple[str, str]) -> Any:
    proc, ports = gateway_factory()
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        yield proc, ports["mqtt"]


def produce(broker: Broker, topic: str, key: str, value: bytes | None) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(topic, value=value, key=key.encode())
    assert producer.flush(10) == 0


class Subscriber:
    """A paho client whose messages land in a queue."""

    def __init__(self, port: int, protocol: int, client_id: str | None = None,
                 clean: bool = True, topic_alias_maximum: int = 0) -> None:
        self.messages: queue.Queue[Any] = queue.Queue()
        self.granted: queue.Queue[list[int]] = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or unique("sub"), protocol=protocol,
                                  clean_session=clean if protocol != paho.MQTTv5 else None)
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _props: self.granted.put(
            [c.value for c in codes])
        props = None
        if protocol == paho.MQTTv5 and (not clean or topic_alias_maximum):
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            props = Properties(PacketTypes.CONNECT)
            if not clean:
                props.SessionExpiryInterval = 300
            if topic_alias_maximum:
                props.TopicAliasMaximum = topic_alias_maximum
        kwargs: dict[str, Any] = {}
        if protocol == paho.MQTTv5:
            kwargs = {"clean_start": clean, "properties": props}
        self.client.connect("127.0.0.1", port, **kwargs)
        self.client.loop_start()

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        self.client.subscribe(topic, qos)
        return self.granted.get(timeout=15)

    def next(self, timeout: float = 20) -> Any:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("protocol", VERSIONS)
def test_command_reaches_every_matching_subscription(
        gateway: Any, broker: Broker, topics: tuple[str, str], protocol: int) -> None:
    _, port = gateway
    subs = [Subscriber(port, protocol) for _ in range(3)]
    try:
        for sub, filt, qos in zip(subs, ["cmd/dev-1", "cmd/+", "cmd/#"], [1, 0, 2], strict=True):
            assert sub.subscribe(filt, qos) == [min(qos, 1)]
        produce(broker, topics[0], "dev-1", b"reboot")
        for sub, qos in zip(subs, [1, 0, 1], strict=True):
            msg = sub.next()
            assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("cmd/dev-1", b"reboot",
                                                                     qos, False)
    finally:
        for sub in subs:
            sub.close()


@pytest.mark.parametrize("protocol", VERSIONS)
def test_filter_no_rule_serves_is_refused(gateway: Any, protocol: int) -> None:
    _, port = gateway
    sub = Subscriber(port, protocol)
    try:
        sub.client.subscribe([("cmd/+", 1), ("telemetry/#", 1), ("cfg/dev-1", 2)])
        refused = 0x87 if protocol == paho.MQTTv5 else 0x80
        assert sub.granted.get(timeout=15) == [1, refused, 2]
    finally:
        sub.close()


@pytest.mark.parametrize("protocol", VERSIONS)
def test_retained_delivered_to_new_subscriptions_and_deleted(
        gateway: Any, broker: Broker, topics: tuple[str, str], protocol: int) -> None:
    _, port = gateway
    config = topics[1]
    live = Subscriber(port, protocol)
    subs = [live]

    def late(qos: int) -> list[tuple[str, bytes, bool, int]]:
        """A new subscription's retained messages (they come in one write)."""
        sub = Subscriber(port, protocol)
        subs.append(sub)
        assert sub.subscribe("cfg/+", qos) == [qos]
        got = sorted((m.topic, m.payload, m.retain, m.qos) for m in (sub.next(), sub.next()))
        with pytest.raises(queue.Empty):
            sub.next(timeout=1)
        return got

    try:
        assert live.subscribe("cfg/#", 2) == [2]
        produce(broker, config, "dev-1", b"v1")
        produce(broker, config, "dev-2", b"v2")
        # Forwarded live: retain is 0 (no retain-as-published), QoS min(rule 2, sub 2).
        assert [(m.topic, m.retain, m.qos) for m in (live.next(), live.next())] == [
            ("cfg/dev-1", False, 2), ("cfg/dev-2", False, 2)]
        assert late(1) == [("cfg/dev-1", b"v1", True, 1), ("cfg/dev-2", b"v2", True, 1)]
        produce(broker, config, "dev-1", b"")  # deletes dev-1's retained message
        produce(broker, config, "dev-3", b"v3")
        assert [(m.topic, m.payload) for m in (live.next(), live.next())] == [
            ("cfg/dev-1", b""), ("cfg/dev-3", b"v3")]
        assert late(2) == [("cfg/dev-2", b"v2", True, 2), ("cfg/dev-3", b"v3", True, 2)]
    finally:
        for sub in subs:
            sub.close()


def raw_subscriber(port: int, client_id: str, topic: str) -> socket.socket:
    """A 3.1.1 client that subscribes at QoS 1 and then never reads again."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(encode(p.Connect(client_id=client_id, keep_alive=0, protocol_level=4), 4))
    sock.sendall(encode(p.Subscribe(packet_id=1, subscriptions=[p.Subscription(topic, 1)]), 4))
    buf = b""
    while True:
        buf += sock.recv(4096)
        packets, _ = decode_packets(buf, 4, 1 << 20)
        if any(isinstance(pk, p.Suback) for pk in packets):
            return sock


def test_slow_subscriber_does_not_delay_another(
        gateway_factory: Any, broker: Broker, topics: tuple[str, str]) -> None:
    """A client that stops reading fills its own queue (bounded, logged); a reading client
    on the same filter gets every message, in order."""
    proc, ports = gateway_factory(limits__downlink_queue=50)
    rounds, per_round, size = 8, 25, 10_000  # 2 MB: far past what the stuck client holds
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        stuck_id = unique("stuck")
        stuck = raw_subscriber(ports["mqtt"], stuck_id, "cmd/#")
        fast = Subscriber(ports["mqtt"], paho.MQTTv5)
        try:
            assert fast.subscribe("cmd/#", 1) == [1]
            producer = Producer({"bootstrap.servers": broker.bootstrap})
            got: list[int] = []
            for r in range(rounds):  # rounds below the queue bound: the fast one drops nothing
                for n in range(r * per_round, (r + 1) * per_round):
                    producer.produce(topics[0], value=n.to_bytes(4, "big") * (size // 4),
                                     key=b"dev-1")
                assert producer.flush(30) == 0
                got += [int.from_bytes(fast.next(timeout=30).payload[:4], "big")
                        for _ in range(per_round)]
            assert got == list(range(rounds * per_round))
            full = wait_until(lambda: log_events(proc.log_text(), "downlink_queue_full"),
                              what="a full queue logged")
            assert [(e["client_id"], e["policy"], e["limit"]) for e in full] == [
                (stuck_id, "drop-oldest", 50)]
        finally:
            fast.close()
            stuck.close()


class RawClient:
    """A client on a socket (3.1.1 unless ``version`` 5), acknowledging only when told to."""

    def __init__(self, port: int, client_id: str, clean: bool, version: int = 4,
                 properties: Any = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        self.version = version
        self.early: list[Any] = []  # decoded, not yet asked for
        self.sock.sendall(encode(p.Connect(client_id=client_id, keep_alive=0,
                                           clean_start=clean, protocol_level=version,
                                           properties=properties), version))
        assert isinstance(self.read(1)[0], p.Connack)

    def close(self) -> None:
        self.sock.close()

    def read(self, count: int) -> list[Any]:
        """The next ``count`` packets; any that came with them wait for the next read."""
        got = self.early
        while len(got) < count:
            packets, used = decode_packets(self.buf, self.version, 1 << 20)
            self.buf = self.buf[used:]
            got += packets
            if len(got) < count:
                data = self.sock.recv(65536)
                assert data, f"closed after {got}"
                self.buf += data
        self.early = got[count:]
        return got[:count]

    def send(self, packet: Any) -> None:
        self.sock.sendall(encode(packet, self.version))


def test_restart_loses_no_unacknowledged_command(
        gateway_factory: Any, broker: Broker, topics: tuple[str, str]) -> None:
    """A persistent session's command not acknowledged before a restart, and one written
    while the gateway was down, both arrive after it is back (offsets held, subscriptions
    kept in the state file)."""
    commands = topics[0]
    proc, ports = gateway_factory()
    port = ports["mqtt"]
    cid = unique("dev")
    proc.start(("127.0.0.1", port))
    try:
        client = RawClient(port, cid, clean=False)
        client.send(p.Subscribe(packet_id=1, subscriptions=[p.Subscription("cmd/dev-9", 1)]))
        assert client.read(1)[0].reason_codes == [1]
        produce(broker, commands, "dev-9", b"one")
        first = client.read(1)[0]
        assert (first.topic, first.payload, first.qos) == ("cmd/dev-9", b"one", 1)  # no PUBACK
        assert proc.stop() == 0
        client.sock.close()
        produce(broker, commands, "dev-9", b"two")  # while the gateway is down
        proc.start(("127.0.0.1", port))
        again = RawClient(port, cid, clean=False)  # no SUBSCRIBE: the session has it
        got = again.read(2)
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            ("cmd/dev-9", b"one", 1), ("cmd/dev-9", b"two", 1)]
        for message in got:
            again.send(p.Puback(packet_id=message.packet_id))
        again.sock.close()
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


def will_connect(port: int, client_id: str, keep_alive: int, version: int = 4,
                 delay: int | None = None) -> socket.socket:
    props = None
    if version == 5:
        from gateway.protocols.mqtt.properties import Properties
        props = Properties(will_delay_interval=delay) if delay else None
    will = p.Will(topic=f"bench/{client_id}/status", payload=b"offline", qos=1,
                  properties=props)
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    connect_props = None
    if version == 5:
        from gateway.protocols.mqtt.properties import Properties
        connect_props = Properties(session_expiry_interval=60)
    sock.sendall(encode(p.Connect(client_id=client_id, keep_alive=keep_alive, will=will,
                                  protocol_level=version, properties=connect_props), version))
    packets, _ = decode_packets(sock.recv(4096), version, 1 << 20)
    assert isinstance(packets[0], p.Connack) and packets[0].reason_code == 0
    return sock


def wait_for_record(broker: Broker, topic: str, key: bytes) -> list[Any]:
    return wait_until(lambda: [m for m in broker.read_all(topic) if m.key() == key],
                      what=f"a record keyed {key!r} in {topic}")


@pytest.mark.parametrize("version", [4, 5])
def test_will_published_on_socket_loss_and_keep_alive_timeout(
        gateway_factory: Any, broker: Broker, version: int) -> None:
    """Wills go through the uplink rules (the shipped bench/# rule keys by client id)."""
    proc, ports = gateway_factory(downlink__wills=True)
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        lost, silent, graceful = (unique(f"will{version}") for _ in range(3))
        sock = will_connect(ports["mqtt"], lost, keep_alive=60, version=version)
        sock.close()  # no DISCONNECT
        quiet = will_connect(ports["mqtt"], silent, keep_alive=1, version=version)  # no PINGREQ
        polite = will_connect(ports["mqtt"], graceful, keep_alive=60, version=version)
        polite.sendall(encode(p.Disconnect(), version))
        polite.close()
        for client in (lost, silent):
            got = wait_for_record(broker, "bench", client.encode())
            assert [m.value() for m in got] == [b"offline"]
        quiet.close()
        # The graceful client's will is never sent: its DISCONNECT came before the others'
        # connections ended, and the log says which wills were published.
        assert not [m for m in broker.read_all("bench") if m.key() == graceful.encode()]


def test_will_delay_held_then_sent_and_cancelled_by_reconnect(
        gateway_factory: Any, broker: Broker) -> None:
    proc, ports = gateway_factory(downlink__wills=True)
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        delayed, back = unique("delayed"), unique("back")
        will_connect(ports["mqtt"], delayed, keep_alive=60, version=5, delay=2).close()
        will_connect(ports["mqtt"], back, keep_alive=60, version=5, delay=2).close()
        again = will_connect(ports["mqtt"], back, keep_alive=60, version=5)  # within the delay
        got = wait_for_record(broker, "bench", delayed.encode())
        assert [m.value() for m in got] == [b"offline"]
        # ``back`` lost its connection at the same moment as ``delayed``, whose will is out
        # now that its delay ran: ``back``'s was cancelled by the reconnect.
        assert not [m for m in broker.read_all("bench") if m.key() == back.encode()]
        again.sendall(encode(p.Disconnect(), 5))
        again.close()


def test_presence_events_keyed_by_client_id(gateway_factory: Any, broker: Broker) -> None:
    import json

    topic = unique("presence")
    broker.create_topic(topic)
    proc, ports = gateway_factory(downlink__presence_topic=topic)
    port = ports["mqtt"]
    with running(proc, ("127.0.0.1", port)):
        polite, silent, taken = unique("polite"), unique("silent"), unique("taken")
        client = RawClient(port, polite, clean=True)
        client.send(p.Disconnect())
        client.sock.close()
        quiet = will_connect(port, silent, keep_alive=1)  # no PINGREQ: keep-alive timeout
        first = RawClient(port, taken, clean=True)
        second = RawClient(port, taken, clean=True)  # takes the session over

        def events(cid: str, count: int) -> list[dict[str, Any]]:
            got = wait_until(lambda: len(found := [json.loads(m.value()) for m in
                                                   broker.read_all(topic)
                                                   if m.key() == cid.encode()]) >= count
                             and found, what=f"{count} presence events of {cid}")
            return list(got)

        assert [e["event"] for e in events(polite, 2)] == ["connect", "disconnect"]
        assert [e["event"] for e in events(silent, 2)] == ["connect", "keep_alive_timeout"]
        assert [e["event"] for e in events(taken, 3)] == ["connect", "takeover", "connect"]
        end = events(polite, 2)[1]
        assert (end["client_id"], end["version"], end["reason_code"]) == (polite, 4, 0)
        assert end["listener"] == f"127.0.0.1:{port}" and end["peer"].startswith("127.0.0.1:")
        for sock in (quiet, first.sock, second.sock):
            sock.close()


@pytest.fixture
def sample_port(gateway_factory: Any, rules_dir: Path) -> Any:
    """The gateway with the shipped broker-on-kafka sample as its whole rule set."""
    from tests.helpers import ROOT

    for path in rules_dir.glob("*.yaml"):
        path.unlink()
    sample = ROOT / "bridge-rules" / "samples" / "broker-on-kafka.yaml"
    (rules_dir / sample.name).write_text(sample.read_text())
    proc, ports = gateway_factory()
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        yield ports["mqtt"]


def test_broker_on_kafka_sample(sample_port: int) -> None:
    """Device to device through Kafka with the shipped sample as the whole rule set."""
    from paho.mqtt.subscribeoptions import SubscribeOptions

    port = sample_port
    room = unique("room")
    reader = Subscriber(port, paho.MQTTv5)
    talker = Subscriber(port, paho.MQTTv5)  # subscribed with No Local
    publisher = Subscriber(port, paho.MQTTv311)
    try:
        assert reader.subscribe(f"{room}/+/temp", 1) == [1]
        talker.client.subscribe(f"{room}/#", options=SubscribeOptions(qos=2, noLocal=True))
        assert talker.granted.get(timeout=15) == [2]
        publisher.client.publish(f"{room}/1/temp", b"21", qos=1).wait_for_publish(15)
        got = reader.next()
        assert (got.topic, got.payload, got.qos) == (f"{room}/1/temp", b"21", 1)
        assert talker.next().payload == b"21"
        talker.client.publish(f"{room}/2/temp", b"22", qos=0).wait_for_publish(15)
        got = reader.next()  # at the QoS it was published with, below the subscription's
        assert (got.payload, got.qos) == (b"22", 0)
        with pytest.raises(queue.Empty):
            talker.next(timeout=1)  # its own message: No Local
    finally:
        for client in (reader, talker, publisher):
            client.close()


def publish_props(**values: Any) -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def test_mqtt5_properties_through_kafka_and_back(sample_port: int) -> None:
    """User properties, content type, payload format, response topic and correlation
    data ride the record's mqtt-* headers back onto the PUBLISH of MQTT 5 subscribers."""
    topic = unique("req") + "/a"
    v5, v3 = Subscriber(sample_port, paho.MQTTv5), Subscriber(sample_port, paho.MQTTv311)
    publisher = Subscriber(sample_port, paho.MQTTv5)
    try:
        assert v5.subscribe(topic, 1) == [1] and v3.subscribe(topic, 1) == [1]
        props = publish_props(UserProperty=[("a", "2"), ("c", "3"), ("a", "1")],
                              ContentType="text/plain", PayloadFormatIndicator=1,
                              ResponseTopic=topic + "/reply", CorrelationData=b"\x00id")
        publisher.client.publish(topic, b"hello", qos=1, properties=props).wait_for_publish(15)
        got = v5.next()
        assert got.payload == b"hello"
        assert got.properties.UserProperty == [("a", "2"), ("c", "3"), ("a", "1")]
        assert (got.properties.ContentType, got.properties.PayloadFormatIndicator,
                got.properties.ResponseTopic, got.properties.CorrelationData) == (
            "text/plain", 1, topic + "/reply", b"\x00id")
        assert v3.next().payload == b"hello"  # 3.1.1: the same message, no properties
    finally:
        for client in (v5, v3, publisher):
            client.close()


@pytest.mark.parametrize("protocol", VERSIONS)
def test_retained_publishes_through_kafka(sample_port: int, protocol: int) -> None:
    """A retained PUBLISH (mqtt-retain: 1, rule retain: header) reaches later subscribers
    with the retain flag; an empty retained PUBLISH deletes it."""
    topic = unique("state") + "/lamp"
    live = Subscriber(sample_port, protocol)
    publisher = Subscriber(sample_port, protocol)
    clients = [live, publisher]
    try:
        assert live.subscribe(topic, 1) == [1]
        publisher.client.publish(topic, b"on", qos=1, retain=True).wait_for_publish(15)
        got = live.next()
        assert (got.payload, got.retain) == (b"on", False)  # live: retain 0
        late = Subscriber(sample_port, protocol)
        clients.append(late)
        assert late.subscribe(topic, 1) == [1]
        got = late.next()
        assert (got.topic, got.payload, got.qos, got.retain) == (topic, b"on", 1, True)
        # A non-retained publish leaves the retained message alone.
        publisher.client.publish(topic, b"blink", qos=1).wait_for_publish(15)
        assert live.next().payload == b"blink"
        publisher.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(15)
        assert live.next().payload == b""
        after = Subscriber(sample_port, protocol)
        clients.append(after)
        assert after.subscribe(topic, 1) == [1]
        publisher.client.publish(topic, b"marker", qos=1).wait_for_publish(15)
        got = after.next()  # nothing retained came before it
        assert (got.payload, got.retain) == (b"marker", False)
    finally:
        for client in clients:
            client.close()


def test_queued_message_expires_while_offline(sample_port: int) -> None:
    """MQTT 5 message expiry counts from the record's timestamp: a queued message past
    it is dropped; the other leaves with what remains of its interval."""
    topic = unique("expiry") + "/t"
    cid = unique("offline")
    sub = Subscriber(sample_port, paho.MQTTv5, client_id=cid, clean=False)
    assert sub.subscribe(topic, 2) == [2]
    sub.close()
    publisher = Subscriber(sample_port, paho.MQTTv5)
    try:
        publisher.client.publish(topic, b"expire", qos=1, properties=publish_props(
            MessageExpiryInterval=1)).wait_for_publish(15)
        publisher.client.publish(topic, b"keep", qos=2, properties=publish_props(
            MessageExpiryInterval=60)).wait_for_publish(15)
        published = time.time()
    finally:
        publisher.close()
    # Waiting here is the point of the test (the interval must pass), not its verdict.
    wait_until(lambda: time.time() > published + 1.5, what="the 1 s expiry to pass")
    back = Subscriber(sample_port, paho.MQTTv5, client_id=cid, clean=False)
    try:
        got = back.next()  # "expire" was queued first: it would come first
        assert got.payload == b"keep"
        assert 0 < got.properties.MessageExpiryInterval < 60
    finally:
        back.close()


def test_samples_are_not_loaded_by_default() -> None:
    from gateway.routing import load_rules
    from tests.helpers import ROOT

    assert len(load_rules(str(ROOT / "bridge-rules")).downlink) == 0
    sample = load_rules(str(ROOT / "bridge-rules" / "samples"))
    assert len(sample.downlink) == 1


def test_receive_maximum_honoured(gateway: Any, broker: Broker, topics: tuple[str, str]) -> None:
    from gateway.protocols.mqtt.properties import Properties

    _, port = gateway
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(encode(p.Connect(client_id=unique("rm"), protocol_level=5,
                                  properties=Properties(receive_maximum=2)), 5))
    sock.sendall(encode(p.Subscribe(packet_id=1, subscriptions=[p.Subscription("cmd/rm", 1)]), 5))
    buf = b""

    def read(count: int) -> list[Any]:
        nonlocal buf
        got: list[Any] = []
        while len(got) < count:
            packets, used = decode_packets(buf, 5, 1 << 20)
            buf = buf[used:]
            got += [pk for pk in packets if isinstance(pk, p.Publish)]
            if len(got) < count:
                buf += sock.recv(65536)
        return got

    for n in range(4):
        produce(broker, topics[0], "rm", str(n).encode())
    first = read(2)
    assert [m.payload for m in first] == [b"0", b"1"]
    sock.settimeout(1.0)
    with pytest.raises(TimeoutError):
        read(1)  # the window is full until a PUBACK
    sock.settimeout(20)
    sock.sendall(encode(p.Puback(packet_id=first[0].packet_id), 5))
    assert [m.payload for m in read(1)] == [b"2"]
    sock.close()


@pytest.mark.parametrize("protocol", VERSIONS)
def test_offline_messages_delivered_on_reconnect(
        gateway: Any, broker: Broker, topics: tuple[str, str], protocol: int) -> None:
    _, port = gateway
    cid = unique("persistent")
    sub = Subscriber(port, protocol, client_id=cid, clean=False)
    assert sub.subscribe("cmd/+", 1) == [1]
    sub.close()  # a normal DISCONNECT: the session stays (expiry 300 s / clean session 0)
    for n in range(3):
        produce(broker, topics[0], "dev-7", f"while-away-{n}".encode())
    back = Subscriber(port, protocol, client_id=cid, clean=False)  # no SUBSCRIBE
    try:
        got = [back.next() for _ in range(3)]
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            ("cmd/dev-7", f"while-away-{n}".encode(), 1) for n in range(3)]
    finally:
        back.close()


def test_subscription_identifiers_unsubscribe_and_shared(
        gateway: Any, broker: Broker, topics: tuple[str, str]) -> None:
    """MQTT 5: overlapping subscriptions give one message with both identifiers; an
    UNSUBSCRIBE answers 0x00 / 0x11; a shared subscription's members take turns."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    _, port = gateway
    commands = topics[0]
    sub = Subscriber(port, paho.MQTTv5)
    members = [Subscriber(port, paho.MQTTv5) for _ in range(2)]
    unsubacks: queue.Queue[list[int]] = queue.Queue()
    sub.client.on_unsubscribe = lambda _c, _u, _mid, codes, _p: unsubacks.put(
        [c.value for c in codes])
    try:
        for ident, filt in ((3, "cmd/+"), (9, "cmd/#")):
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = ident
            sub.client.subscribe(filt, 1, properties=props)
            assert sub.granted.get(timeout=15) == [1]
        for member in members:
            assert member.subscribe("$share/workers/cmd/#", 1) == [1]
        for n in range(4):
            produce(broker, commands, "dev-1", f"job-{n}".encode())
        got = [sub.next() for _ in range(4)]
        assert [m.payload for m in got] == [f"job-{n}".encode() for n in range(4)]
        assert sorted(got[0].properties.SubscriptionIdentifier) == [3, 9]
        shares = [sorted(member.next().payload for _ in range(2)) for member in members]
        assert sorted(shares[0] + shares[1]) == [f"job-{n}".encode() for n in range(4)]
        sub.client.unsubscribe(["cmd/#", "cmd/nothing"])
        assert unsubacks.get(timeout=15) == [0x00, 0x11]
        produce(broker, commands, "dev-1", b"after")
        last = sub.next()
        assert (last.payload, last.properties.SubscriptionIdentifier) == (b"after", [3])
    finally:
        for client in (sub, *members):
            client.close()


def test_every_worker_serves_its_subscribers(
        gateway_factory: Any, broker: Broker, topics: tuple[str, str]) -> None:
    """workers: 2: each worker has its own consumer, so a subscriber on either gets it."""
    from tests.helpers import child_pids, one_per_worker

    proc, ports = gateway_factory(workers=2)
    port = ports["mqtt"]
    with running(proc, ("127.0.0.1", port)):
        pids = wait_until(lambda: len(found := child_pids(proc.proc.pid)) == 2 and found,
                          what="two workers")
        clients = one_per_worker(lambda n: RawClient(port, unique(f"w{n}"), clean=True), pids)
        try:
            for client in clients.values():
                client.send(p.Subscribe(packet_id=1,
                                        subscriptions=[p.Subscription("cmd/+", 1)]))
                assert client.read(1)[0].reason_codes == [1]
            produce(broker, topics[0], "all", b"to-everyone")
            for client in clients.values():
                got = client.read(1)[0]
                assert (got.topic, got.payload) == ("cmd/all", b"to-everyone")
        finally:
            for client in clients.values():
                client.sock.close()


def test_outgoing_topic_aliases_on_the_wire(
        gateway: Any, broker: Broker, topics: tuple[str, str]) -> None:
    """MQTT 5 client with Topic Alias Maximum 1: the first PUBLISH of a topic has topic and
    alias, the next ones the alias only; a new topic takes the alias over with its topic;
    a reconnect starts with none (the resent message has its full topic); a client that
    announced no maximum gets no alias."""
    from gateway.protocols.mqtt.properties import Properties

    _, port = gateway
    cid = unique("alias")
    keep = Properties(topic_alias_maximum=1, session_expiry_interval=300)
    client = RawClient(port, cid, clean=True, version=5, properties=keep)
    plain = RawClient(port, unique("noalias"), clean=True, version=5)
    try:
        for c in (client, plain):
            c.send(p.Subscribe(packet_id=1, subscriptions=[p.Subscription("cmd/+", 1)]))
            assert c.read(1)[0].reason_codes == [1]

        def wire(c: RawClient, key: str, value: bytes) -> tuple[str, int | None, bytes]:
            produce(broker, topics[0], key, value)
            got = c.read(1)[0]
            assert isinstance(got, p.Publish)
            if c is client and value != b"unacked":
                c.send(p.Puback(packet_id=got.packet_id))
            alias = got.properties.topic_alias if got.properties is not None else None
            return got.topic, alias, got.payload

        assert wire(client, "a", b"1") == ("cmd/a", 1, b"1")
        assert wire(client, "a", b"2") == ("", 1, b"2")
        assert wire(client, "b", b"3") == ("cmd/b", 1, b"3")  # the only alias, taken over
        assert wire(client, "b", b"4") == ("", 1, b"4")
        produce(broker, topics[0], "b", b"unacked")
        got = client.read(1)[0]
        assert (got.topic, got.properties.topic_alias, got.payload) == ("", 1, b"unacked")
        client.close()
        again = RawClient(port, cid, clean=False, version=5, properties=keep)
        client = again
        resent = again.read(1)[0]
        assert (resent.topic, resent.dup, resent.payload) == ("cmd/b", True, b"unacked")
        assert resent.properties is None or resent.properties.topic_alias is None
        again.send(p.Puback(packet_id=resent.packet_id))
        assert wire(again, "b", b"5") == ("cmd/b", 1, b"5")  # the new connection knew none
        seen = plain.read(6)
        assert [(pk.topic, pk.payload) for pk in seen] == [
            (f"cmd/{k}", v) for k, v in (("a", b"1"), ("a", b"2"), ("b", b"3"), ("b", b"4"),
                                         ("b", b"unacked"), ("b", b"5"))]
        assert all(pk.properties is None or pk.properties.topic_alias is None for pk in seen)
    finally:
        client.close()
        plain.close()


def test_paho_v5_subscriber_gets_aliases_it_can_resolve(
        gateway: Any, broker: Broker, topics: tuple[str, str]) -> None:
    """paho-mqtt 2.2 hands aliased PUBLISHes to on_message as they are (empty topic, the
    alias in the properties): resolved here as a client would, every topic comes out right
    and no alias exceeds the maximum the client announced."""
    _, port = gateway
    sub = Subscriber(port, paho.MQTTv5, topic_alias_maximum=2)
    try:
        assert sub.subscribe("cmd/#", 1) == [1]
        keys = ["k1", "k1", "k2", "k1", "k3", "k2", "k3", "k3", "k1"]
        known: dict[int, str] = {}
        resolved = []
        aliased = 0
        for n, key in enumerate(keys):
            produce(broker, topics[0], key, str(n).encode())  # one at a time: in order
            msg = sub.next()
            alias = getattr(msg.properties, "TopicAlias", None)
            assert alias is not None and 1 <= alias <= 2
            if msg.topic:
                known[alias] = msg.topic
            else:
                aliased += 1
            resolved.append((known[alias], msg.payload))
        assert resolved == [(f"cmd/{k}", str(n).encode()) for n, k in enumerate(keys)]
        assert aliased >= 3  # k1 twice in a row, k3 three times in a row
    finally:
        sub.close()


def test_consumer_lag_measured_while_behind_then_zero(
        broker: Broker, rules_dir: Path) -> None:
    """A real consumer against tansu, the loop held (it takes no batch, so the poll thread
    stops reading): records produced meanwhile show as lag, in /metrics' gauge too; once
    the loop runs again the consumer reads them and the lag is 0."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from gateway.downlink.service import Downlink, DownlinkConsumer, consumer_settings
    from gateway.observability.metrics import Pump
    from gateway.routing import load_rules

    commands = unique("lag")
    broker.create_topic(commands, 1)
    downlink_rules(rules_dir, commands, unique("unused"))
    rules = load_rules(rules_dir).downlink
    producer = Producer({"bootstrap.servers": broker.bootstrap})

    def put(n: int) -> None:
        for i in range(n):
            producer.produce(commands, value=str(i).encode(), key=b"dev-1")
        assert producer.flush(10) == 0

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("lastmile_downlink_consumer_lag", {
            "cluster": "default", "topic": commands, "partition": "0"})

    async def main() -> None:
        service = Downlink(lambda: rules)
        consumer = DownlinkConsumer(
            "default", consumer_settings(broker.bootstrap, {}, unique("lastmile-lag")),
            frozenset({commands}), frozenset(), service.on_batch, max_batches=1)
        service.consumers.append(consumer)
        pump = Pump(SimpleNamespace(worker_id=0, sinks={}, mqtt=SimpleNamespace(  # type: ignore[arg-type]
            lifecycle=None, downlink=service)))
        await consumer.start()
        try:
            # The loop is held from here: batch 1 waits for it, batch 2 for the semaphore.
            put(1)
            wait_until(lambda: consumer.consumed == 1, what="the first batch read")
            put(1)
            wait_until(lambda: consumer.consumed == 2, what="the second batch read")
            put(5)
            wait_until(lambda: consumer.lag.get((commands, 0)) == 5, what="lag 5")
            pump._downlink()
            assert gauge() == 5
            assert service.records == 0  # nothing handed to the loop yet
            await wait_async(lambda: service.records == 7 and consumer.lag.get((commands, 0))
                             == 0)
            pump._downlink()
            assert gauge() == 0
        finally:
            await consumer.close({})

    asyncio.run(main())


async def wait_async(check: Any, timeout: float = 30) -> None:
    """``wait_until`` for a condition the event loop must run to reach."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_consumer_lag_in_metrics_after_records_written_before_start(
        gateway_factory: Any, broker: Broker, topics: tuple[str, str]) -> None:
    """Records written before the gateway starts are read at its start: /metrics has the
    lag of each partition of the downlink topics, 0 once they are read."""
    import re
    import urllib.request

    commands = topics[0]
    for n in range(6):
        produce(broker, commands, f"dev-{n}", b"early")
    proc, ports = gateway_factory()
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        url = f"http://127.0.0.1:{ports['metrics']}/metrics"

        def lags() -> dict[str, float] | None:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
            found = {m[0]: float(m[1]) for m in re.findall(
                rf'^lastmile_downlink_consumer_lag{{[^}}]*partition="(\d)",topic="{commands}"'
                r'[^}]*} (\S+)$', text, re.MULTILINE)}
            read = re.search(r'^lastmile_downlink_records_total{cluster="default"} (\S+)$',
                             text, re.MULTILINE)
            done = read is not None and float(read[1]) >= 6
            return found if done and len(found) == 2 and not any(found.values()) else None

        assert wait_until(lags, what="both partitions at lag 0") == {"0": 0.0, "1": 0.0}


def test_subscribe_during_the_retained_replay_gets_every_topic_newest_once(
        gateway_factory: Any, broker: Broker, topics: tuple[str, str]) -> None:
    """Many retained records in Kafka (several per topic, some deleted); a subscriber
    that subscribes as soon as the gateway listens gets each topic's newest value once,
    retained, and a live message after them: at a first start (the topic's history) and
    after a restart (the replay up to the committed position)."""
    config = topics[1]
    keys = 1500
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 50})
    for round_ in range(2):
        for k in range(keys):
            producer.produce(config, key=f"d{k}".encode(),
                             value=f"v{round_}-{k}-".encode().ljust(2000, b"x"))
    for k in range(0, keys, 10):
        producer.produce(config, key=f"d{k}".encode(), value=b"")  # deleted
    assert producer.flush(30) == 0
    # tansu answers a ListOffsets (latest) with the last batch's base offset + 1: a last
    # batch of one record makes it the partition's true end.
    producer.produce(config, key=b"last", value=b"last")
    assert producer.flush(30) == 0
    want = {f"cfg/d{k}": f"v1-{k}-".encode().ljust(2000, b"x") for k in range(keys) if k % 10}
    want["cfg/last"] = b"last"

    for start in range(2):  # a first start, then a restart (the committed position)
        proc, ports = gateway_factory(limits__downlink_queue=4 * keys)  # all of them queue
        with running(proc, ("127.0.0.1", ports["mqtt"])):
            client = RawClient(ports["mqtt"], unique("early"), clean=True)
            try:
                client.send(p.Subscribe(packet_id=1,
                                        subscriptions=[p.Subscription("cfg/#", 1)]))
                assert client.read(1)[0].reason_codes == [1]
                got: list[tuple[str, bytes, bool]] = []
                while len(got) < len(want):
                    pk = client.read(1)[0]
                    client.send(p.Puback(packet_id=pk.packet_id))
                    got.append((pk.topic, pk.payload, pk.retain))
                assert sorted(got) == sorted((t, v, True) for t, v in want.items())
                produce(broker, config, f"live-{start}", b"live")
                pk = client.read(1)[0]  # nothing else came before it
                assert (pk.topic, pk.payload, pk.retain) == (f"cfg/live-{start}", b"live", False)
                client.send(p.Puback(packet_id=pk.packet_id))
                want[f"cfg/live-{start}"] = b"live"
            finally:
                client.close()
            assert proc.stop() == 0


def test_connack_says_subscriptions_are_served(gateway: Any) -> None:
    """With downlink rules an MQTT 5 CONNACK must not tell the client that wildcard,
    identified or shared subscriptions are unavailable (absent means available,
    MQTT 5 3.2.2.3.11-13): a compliant client would believe it and not use them."""
    from gateway.protocols.mqtt.properties import Properties

    _proc, port = gateway
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        sock.sendall(encode(p.Connect(client_id=unique("caps"), protocol_level=5,
                                      properties=Properties()), 5))
        packets, _ = decode_packets(sock.recv(4096), 5, 1 << 20)
    finally:
        sock.close()
    connack = packets[0]
    assert isinstance(connack, p.Connack) and connack.reason_code == 0
    props = connack.properties or Properties()
    assert props.wildcard_subscription_available in (None, 1)
    assert props.subscription_identifier_available in (None, 1)
    assert props.shared_subscription_available in (None, 1)
