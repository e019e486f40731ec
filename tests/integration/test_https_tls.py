"""HTTPS and WSS (MQTT over WebSocket over TLS) on the real ``lastmile serve``.

Client certificates: optional (cafile) and required (require_client_cert); the
certificate's CN is the connection's identity that rules' ``allow.identities`` check.
Also: the metrics listener, given without a host, binds loopback only.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.helpers import Broker, free_port
from tests.integration.http_support import Gateway, http_gateway, tenant
from tests.support.pki import Pki

pytestmark = pytest.mark.integration

RULES = """
unmatched: reject
rules:
  - name: http-in
    match: {topic: "in/{tenant}/#", source: http}
    kafka: {topic: "t.https.{tenant}"}
  - name: rest-proxy
    match: {topic: "kafka/{name}", source: http}
    kafka: {topic: "{name}"}
  - name: devices-only
    match: {topic: "ws/{tenant}/#", source: mqtt}
    kafka: {topic: "t.wss.{tenant}", key: "{client_id}"}
    allow: {identities: ["device-*"]}
"""


@dataclass
class Certs:
    pki: Pki
    other: Pki  # a CA the gateway does not trust
    server: tuple[Path, Path]
    device: tuple[Path, Path]
    intruder: tuple[Path, Path]  # from the trusted CA, CN not allowed by the rule
    stranger: tuple[Path, Path]  # CN allowed, but from the untrusted CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("pki")
    pki, other = Pki(d), Pki(d / "other", "other-ca")
    return Certs(pki, other, pki.issue("server", "localhost", server=True),
                 pki.issue("device", "device-7"), pki.issue("intruder", "intruder"),
                 other.issue("stranger", "device-9"))


def https(certs: Certs, require: bool, port: int) -> dict[str, object]:
    crt, key = certs.server
    return {"enabled": True, "host": "127.0.0.1", "port": port, "certfile": str(crt),
            "keyfile": str(key), "cafile": str(certs.pki.ca), "require_client_cert": require}


@pytest.fixture(scope="module")
def optional(tmp_path_factory: pytest.TempPathFactory, broker: Broker,
             certs: Certs) -> Iterator[Gateway]:
    """Client certificates optional; the metrics section given without a host."""
    with http_gateway(tmp_path_factory.mktemp("https-opt"), broker.bootstrap, RULES,
                      listeners__https=https(certs, False, free_port()),
                      listeners__metrics={"port": free_port()}) as gw:
        yield gw


@pytest.fixture(scope="module")
def required(tmp_path_factory: pytest.TempPathFactory, broker: Broker,
             certs: Certs) -> Iterator[Gateway]:
    with http_gateway(tmp_path_factory.mktemp("https-req"), broker.bootstrap, RULES,
                      listeners__https=https(certs, True, free_port())) as gw:
        yield gw


def port_of(gw: Gateway, name: str) -> int:
    import yaml

    config = yaml.safe_load(gw.proc.config.read_text())
    return int(config["listeners"][name]["port"])


def client_context(certs: Certs, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.pki.ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def post(gw: Gateway, certs: Certs, path: str, body: bytes,
         cert: tuple[Path, Path] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPSConnection("localhost", port_of(gw, "https"), timeout=15,
                                       context=client_context(certs, cert))
    try:
        conn.request("POST", path, body, headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def wss_publish(gw: Gateway, certs: Certs, cert: tuple[Path, Path] | None,
                topic: str) -> int:
    """MQTT 5 QoS 1 over WSS with paho; the PUBACK reason code (-1: no session)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"wss-{tenant()}",
                         transport="websockets", protocol=paho.MQTTv5)
    client.ws_set_options(path="/mqtt")
    client.tls_set(ca_certs=str(certs.pki.ca), certfile=str(cert[0]) if cert else None,
                   keyfile=str(cert[1]) if cert else None)
    codes: list[int] = []
    client.on_publish = lambda _c, _u, _mid, rc, _p: codes.append(rc.value)
    try:
        client.connect("localhost", port_of(gw, "https"), keepalive=30)
    except (ssl.SSLError, OSError):
        return -1
    client.loop_start()
    try:
        client.publish(topic, b"over-wss", qos=1)
        deadline = time.monotonic() + 15
        while not codes and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0] if codes else -1


def test_https_publish_batch_and_rest_proxy_arrive(optional: Gateway, broker: Broker,
                                                   certs: Certs) -> None:
    t = tenant()
    status, answer = post(optional, certs, f"/v1/publish/in/{t}/one", b"single")
    assert status == 200, answer
    batch = json.dumps([{"topic": f"in/{t}/b", "payload_text": "batched"}]).encode()
    status, answer = post(optional, certs, "/v1/batch", batch,
                          headers={"Content-Type": "application/json"})
    assert status == 200, answer
    got = broker.read(f"t.https.{t}", 2)
    assert sorted(m.value() for m in got) == [b"batched", b"single"]
    rest = json.dumps({"records": [{"value": {"over": "https"}}]}).encode()
    status, answer = post(optional, certs, f"/topics/rest-{t}", rest,
                          headers={"Content-Type": "application/vnd.kafka.json.v2+json"})
    assert status == 200, answer
    assert [json.loads(m.value()) for m in broker.read(f"rest-{t}", 1)] == [{"over": "https"}]


def test_wss_publish_and_certificate_identity(optional: Gateway, broker: Broker,
                                              certs: Certs) -> None:
    t = tenant()
    assert wss_publish(optional, certs, certs.device, f"ws/{t}/temp") == 0
    # A client certificate is optional here, but the rule allows only device-* identities.
    assert wss_publish(optional, certs, None, f"ws/{t}/temp") == 0x87
    assert wss_publish(optional, certs, certs.intruder, f"ws/{t}/temp") == 0x87
    got = broker.read(f"t.wss.{t}", 1)
    assert [m.value() for m in got] == [b"over-wss"]


def test_required_client_cert_refuses_at_the_handshake(required: Gateway, broker: Broker,
                                                       certs: Certs) -> None:
    t = tenant()
    for cert in (None, certs.stranger):
        # TLS 1.3: the client may finish its side first; the server's alert then ends the
        # connection before any HTTP answer.
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            post(required, certs, f"/v1/publish/in/{t}/x", b"refused")
        assert wss_publish(required, certs, cert, f"ws/{t}/temp") == -1
    status, answer = post(required, certs, f"/v1/publish/in/{t}/x", b"with-cert",
                          cert=certs.device)
    assert status == 200, answer
    assert wss_publish(required, certs, certs.device, f"ws/{t}/temp") == 0
    assert [m.value() for m in broker.read(f"t.https.{t}", 1)] == [b"with-cert"]
    assert [m.value() for m in broker.read(f"t.wss.{t}", 1)] == [b"over-wss"]


def _listening(port: int) -> set[str]:
    """Local addresses listening on ``port``, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_metrics_binds_loopback_by_default(optional: Gateway) -> None:
    port = port_of(optional, "metrics")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs /proc/net/tcp")
    assert _listening(port) == {"0100007F"}  # 127.0.0.1 only, no wildcard, no IPv6
