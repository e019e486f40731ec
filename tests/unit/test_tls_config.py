"""TLS listener config: defaults, and file errors naming file, line and key at load.

Plus ServerTls in process (uvloop, real sockets): the client certificate is the
transport's ``peercert`` on HTTPS and WSS alike, a CA rotation takes effect, and a
change is loaded only once two polls agree.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml
from aiohttp import web

from gateway.config import ConfigError, load_config
from gateway.config.schema import TlsListener
from gateway.tls import ServerTls, build_context
from tests.helpers import ANON
from tests.support.pki import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    pki.issue("server", "localhost", server=True)
    pki.issue("other", "someone-else", server=True)
    pki.issue("device", "device-7")
    return pki


def write(tmp_path: Path, listeners: dict[str, Any]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"listeners": listeners}, sort_keys=False))
    return path


def https(pki: Pki, **over: Any) -> dict[str, Any]:
    return {"enabled": True, "certfile": str(pki.dir / "server.crt"),
            "keyfile": str(pki.dir / "server.key"), **over}


def test_metrics_binds_loopback_by_default(tmp_path: Path) -> None:
    assert load_config(None, env=ANON).listeners.metrics.host == "127.0.0.1"
    # A section given without a host keeps the loopback default (and its port).
    config = load_config(write(tmp_path, {"metrics": {"enabled": True}}), env=ANON)
    assert (config.listeners.metrics.host, config.listeners.metrics.port) == ("127.0.0.1", 9100)


def test_tls_listener_defaults(tmp_path: Path) -> None:
    listeners = load_config(None, env=ANON).listeners
    assert (listeners.https.enabled, listeners.https.port) == (False, 8443)
    config = load_config(write(tmp_path, {"https": {"host": "127.0.0.1"},
                                          "mqtts": {"host": "127.0.0.1"}}), env=ANON)
    assert (config.listeners.https.port, config.listeners.mqtts.port) == (8443, 8883)


def test_enabled_https_loads(tmp_path: Path, pki: Pki) -> None:
    config = load_config(write(tmp_path, {"https": https(pki, cafile=str(pki.ca),
                                                         require_client_cert=True)}), env={})
    # Client certificates required on a TLS listener are a way in: anonymous may stay off.
    assert config.listeners.https.require_client_cert


@pytest.mark.parametrize(("section", "over", "key", "words"), [
    ("https", {"certfile": None}, "listeners.https.certfile", "certfile is required"),
    ("mqtts", {"keyfile": None}, "listeners.mqtts.keyfile", "keyfile is required"),
    ("https", {"certfile": "/nonexistent/tls.crt"}, "listeners.https.certfile",
     "/nonexistent/tls.crt: cannot read: No such file"),
    ("https", {"keyfile": "{dir}/other.key"}, "listeners.https.keyfile",
     "other.key: does not match the certificate in"),
    ("https", {"certfile": "{dir}/server.key"}, "listeners.https.certfile",
     "no PEM certificate"),
    ("mqtts", {"keyfile": "{dir}/server.crt"}, "listeners.mqtts.keyfile", "no PEM private key"),
    ("https", {"cafile": "{dir}/server.key"}, "listeners.https.cafile", "no PEM certificate"),
    ("https", {"require_client_cert": True}, "listeners.https.require_client_cert",
     "needs a cafile"),
])
def test_tls_file_errors_name_file_line_and_key(tmp_path: Path, pki: Pki, section: str,
                                                over: dict[str, Any], key: str,
                                                words: str) -> None:
    over = {k: v.replace("{dir}", str(pki.dir)) if isinstance(v, str) else v
            for k, v in over.items()}
    body = {k: v for k, v in https(pki, **over).items() if v is not None}
    path = write(tmp_path, {"mqtt": {"port": 1883}, section: body})
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=ANON)
    text = str(caught.value)
    assert text.startswith(f"{path}:"), text
    assert caught.value.line is not None and caught.value.line >= 2
    assert caught.value.key == key
    assert words in text


def test_context_is_tls_1_2_or_newer(pki: Pki) -> None:
    context, about = build_context(TlsListener(certfile=str(pki.dir / "server.crt"),
                                               keyfile=str(pki.dir / "server.key")))
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert about["subject"] == "CN=localhost"


# --- ServerTls in process -------------------------------------------------------------


def run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def client(ca: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


async def peer_cn(request: web.Request) -> web.Response:
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    cn = [v for rdn in (cert or {}).get("subject", ()) for k, v in rdn if k == "commonName"]
    return web.Response(text=cn[0] if cn else "-")


async def get(port: int, context: ssl.SSLContext) -> str | None:
    """GET /cn over HTTPS; the CN the server saw, None when the handshake was refused."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                       server_hostname="localhost")
        writer.write(b"GET /cn HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    except (ssl.SSLError, OSError):
        return None
    if not data.startswith(b"HTTP/1.1 200"):
        return None
    return data.split(b"\r\n\r\n", 1)[1].decode()


def test_https_peercert_and_ca_rotation(tmp_path: Path, pki: Pki) -> None:
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(pki.dir / name, live / name)
    shutil.copy(pki.ca, live / "ca.crt")
    new_ca = Pki(tmp_path / "new", "new-ca")
    new_device = new_ca.issue("device", "device-8")
    listener = TlsListener(enabled=True, certfile=str(live / "server.crt"),
                           keyfile=str(live / "server.key"), cafile=str(live / "ca.crt"),
                           require_client_cert=True)
    old_device = (pki.dir / "device.crt", pki.dir / "device.key")

    async def main() -> None:
        tls = ServerTls(listener, "https")
        app = web.Application()
        app.router.add_get("/cn", peer_cn)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            # The client certificate's subject reaches the handler as peercert.
            assert await get(port, client(pki.ca, old_device)) == "device-7"
            assert await get(port, client(pki.ca, None)) is None
            # The CA file now trusts only the new CA: old clients out, new ones in.
            shutil.copy(new_ca.ca, live / "ca.crt")
            tls.poll()  # a change seen once is not loaded yet (it may be half written)
            assert await get(port, client(pki.ca, old_device)) == "device-7"
            tls.poll()
            assert tls.reloads_ok == 1
            assert await get(port, client(pki.ca, new_device)) == "device-8"
            assert await get(port, client(pki.ca, old_device)) is None
            # Nothing changed: no reload.
            tls.poll()
            tls.poll()
            assert tls.reloads_ok == 1
        finally:
            await tls.close()
            await runner.cleanup()

    run(main())


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_reload_switches_new_handshakes_on_tls_1_2_and_1_3(tmp_path: Path, pki: Pki,
                                                           version: ssl.TLSVersion) -> None:
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(pki.dir / name, live / name)
    tls = ServerTls(TlsListener(certfile=str(live / "server.crt"),
                                keyfile=str(live / "server.key")), "mqtts")

    async def served() -> str:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.check_hostname = False
        context.minimum_version = context.maximum_version = version
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                    ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        cert = sslobj.getpeercert()
        writer.close()
        return str(dict(rdn[0] for rdn in cert["subject"])["commonName"])

    async def main() -> None:
        nonlocal port
        server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0,
                                            ssl=tls.context)
        port = server.sockets[0].getsockname()[1]
        try:
            assert await served() == "localhost"
            shutil.copy(pki.dir / "other.crt", live / "server.crt")
            shutil.copy(pki.dir / "other.key", live / "server.key")
            assert tls.reload()
            assert await served() == "someone-else"
        finally:
            server.close()

    port = 0
    run(main())
