"""Sequence stamps end to end (issue 14, docs/rules.md "Sequence stamps").

Real paho clients (MQTT 3.1.1 and 5) publish QoS 1 through ``lastmile serve`` to the
tansu broker under a rule with ``kafka.sequence: true``; the records read back carry
``lastmile-client-id``, ``lastmile-session`` and ``lastmile-seq``: strictly increasing
per client within a session, continued by a resumed session (clean session 0 / clean
start 0 with an expiry), restarted at 1 under a new session id by a clean start.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from tests.helpers import Broker, running

pytestmark = pytest.mark.integration


def stamp_rule(rules_dir: Path, topic: str) -> None:
    # 01-: before the shipped rules (first match wins).
    (rules_dir / "01-seq.yaml").write_text(
        "rules:\n"
        f'  - {{name: seq-test, match: "seq/#", kafka: {{topic: {topic}, sequence: true}}}}\n')


def publish_phase(port: int, client_id: str, version: int, clean: bool, payloads: list[bytes],
                  ) -> bool:
    """Connect, publish ``payloads`` QoS 1 waiting for every PUBACK, disconnect.

    Returns the CONNACK's session present flag.
    """
    proto = paho.MQTTv5 if version == 5 else paho.MQTTv311
    kwargs: dict[str, Any] = {} if version == 5 else {"clean_session": clean}
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=proto, **kwargs)
    flags: dict[str, bool] = {}
    client.on_connect = lambda c, u, f, rc, props: flags.update(present=f.session_present)
    if version == 5:
        props = PahoProperties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        client.connect("127.0.0.1", port, clean_start=clean, properties=props)
    else:
        client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for payload in payloads:
            info = client.publish(f"seq/{client_id}", payload, qos=1)
            info.wait_for_publish(30)
            assert info.is_published(), f"{client_id}: no PUBACK for {payload!r}"
    finally:
        client.disconnect()
        client.loop_stop()
    return flags["present"]


def stamps(msg: Any) -> dict[str, str]:
    return {n: v.decode() for n, v in msg.headers() or [] if n.startswith("lastmile-")}


@pytest.mark.timeout(120)
def test_seq_per_client_continues_on_resume_restarts_on_clean_start(
        gateway_factory: Any, rules_dir: Path, broker: Broker) -> None:
    topic = f"seq.{uuid.uuid4().hex[:8]}"
    stamp_rule(rules_dir, topic)
    proc, ports = gateway_factory()
    clients = {f"seq-v{v}-{uuid.uuid4().hex[:6]}": v for v in (4, 5)}
    phases = [(False, 20), (False, 10), (True, 5)]  # (clean, count): new, resumed, clean
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        for phase, (clean, count) in enumerate(phases):
            for cid, version in clients.items():
                present = publish_phase(ports["mqtt"], cid, version, clean,
                                        [b"%d:%d" % (phase, i) for i in range(count)])
                assert present == (phase == 1), (cid, phase)
        got = broker.read(topic, 2 * 35, timeout=30)
    assert len(got) == 2 * 35
    for cid in clients:
        mine = [(m.value().decode(), stamps(m)) for m in got if m.key() == cid.encode()]
        assert len(mine) == 35
        assert all(s["lastmile-client-id"] == cid for _, s in mine)
        sessions = [s["lastmile-session"] for _, s in mine]
        seqs = [int(s["lastmile-seq"]) for _, s in mine]
        # New session and its resumption: one session id, 1..30 in order.
        assert len(set(sessions[:30])) == 1, cid
        assert seqs[:30] == list(range(1, 31)), (cid, seqs)
        assert [v for v, _ in mine[:30]] == [f"{p}:{i}" for p, n in ((0, 20), (1, 10))
                                             for i in range(n)]
        # Clean start: a new session id, counting from 1 again.
        assert len(set(sessions[30:])) == 1 and sessions[30] != sessions[0], cid
        assert seqs[30:] == [1, 2, 3, 4, 5], (cid, seqs)
    # Two clients, two sessions each: four distinct session ids.
    assert len({stamps(m)["lastmile-session"] for m in got}) == 4


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_spool_replay_duplicate_carries_the_same_stamp(
        gateway_factory: Any, rules_dir: Path, fresh_broker: Broker, tmp_path: Path) -> None:
    """The gateway's own at-least-once duplicate: the spool replays records Kafka already
    has when the ledger lags (persisted about every 200 ms, docs/spool.md).  Here the
    ledger is removed after a kill -9, the worst such lag, so every spooled record
    replays: each copy must carry the stamp of its original."""
    topic = f"seq.{uuid.uuid4().hex[:8]}"
    stamp_rule(rules_dir, topic)
    fresh_broker.create_topic(topic)
    proc, ports = gateway_factory(bootstrap=fresh_broker.bootstrap, spool__spill_after_ms=500,
                                  kafka__clusters__default__message_timeout_ms=600_000)
    cid = f"seq-dup-{uuid.uuid4().hex[:6]}"
    proc.start(("127.0.0.1", ports["mqtt"]))
    try:
        fresh_broker.pause()  # PUBACKs now come from the spool
        publish_phase(ports["mqtt"], cid, 4, False, [b"%d" % i for i in range(10)])
        fresh_broker.resume()
        first = fresh_broker.read(topic, 10, timeout=60)
        assert len(first) == 10
    finally:
        proc.kill9()
    spool = tmp_path / "spool"
    assert list(spool.rglob("seg-*.log")), "no spool segment left to replay"
    for ledger in spool.rglob("ledger"):  # absent if killed before its first write
        ledger.unlink()
    proc.start(("127.0.0.1", ports["mqtt"]))
    try:
        got = fresh_broker.read(topic, 20, timeout=60)
    finally:
        proc.stop()
    assert len(got) == 20, "the spool did not replay its records"
    by_value: dict[bytes, set[tuple[str, str]]] = {}
    for m in got:
        s = stamps(m)
        assert s["lastmile-client-id"] == cid
        by_value.setdefault(m.value(), set()).add((s["lastmile-session"], s["lastmile-seq"]))
    # Every payload twice, both copies with one (session, seq); ten distinct seqs.
    assert all(len(v) == 1 for v in by_value.values()), by_value
    assert sorted(int(seq) for (_, seq), in by_value.values()) == list(range(1, 11))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("version", [4, 5])
def test_a_session_resumed_on_another_worker_continues_its_count(
        gateway_factory: Any, rules_dir: Path, broker: Broker, version: int) -> None:
    """workers: 2: the counter goes with the handover (docs/sessions.md), like QoS 2 ids."""
    from tests.integration.test_workers_sessions import Device, port_for, start

    topic = f"seq.{uuid.uuid4().hex[:8]}"
    stamp_rule(rules_dir, topic)
    gw, ports, pids = start(gateway_factory, rules_dir)
    port = ports["mqtt"]
    cid = f"seq-w-{version}-{uuid.uuid4().hex[:6]}"
    try:
        # Worker 0; then (session present) worker 1 while worker 0 keeps the released
        # session; then worker 0 again while worker 1 still holds it connected (takeover).
        devices = []
        for n, worker in enumerate((0, 1, 0)):
            device = Device(cid, version).connect(port, port_for(port, pids[worker], pids))
            devices.append(device)
            assert device.connacks == [n > 0]
            for i in range(3):
                info = device.client.publish(f"seq/{cid}", b"%d:%d" % (n, i), qos=1)
                info.wait_for_publish(30)
                assert info.is_published()
            if n == 0:
                device.stop()
        for device in devices[1:]:
            device.stop()
        got = broker.read(topic, 9, timeout=30)
    finally:
        gw.stop()
    assert len(got) == 9
    seen = [(m.value().decode(), stamps(m)) for m in got]
    assert [v for v, _ in seen] == [f"{n}:{i}" for n in range(3) for i in range(3)]
    assert len({s["lastmile-session"] for _, s in seen}) == 1, seen
    assert [int(s["lastmile-seq"]) for _, s in seen] == list(range(1, 10))
