"""MQTT authentication end to end: the real ``lastmile serve``, real clients, real Kafka.

The gateway runs with ``auth.allow_anonymous: false``, a password file written by
the real ``mosquitto_passwd``, a JWKS file holding a key generated here (tokens
made by PyJWT), and a TLS listener taking optional client certificates.  Each
test publishes to its own Kafka topic (``auth.<run>``), whose records carry the
verified name in a ``who`` header.  "Nothing reached Kafka" is checked after a
marker published by an accepted client behind the refused one has arrived.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import jwt
import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.helpers import Broker, GatewayProcess, log_events, running, wait_until, write_config
from tests.integration.test_mqtt_tls import make_pki
from tests.support import mqtt_raw

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              # 3.1.1 CONNACK return codes reach the test raw only through paho's API 1.
              pytest.mark.filterwarnings("ignore:Callback API version 1:DeprecationWarning")]

ISSUER, AUDIENCE = "https://auth.example.test", "lastmile"
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "plant-p1": "p1-pw"}
RULES = """
rules:
  - name: auth-test
    match: "auth/{run}/#"
    kafka: {topic: "auth.{run}", key: "{client_id}", headers: {who: "{username}"}}
  - name: plants
    match: "plants/{plant}/#"
    kafka: {topic: "auth.plants-{plant}", headers: {who: "{username}"}}
    allow:
      usernames: ["plant-{plant}"]
      claims: {site: ["{plant}"]}
  - name: secure
    match: "secure/{device}/#"
    kafka: {topic: "auth.tls-{device}", key: "{client_id}"}
    allow: {identities: ["device-*"]}
"""


@dataclass
class Gw:
    proc: GatewayProcess
    ports: dict[str, int]
    tls_port: int
    pki: Path
    key: rsa.RSAPrivateKey

    @property
    def mqtt(self) -> int:
        return self.ports["mqtt"]

    def token(self, sub: str = "sensor-42", *, exp_in: float = 3600, aud: str = AUDIENCE,
              key: rsa.RSAPrivateKey | None = None, **extra: str) -> str:
        claims = {"sub": sub, "iss": ISSUER, "aud": aud, "exp": int(time.time() + exp_in),
                  **extra}
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": "k1"})

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Gw]:
    tmp = tmp_path_factory.mktemp("mqttauth")
    passwd = tmp / "passwd"
    for n, (user, password) in enumerate(USERS.items()):
        create = ["-c"] if n == 0 else []
        subprocess.run(["mosquitto_passwd", *create, "-b", str(passwd), user, password],
                       check=True, capture_output=True, timeout=30)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "use": "sig",
           "alg": "RS256"}
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    pki = tmp / "pki"
    pki.mkdir()
    make_pki(pki)
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "10-auth.yaml").write_text(RULES)
    config = tmp / "gateway.yaml"
    tls_port = _free_port()
    ports = write_config(
        config, bootstrap=broker.bootstrap, rules_dir=rules, spool_dir=tmp / "spool",
        spool__enabled=False, rules__watch=False,
        auth__allow_anonymous=False, auth__password_file=str(passwd),
        auth__jwt={"jwks_file": str(tmp / "jwks.json"), "issuer": ISSUER,
                   "audience": AUDIENCE},
        auth__failures_before_delay=3, auth__max_failure_delay_s=1.0,
        listeners__mqtts={"enabled": True, "host": "127.0.0.1", "port": tls_port,
                          "certfile": str(pki / "server.crt"),
                          "keyfile": str(pki / "server.key"), "cafile": str(pki / "ca.crt"),
                          "require_client_cert": False})
    proc = GatewayProcess(config, tmp / "gateway.log")
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        yield Gw(proc, ports, tls_port, pki, key)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_id() -> str:
    return uuid.uuid4().hex[:10]


# --- clients ------------------------------------------------------------------------------


def paho_client(version: int, client_id: str, transport: str = "tcp") -> tuple[paho.Client,
                                                                              list[int]]:
    """A paho client and the list its CONNACK code lands in: 3.1.1 return codes as sent
    (callback API 1 keeps them raw), 5.0 reason codes."""
    codes: list[int] = []
    if version == 4:
        client = paho.Client(paho.CallbackAPIVersion.VERSION1, client_id=client_id,
                             protocol=paho.MQTTv311, transport=transport)  # type: ignore[arg-type]
        client.on_connect = lambda _c, _u, _f, rc: codes.append(int(rc))
    else:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv5, transport=transport)  # type: ignore[arg-type]
        client.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc.value)
    if transport == "websockets":
        client.ws_set_options(path="/mqtt")
    return client, codes


def connack(port: int, version: int, user: str | None = None, password: str | None = None,
            *, transport: str = "tcp", bind: str = "", tls: tuple[Path, str | None] | None = None,
            client_id: str | None = None) -> tuple[int, paho.Client]:
    """Connect once (no retries: the loop is driven here) and return the CONNACK code."""
    client, codes = paho_client(version, client_id or f"c-{run_id()}", transport)
    if user is not None or password is not None:
        client.username_pw_set(user, password)
    if tls is not None:
        pki, cert = tls
        client.tls_set(ca_certs=str(pki / "ca.crt"),
                       certfile=str(pki / f"{cert}.crt") if cert else None,
                       keyfile=str(pki / f"{cert}.key") if cert else None)
    client.connect("127.0.0.1", port, keepalive=30, bind_address=bind)
    deadline = time.monotonic() + 30
    while not codes and time.monotonic() < deadline:
        if client.loop(0.1) not in (paho.MQTT_ERR_SUCCESS,):
            break  # closed: the code (if any) came first
    assert codes, "no CONNACK"
    return codes[0], client


def publish_with(client: paho.Client, topic: str, payload: bytes) -> None:
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(15)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def good_publish(gw: Gw, topic: str, payload: bytes, user: str = "alice") -> None:
    code, client = connack(gw.mqtt, 5, user, USERS[user])
    assert code == 0
    publish_with(client, topic, payload)


def only_marker(broker: Broker, gw: Gw, run: str) -> list[Any]:
    """Publish a marker as alice behind whatever was refused; every record of the topic."""
    good_publish(gw, f"auth/{run}/marker", b"marker")
    wait_until(lambda: broker.read(f"auth.{run}", 1, timeout=5), 30, what="the marker")
    return broker.read_all(f"auth.{run}")


def headers(record: Any) -> dict[str, bytes]:
    return dict(record.headers() or [])


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "code"), [(4, 5), (5, 0x87)])
def test_anonymous_is_refused_and_nothing_reaches_kafka(gw: Gw, broker: Broker, version: int,
                                                        code: int) -> None:
    run = run_id()
    got, client = connack(gw.mqtt, version)
    assert got == code
    assert client.publish(f"auth/{run}/x", b"anon", qos=0).rc != paho.MQTT_ERR_SUCCESS
    # mosquitto_pub, both versions: refused, nothing published.
    for v in ("mqttv311", "mqttv5"):
        done = subprocess.run(["mosquitto_pub", "-p", str(gw.mqtt), "-V", v, "-q", "1",
                               "-t", f"auth/{run}/x", "-m", "anon"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode != 0
        assert "not authori" in done.stderr.lower(), done.stderr
    assert [r.value() for r in only_marker(broker, gw, run)] == [b"marker"]


@pytest.mark.parametrize(("version", "code"), [(4, 4), (5, 0x86)])
def test_wrong_password_is_refused(gw: Gw, broker: Broker, version: int, code: int) -> None:
    run = run_id()
    assert connack(gw.mqtt, version, "alice", "not-her-password")[0] == code
    assert connack(gw.mqtt, version, "nobody", "whatever")[0] == code
    done = subprocess.run(["mosquitto_pub", "-p", str(gw.mqtt), "-V", "mqttv311", "-u", "alice",
                           "-P", "guess", "-t", f"auth/{run}/x", "-m", "guess"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "bad user name or password" in done.stderr.lower()
    assert [r.value() for r in only_marker(broker, gw, run)] == [b"marker"]
    # Logged (first refusal of an address) with the reason, never with the password.
    assert connack(gw.mqtt, version, "alice", "not-her-password", bind="127.0.0.4")[0] == code
    text = gw.proc.log_text()
    (line,) = [e for e in log_events(text, "mqtt_auth_refused")
               if e["peer"].startswith("127.0.0.4:") and e["reason"] == "bad_credentials"][-1:]
    assert line["username"] == "alice" and line["client_id"].startswith("c-")
    assert "not-her-password" not in text and "guess" not in text


@pytest.mark.parametrize("credentials", [None, ("alice", "wrong")])
async def test_a_publish_pipelined_behind_a_refused_connect_never_reaches_kafka(
        gw: Gw, broker: Broker, credentials: tuple[str, str] | None) -> None:
    run = run_id()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.mqtt)
    connect = mqtt_raw.connect(f"pipe-{run}")
    if credentials is not None:
        connect = connect_with(f"pipe-{run}", *credentials)
    # CONNECT and two PUBLISHes in one send, as a client that does not wait for CONNACK.
    writer.write(connect + mqtt_raw.publish(f"auth/{run}/sneak", b"sneak-1", 1, 1)
                 + mqtt_raw.publish(f"auth/{run}/sneak", b"sneak-2", 2, 2))
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(), 10)  # everything, until the close
    except TimeoutError:
        answer = b"(still open)"
    writer.close()
    records = await asyncio.to_thread(only_marker, broker, gw, run)
    assert [r.value() for r in records] == [b"marker"]  # not one byte of the sneak
    assert answer == (b"\x20\x02\x00\x04" if credentials else b"\x20\x02\x00\x05")


def connect_with(client_id: str, user: str, password: str) -> bytes:
    """A 3.1.1 CONNECT (clean session, keep alive 60) with a user name and password."""
    s = mqtt_raw._str
    body = (s("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big") + s(client_id) + s(user)
            + s(password))
    return b"\x10" + mqtt_raw._remaining(len(body)) + body


# --- the way in ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_right_password_publishes_as_that_user(gw: Gw, broker: Broker, version: int) -> None:
    run = run_id()
    code, client = connack(gw.mqtt, version, "bob", "bob-pw")
    assert code == 0
    publish_with(client, f"auth/{run}/paho", b"paho")
    subprocess.run(["mosquitto_pub", "-p", str(gw.mqtt), "-V", "mqttv5", "-u", "carol",
                    "-P", "carol-pw", "-q", "1", "-t", f"auth/{run}/pub", "-m", "pub"],
                   check=True, capture_output=True, timeout=30)
    got = broker.read(f"auth.{run}", 2)
    assert {(r.value(), headers(r)["who"]) for r in got} == {(b"paho", b"bob"),
                                                             (b"pub", b"carol")}


@pytest.mark.parametrize("version", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
async def test_aiomqtt_with_and_without_the_password(gw: Gw, broker: Broker,
                                                     version: aiomqtt.ProtocolVersion) -> None:
    run = run_id()
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", gw.mqtt, username="alice", password="nope",
                                  protocol=version, timeout=10) as client:
            await client.publish(f"auth/{run}/x", b"no", qos=1)
    async with aiomqtt.Client("127.0.0.1", gw.mqtt, username="alice", password="alice-pw",
                              identifier=f"aio-{run}", protocol=version, timeout=10) as client:
        await client.publish(f"auth/{run}/x", b"yes", qos=1)
    got = await asyncio.to_thread(broker.read, f"auth.{run}", 1)
    assert [(r.value(), headers(r)["who"]) for r in got] == [(b"yes", b"alice")]


def test_jwt_as_password_identity_is_its_sub(gw: Gw, broker: Broker) -> None:
    run = run_id()
    # The CONNECT's username is ignored: the token says who this is.
    code, client = connack(gw.mqtt, 5, "admin", gw.token("sensor-42"))
    assert code == 0
    publish_with(client, f"auth/{run}/jwt", b"signed")
    # (3.1.1 has no password without a user name [MQTT-3.1.2-22]: clients send any.)
    code, client = connack(gw.mqtt, 4, "jwt", gw.token("sensor-43"))
    assert code == 0
    publish_with(client, f"auth/{run}/jwt", b"signed-311")
    got = broker.read(f"auth.{run}", 2)
    assert {(r.value(), headers(r)["who"]) for r in got} == {(b"signed", b"sensor-42"),
                                                             (b"signed-311", b"sensor-43")}


@pytest.mark.parametrize("bad", ["expired", "audience", "key"])
def test_bad_jwts_are_refused(gw: Gw, bad: str) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = {"expired": gw.token(exp_in=-600), "audience": gw.token(aud="someone-else"),
             "key": gw.token(key=other)}[bad]
    assert connack(gw.mqtt, 5, "sensor-42", token)[0] == 0x86
    assert connack(gw.mqtt, 4, "sensor-42", token)[0] == 4


def test_a_connection_ends_when_its_token_expires(gw: Gw) -> None:
    # exp a few seconds ahead: accepted now, then the sweep ends the connection.
    code, client = connack(gw.mqtt, 5, "jwt", gw.token("short-lived", exp_in=3))
    assert code == 0
    reasons: list[tuple[int, str | None]] = []
    client.on_disconnect = lambda _c, _u, _f, rc, props: reasons.append(
        (rc.value, getattr(props, "ReasonString", None)))
    deadline = time.monotonic() + 60
    while not reasons and time.monotonic() < deadline:
        client.loop(0.2)
    assert reasons and reasons[0] == (0x87, "token expired")


# --- authorization: who was proven decides where it may publish ---------------------------


def puback_code(client: paho.Client, topic: str) -> int:
    """QoS 1 publish; the PUBACK reason code (5.0) or 0 once acked (3.1.1)."""
    codes: list[int] = []
    if client.protocol == paho.MQTTv5:
        client.on_publish = lambda _c, _u, _m, rc, _p: codes.append(rc.value)
    else:  # callback API 1 (see paho_client): no code to give
        client.on_publish = lambda _c, _u, _m: codes.append(0)
    client.loop_start()
    try:
        client.publish(topic, b"reading", qos=1).wait_for_publish(15)
        wait_until(lambda: codes, 15, what="the PUBACK")
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


def test_rules_see_the_proven_identity_only(gw: Gw, broker: Broker) -> None:
    topic = f"plants/p1/{run_id()}"
    # The password user plant-p1, and a JWT whose claim site is p1: allowed.
    assert puback_code(connack(gw.mqtt, 5, "plant-p1", "p1-pw")[1], topic) == 0
    token = gw.token("gateway-7", site="p1")
    assert puback_code(connack(gw.mqtt, 5, "jwt", token)[1], topic) == 0
    # Proven, but someone else: alice, and a token for site p2 (5.0: PUBACK 0x87).
    assert puback_code(connack(gw.mqtt, 5, "alice", "alice-pw")[1], topic) == 0x87
    token = gw.token("gateway-8", site="p2")
    assert puback_code(connack(gw.mqtt, 5, "plant-p1", token)[1], topic) == 0x87
    # A 3.1.1 client is acked either way ([MQTT-3.3.5-2], docs/mqtt.md): the record says.
    code, client = connack(gw.mqtt, 4, "alice", "alice-pw")
    assert code == 0 and puback_code(client, topic) == 0
    got = broker.read("auth.plants-p1", 2)
    mine = sorted(headers(r)["who"] for r in got if r.topic() == "auth.plants-p1")
    assert b"plant-p1" in mine and b"gateway-7" in mine
    assert b"alice" not in mine and b"gateway-8" not in mine


# --- certificates and WebSocket ----------------------------------------------------------


def test_mtls_identity_still_works(gw: Gw, broker: Broker) -> None:
    code, client = connack(gw.tls_port, 5, tls=(gw.pki, "good"), client_id="tls-good")
    assert code == 0  # no username, no password: the certificate is the identity
    publish_with(client, "secure/device-7/temp", b"21.5")
    assert connack(gw.tls_port, 5, tls=(gw.pki, None))[0] == 0x87  # TLS alone proves nothing
    got = broker.read("auth.tls-device-7", 1)
    assert [(m.key(), m.value()) for m in got] == [(b"tls-good", b"21.5")]


@pytest.mark.parametrize("version", [4, 5])
def test_websocket_needs_credentials_too(gw: Gw, broker: Broker, version: int) -> None:
    run = run_id()
    http = gw.ports["http"]
    assert connack(http, version, transport="websockets")[0] == (5 if version == 4 else 0x87)
    assert connack(http, version, "alice", "x", transport="websockets")[0] == (
        4 if version == 4 else 0x86)
    code, client = connack(http, version, "alice", "alice-pw", transport="websockets")
    assert code == 0
    publish_with(client, f"auth/{run}/ws", b"over-ws")
    got = broker.read(f"auth.{run}", 1)
    assert [(r.value(), headers(r)["who"]) for r in got] == [(b"over-ws", b"alice")]


# --- throttle and metrics -----------------------------------------------------------------


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_guessing_address_is_throttled_not_its_neighbours(gw: Gw) -> None:
    before = sample(gw.metrics(), "lastmile_auth_throttled_total")
    stop = threading.Event()
    guesses: list[int] = []

    def hammer() -> None:  # wrong passwords from 127.0.0.1, one after another
        n = 0
        while not stop.is_set():
            n += 1
            guesses.append(connack(gw.mqtt, 4, "alice", f"guess-{n}", bind="127.0.0.1")[0])

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(guesses) >= 6, 60, what="six wrong guesses")
        # bob's password is checked by hashing (never cached yet), from another address.
        code, client = connack(gw.mqtt, 5, "bob", "bob-pw", bind="127.0.0.2")
        client.disconnect()
        assert code == 0
    finally:
        stop.set()
        thread.join(60)
    assert set(guesses) == {4}
    wait_until(lambda: sample(gw.metrics(), "lastmile_auth_throttled_total") > before, 30,
               what="lastmile_auth_throttled_total to count the held attempts")
    # One info line per address per interval, not one per guess.
    lines = [e for e in log_events(gw.proc.log_text(), "mqtt_auth_refused")
             if e["peer"].startswith("127.0.0.1:")]
    assert len(lines) < len(guesses)


def test_metrics_count_acceptances_and_refusals_by_kind(gw: Gw) -> None:
    names = ('lastmile_auth_refused_total{reason="missing"}',
             'lastmile_auth_refused_total{reason="bad_credentials"}',
             'lastmile_auth_accepted_total{method="password"}',
             'lastmile_auth_accepted_total{method="jwt"}')
    text = gw.metrics()
    before = {n: sample(text, n) for n in names}
    assert all(n in text for n in names)  # pre-initialised, 0 before the first
    assert connack(gw.mqtt, 5)[0] == 0x87
    assert connack(gw.mqtt, 5, "carol", "nope", bind="127.0.0.3")[0] == 0x86
    connack(gw.mqtt, 5, "carol", "carol-pw")[1].disconnect()
    connack(gw.mqtt, 5, "jwt", gw.token("metrics-sub"))[1].disconnect()

    def grown() -> bool:
        now = gw.metrics()
        return all(sample(now, n) >= before[n] + 1 for n in names)

    wait_until(grown, 30, what="every auth counter to count its client")


def test_anonymous_access_is_announced_loudly(gateway_factory: Any, gw: Gw) -> None:
    assert log_events(gw.proc.log_text(), "auth_anonymous_allowed") == []
    # Tests not about auth run with allow_anonymous: true; two workers, two warnings.
    proc, ports = gateway_factory(workers=2)
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        wait_until(lambda: len(log_events(proc.log_text(), "gateway_started")) == 2, 60,
                   what="both workers started")
        lines = log_events(proc.log_text(), "auth_anonymous_allowed")
        assert sorted(line["worker"] for line in lines) == [0, 1]
        assert {line["level"] for line in lines} == {"warning"}
