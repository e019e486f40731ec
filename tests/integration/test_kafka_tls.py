"""A cluster reached over TLS: the startup metadata check uses the cluster's security settings.

Issue #10 defect 7: the check built its AdminClient from ``bootstrap.servers``
alone, so a TLS (or SASL) cluster failed the check, or a wrong security
setting passed it.  tansu speaks plaintext; a TLS-terminating proxy in front of
it, advertised as the broker's address, makes a TLS-only cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config.schema import Cluster
from gateway.errors import GatewayError, Unavailable
from gateway.model import Delivery, Record
from gateway.sinks.kafka import KafkaSink
from tests.helpers import Broker, free_port

pytestmark = pytest.mark.integration


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kafka-pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out",
            "broker.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "broker.crt", "-days", "2", "-extfile", "san.ext",
            cwd=d)
    return d


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def tls_cluster(pki: Path) -> AsyncIterator[Broker]:
    """tansu behind a TLS proxy; the broker advertises the proxy's port."""
    proxy_port = free_port()
    broker = Broker(advertised_port=proxy_port).start()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "broker.crt", pki / "broker.key")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", broker.port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", proxy_port, ssl=context)
    try:
        yield broker
    finally:
        server.close()
        broker.stop()


def tls_cluster_config(broker: Broker, ca: Path, **extra: object) -> Cluster:
    return Cluster(bootstrap_servers=broker.bootstrap, connect_timeout_s=5.0,
                   producer={"security.protocol": "SSL", "ssl.ca.location": str(ca),
                             "ssl.endpoint.identification.algorithm": "none", **extra})


async def test_tls_cluster_starts_and_produces(pki: Path) -> None:
    async with tls_cluster(pki) as broker:
        sink = KafkaSink("secure", tls_cluster_config(broker, pki / "ca.crt"))
        await sink.start()  # before the fix: a plaintext metadata request to a TLS port
        done: asyncio.Future[tuple[Delivery | None, GatewayError | None]] = \
            asyncio.get_running_loop().create_future()

        def on_result(record: Record, delivery: Delivery | None,
                      error: GatewayError | None) -> None:
            done.set_result((delivery, error))

        sink.produce(Record(cluster="secure", topic="tls.topic", value=b"over tls"), on_result)
        delivery, error = await asyncio.wait_for(done, 30)
        assert error is None and delivery is not None and delivery.offset >= 0
        assert await sink.close(5) == 0


async def test_wrong_ca_fails_startup_with_a_clear_error(pki: Path) -> None:
    async with tls_cluster(pki) as broker:
        sink = KafkaSink("secure", tls_cluster_config(broker, pki / "other-ca.crt"))
        with pytest.raises(Unavailable, match=r"secure.*did not answer.*(SSL|ssl|certificate)"):
            await sink.start()


async def test_plaintext_client_against_tls_cluster_fails_startup(pki: Path) -> None:
    async with tls_cluster(pki) as broker:
        sink = KafkaSink("secure", Cluster(bootstrap_servers=broker.bootstrap,
                                           connect_timeout_s=3.0))
        with pytest.raises(Unavailable, match=r"secure.*did not answer"):
            await sink.start()


def test_admin_settings_keep_security_and_drop_producer_only_keys() -> None:
    from gateway.sinks.kafka import admin_settings

    settings = {"bootstrap.servers": "b:9093", "security.protocol": "SASL_SSL",
                "sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "p",
                "ssl.ca.location": "/ca.pem", "enable.idempotence": True,
                "enable.gapless.guarantee": True, "linger.ms": 5}
    got = admin_settings(settings)
    for key in ("bootstrap.servers", "security.protocol", "sasl.mechanism", "sasl.username",
                "sasl.password", "ssl.ca.location"):
        assert got[key] == settings[key]
    assert "enable.idempotence" not in got and "enable.gapless.guarantee" not in got
