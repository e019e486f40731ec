"""Certificate files replaced on disk are served to new connections without a restart
(mqtts and https); a broken replacement keeps the old certificate and says why."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.helpers import Broker, free_port, log_events, wait_until
from tests.support.pki import Pki, replace, subject_cn

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = """
rules:
  - name: reload
    match: "reload/{tenant}/#"
    kafka: {topic: "t.reload.{tenant}"}
"""


def served_cn(port: int, ca: Path) -> str | None:
    """The CN of the certificate a NEW connection is given (None: no handshake)."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError):
        return None
    return subject_cn(der) if der else None


@pytest.mark.parametrize("listener", ["mqtts", "https"])
def test_replaced_certificate_is_served_without_restart(
        listener: str, gateway_factory, broker: Broker, rules_dir: Path,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    first = pki.issue("first", "server-one", server=True)
    second = pki.issue("second", "server-two", server=True)
    live = tmp_path / "live"
    live.mkdir()
    certfile, keyfile = live / "tls.crt", live / "tls.key"
    replace(certfile, first[0])
    replace(keyfile, first[1])
    for f in rules_dir.glob("*.yaml"):
        f.unlink()
    (rules_dir / "10-reload.yaml").write_text(RULES)
    port = free_port()
    gw, ports = gateway_factory(**{f"listeners__{listener}": {
        "enabled": True, "host": "127.0.0.1", "port": port,
        "certfile": str(certfile), "keyfile": str(keyfile)}})
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    assert gw.proc is not None
    pid = gw.proc.pid
    # The TLS listener may open a moment after the plain one gw.start waited for.
    wait_until(lambda: served_cn(port, pki.ca) == "server-one", timeout=30,
               what="the first certificate")

    # An MQTT session over TLS opened before the reload keeps working after it.
    held = None
    if listener == "mqtts":
        held = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="held",
                           protocol=paho.MQTTv311)
        held.tls_set(ca_certs=str(pki.ca))
        held.connect("localhost", port, keepalive=60)
        held.loop_start()

    # A new certificate and key: the next new connection is given it.
    replace(keyfile, second[1])
    replace(certfile, second[0])
    wait_until(lambda: served_cn(port, pki.ca) == "server-two", timeout=30,
               what="the new certificate on a new connection")
    assert gw.proc.poll() is None and gw.proc.pid == pid  # no restart
    reloaded = wait_until(lambda: log_events(gw.log_text(), "tls_reloaded"), timeout=10,
                          what="tls_reloaded")
    assert reloaded[-1]["listener"] == listener
    assert reloaded[-1]["subject"] == "CN=server-two"

    # A broken replacement: a key that is not a key. Logged; the old certificate stays.
    keyfile.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    failed = wait_until(lambda: log_events(gw.log_text(), "tls_reload_failed"), timeout=30,
                        what="tls_reload_failed")
    assert failed[-1]["file"] == str(keyfile)
    assert failed[-1]["listener"] == listener
    assert served_cn(port, pki.ca) == "server-two"
    # A key that does not belong to the certificate: refused the same way.
    replace(keyfile, first[1])
    wait_until(lambda: len(log_events(gw.log_text(), "tls_reload_failed")) >= 2, timeout=30,
               what="the mismatched key refused")
    assert "does not match" in log_events(gw.log_text(), "tls_reload_failed")[-1]["error"]
    assert served_cn(port, pki.ca) == "server-two"

    if held is not None:
        info = held.publish("reload/held/x", b"still-here", qos=1)
        info.wait_for_publish(60)
        assert info.is_published()
        held.disconnect()
        held.loop_stop()
        assert [m.value() for m in broker.read("t.reload.held", 1)] == [b"still-here"]

    # Fixed: served again, still the same process.
    replace(certfile, first[0])
    wait_until(lambda: served_cn(port, pki.ca) == "server-one", timeout=30,
               what="the repaired pair served")
    assert gw.proc.poll() is None and gw.proc.pid == pid
