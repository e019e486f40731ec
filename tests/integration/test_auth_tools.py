"""Authentication against real tools: mosquitto_passwd, the mosquitto broker, an HTTP JWKS."""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.auth import AuthRefusal, Credentials, Identity
from gateway.auth.check import Authenticator
from gateway.auth.passwd import load_password_file
from gateway.config.schema import Auth, Jwt
from tests.helpers import ROOT, free_port, wait_port
from tests.support.jwt_keys import Key, jwks

pytestmark = pytest.mark.integration

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
needs_mosquitto = pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None or not Path(MOSQUITTO).exists(),
    reason="mosquitto and mosquitto_passwd are not installed (apt-get install mosquitto)")


def mosquitto_passwd(*args: str) -> None:
    subprocess.run(["mosquitto_passwd", *args], check=True, capture_output=True, timeout=60)


def lastmile_passwd(*args: str, stdin: bytes | None = None) -> None:
    subprocess.run([sys.executable, "-m", "gateway.cli", "passwd", *args], check=True,
                   input=stdin, capture_output=True, timeout=60, cwd=ROOT)


async def verdict(auth: Authenticator, user: str, password: str) -> Identity | AuthRefusal:
    creds = Credentials(username=user, password=password.encode(), peer_host="127.0.0.1")
    return auth.quick(creds) or await auth.verify(creds)


@needs_mosquitto
async def test_files_written_by_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    mosquitto_passwd("-c", "-b", str(path), "alice", "alice-pw")  # default: $7$, 101
    mosquitto_passwd("-H", "sha512", "-b", str(path), "bob", "bob pw with spaces")  # $6$
    mosquitto_passwd("-H", "sha512-pbkdf2", "-I", "5000", "-b", str(path), "carol", "Ç@rol")
    mosquitto_passwd("-b", str(path), "dave", "gone")
    mosquitto_passwd("-D", str(path), "dave")
    lines = dict(line.split(":", 1) for line in path.read_text().splitlines())
    assert lines["alice"].startswith("$7$101$") and lines["bob"].startswith("$6$")
    assert lines["carol"].startswith("$7$5000$") and "dave" not in lines

    auth = Authenticator(Auth(password_file=str(path)))
    await auth.start()
    try:
        for user, pw in [("alice", "alice-pw"), ("bob", "bob pw with spaces"),
                         ("carol", "Ç@rol")]:
            assert await verdict(auth, user, pw) == Identity(method="password", name=user)
            assert isinstance(await verdict(auth, user, pw + "x"), AuthRefusal)
        assert isinstance(await verdict(auth, "dave", "gone"), AuthRefusal)
    finally:
        await auth.close()


@pytest.fixture
def broker_with(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(password_file: Path) -> int:
        port = free_port()
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(
            f"user {getpass.getuser()}\n"  # as root it would drop to 'mosquitto' first
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {password_file}\n"
            "persistence false\nlog_dest stderr\n")
        log = (tmp_path / "mosquitto.log").open("wb")
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
        procs.append(proc)
        wait_port("127.0.0.1", port, proc=proc)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def mqtt_pub(port: int, user: str, password: str, version: str) -> int:
    return subprocess.run(
        ["mosquitto_pub", "-p", str(port), "-V", version, "-u", user, "-P", password,
         "-t", "auth/test", "-m", "hello"], capture_output=True, timeout=60).returncode


@needs_mosquitto
def test_lastmile_passwd_file_works_in_mosquitto(tmp_path: Path, broker_with: Any) -> None:
    path = tmp_path / "passwd"
    lastmile_passwd("-c", "-b", str(path), "alice", "alice-pw")
    lastmile_passwd("--password-stdin", "-I", "1000", str(path), "bob", stdin=b"bob-pw\n")
    mosquitto_passwd("-H", "sha512", "-b", str(path), "carol", "carol-pw")  # a mixed file
    lastmile_passwd("-b", str(path), "alice", "alice-new")  # updated in place
    assert set(load_password_file(path)) == {"alice", "bob", "carol"}
    port = broker_with(path)
    for version in ("mqttv5", "mqttv311"):
        assert mqtt_pub(port, "alice", "alice-new", version) == 0
        assert mqtt_pub(port, "bob", "bob-pw", version) == 0
        assert mqtt_pub(port, "carol", "carol-pw", version) == 0
        assert mqtt_pub(port, "alice", "alice-pw", version) != 0  # the old password
        assert mqtt_pub(port, "bob", "wrong", version) != 0
        assert mqtt_pub(port, "nobody", "bob-pw", version) != 0


# --- JWKS over HTTP -------------------------------------------------------------------


class JwksServer:
    def __init__(self) -> None:
        self.body: dict[str, Any] = {"keys": []}
        self.status = 200
        self.hits = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(status=self.status, text=json.dumps(self.body),
                            content_type="application/json")


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    yield server
    await runner.cleanup()


def bearer(token: bytes) -> Credentials:
    return Credentials(password=token, bearer=True, peer_host="127.0.0.1")


async def eventually(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_jwks_url_unknown_kid_refetch_is_rate_limited(jwks_server: JwksServer) -> None:
    k1, k2 = Key("RSA", "k1"), Key("EC", "k2")
    jwks_server.body = jwks(k1)
    auth = Authenticator(Auth(jwt=Jwt(jwks_url=jwks_server.url, refresh_s=3600)))
    await auth.start()
    assert auth.jwt is not None
    try:
        assert isinstance(auth.quick(bearer(k1.token())), Identity)
        assert jwks_server.hits == 1
        jwks_server.body = jwks(k1, k2)  # the issuer rotates k2 in
        # fetched a moment ago: a token naming an unknown kid does not refetch yet
        assert isinstance(await auth.verify(bearer(k2.token())), AuthRefusal)
        assert jwks_server.hits == 1
        auth.jwt._last_fetch -= 31  # ... 30 s later it does, once for the whole crowd
        crowd = [auth.verify(bearer(k2.token(sub=f"d{i}"))) for i in range(5)]
        results = await asyncio.gather(*crowd)
        assert all(isinstance(r, Identity) for r in results), results
        assert jwks_server.hits == 2
    finally:
        await auth.close()


async def test_jwks_url_background_refresh(jwks_server: JwksServer) -> None:
    k1, k2 = Key("RSA", "k1"), Key("RSA", "k2")
    jwks_server.status = 503  # the issuer is down when the gateway starts
    jwks_server.body = jwks(k1)
    auth = Authenticator(Auth(jwt=Jwt(jwks_url=jwks_server.url, refresh_s=0.1)))
    await auth.start()  # starts anyway; refuses tokens until keys arrive
    assert auth.jwt is not None
    try:
        assert auth.jwt.fetches_failed == 1
        assert isinstance(auth.quick(bearer(k1.token())), AuthRefusal)
        jwks_server.status = 200
        await eventually(lambda: isinstance(auth.quick(bearer(k1.token())), Identity),
                         "the refreshed JWKS")
        old = k1.token()
        assert isinstance(auth.quick(bearer(old)), Identity)
        jwks_server.body = jwks(k2)  # k1 removed at the issuer
        await eventually(lambda: isinstance(auth.quick(bearer(old)), AuthRefusal),
                         "the removed key to stop verifying")
        assert isinstance(auth.quick(bearer(k2.token())), Identity)
        jwks_server.status = 500  # a failed refresh keeps the keys it had
        failures = auth.jwt.fetches_failed
        await eventually(lambda: auth.jwt is not None and auth.jwt.fetches_failed > failures,
                         "a failed refresh")
        assert isinstance(auth.quick(bearer(k2.token())), Identity)
    finally:
        await auth.close()
