"""MQTT over TLS with client certificates (mTLS): the certificate's CN is the identity
that rules' ``allow.identities`` check."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import Broker, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = """
rules:
  - name: secure
    match: "secure/{device}/#"
    kafka: {topic: "tls-{device}", key: "{client_id}"}
    allow: {identities: ["device-*"]}
"""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-subj", "/CN=lastmile-test-ca", "-days", "2", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("good", "device-7"), ("bad", "intruder")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        extra = ["-extfile", "san.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *extra, cwd=d)


def publish(port: int, pki: Path, cert: str | None) -> int:
    """MQTT 5 QoS 1 over TLS; the PUBACK reason code, or -1 if the handshake failed."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tls-{cert}",
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(pki / "ca.crt"),
                   certfile=str(pki / f"{cert}.crt") if cert else None,
                   keyfile=str(pki / f"{cert}.key") if cert else None)
    codes: list[int] = []
    client.on_publish = lambda _c, _u, _m, rc, _p: codes.append(rc.value)
    try:
        client.connect("127.0.0.1", port)
    except (ssl.SSLError, OSError):
        return -1
    client.loop_start()
    client.publish("secure/device-7/temp", b"21.5", qos=1)
    deadline = time.monotonic() + 10
    while not codes and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    return codes[0] if codes else -1


def test_mtls_identity_decides_who_may_publish(gateway_factory, broker: Broker,
                                               rules_dir: Path, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    for f in rules_dir.glob("*.yaml"):
        f.unlink()
    (rules_dir / "10-tls.yaml").write_text(RULES)
    tls_port = free_port()
    gw, _ports = gateway_factory(listeners__mqtts={
        "enabled": True, "host": "127.0.0.1", "port": tls_port,
        "certfile": str(pki / "server.crt"), "keyfile": str(pki / "server.key"),
        "cafile": str(pki / "ca.crt"), "require_client_cert": True})
    gw.start(wait_for=("127.0.0.1", tls_port))

    assert publish(tls_port, pki, "good") == 0
    assert publish(tls_port, pki, "bad") == 0x87  # valid certificate, identity not allowed
    assert publish(tls_port, pki, None) == -1  # no client certificate: no session at all
    got = broker.read("tls-device-7", 1, timeout=15)
    assert [(m.key(), m.value()) for m in got] == [(b"tls-good", b"21.5")]
