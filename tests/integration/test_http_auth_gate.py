"""The HTTP authentication gate over a real aiohttp server, with an authenticator and a
pipeline written here: who gets in, what 401 says, what identity a Message carries,
and which scope a caller's rate bucket and Idempotency-Key answers live in.

The real authenticator (password file, JWT) and the real gateway process are in
test_http_auth.py.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.auth import ANONYMOUS, AuthRefusal, Credentials, Identity, Verdict
from gateway.buffer import FlowControl
from gateway.config import load_config
from gateway.errors import NotAuthorized
from gateway.model import Delivery, Message, Outcome
from gateway.sources.http_server import HttpIngest
from tests.helpers import ANON
from tests.support.pipelines import PublishMany

pytestmark = pytest.mark.integration

USERS = {"alice": b"alice-pw", "bob": b"bob-pw"}
TOKENS = {"good-token": "carol"}
JSON_V2 = "application/vnd.kafka.json.v2+json"


class FakeAuth:
    """The Authenticator protocol: passwords and tokens from dicts, failures counted."""

    def __init__(self, allow_anonymous: bool = False, delay: float = 0.0) -> None:
        self.allow_anonymous = allow_anonymous
        self.delay = delay
        self.seen: list[Credentials] = []
        self.events: list[tuple[str, float]] = []  # ("delay_for" | "verify", monotonic)

    def quick(self, creds: Credentials) -> Verdict | None:
        self.seen.append(creds)
        if creds.password is None and creds.cert_identity is not None:
            return Identity(method="certificate", cert=creds.cert_identity)
        if creds.password is None:
            return ANONYMOUS if self.allow_anonymous else AuthRefusal(
                reason="missing", message="credentials required")
        return None  # costs hashing: verify() off the hot path

    async def verify(self, creds: Credentials) -> Verdict:
        self.events.append(("verify", time.monotonic()))
        assert creds.password is not None
        if creds.bearer:
            sub = TOKENS.get(creds.password.decode())
            if sub is None:
                return AuthRefusal(reason="bad_credentials", message="token expired")
            return Identity(method="jwt", name=sub, claims={"sub": sub, "tenant": "t1"})
        if creds.username is not None and USERS.get(creds.username) == creds.password:
            return Identity(method="password", name=creds.username)
        return AuthRefusal(reason="bad_credentials", message="bad username or password")

    def delay_for(self, peer_host: str) -> float:
        self.events.append(("delay_for", time.monotonic()))
        return self.delay


class Recorder(PublishMany):
    """Takes every message; "alice-only" topics refuse anyone but alice, as a rule's
    ``allow: {usernames: [alice]}`` does."""

    def __init__(self) -> None:
        self.flow = FlowControl(1 << 20, 1 << 19)
        self.messages: list[Message] = []

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        if "alice-only" in message.topic and message.username != "alice":
            on_done(Outcome(ok=False, error=NotAuthorized("not allowed by rule alice-only")))
            return
        self.messages.append(message)
        on_done(Outcome(ok=True, deliveries=[Delivery(cluster="default", topic="t",
                                                      partition=0,
                                                      offset=len(self.messages))]))


Served = tuple[str, Recorder, FakeAuth]


async def serve(auth: FakeAuth, ssl_context: ssl.SSLContext | None = None,
                **limits: Any) -> tuple[TestServer, Recorder]:
    env = {**ANON, **{f"LASTMILE_LIMITS__{k.upper()}": str(v) for k, v in limits.items()}}
    config = load_config(None, env=env)
    pipeline = Recorder()
    ingest = HttpIngest(pipeline, config.limits, allow_anonymous=auth.allow_anonymous,  # type: ignore[arg-type]
                        auth=auth, schemes=("basic", "bearer"))
    server = TestServer(ingest.web_app())
    await server.start_server(ssl=ssl_context)
    return server, pipeline


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    auth = FakeAuth(**getattr(request, "param", {}))
    server, pipeline = await serve(auth)
    yield str(server.make_url("")), pipeline, auth
    await server.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# The three ways in: (path, body, headers)
def endpoints(topic: str) -> list[tuple[str, bytes, dict[str, str]]]:
    batch = json.dumps([{"topic": topic, "payload": {"n": 1}}]).encode()
    rest = json.dumps({"records": [{"value": {"n": 1}}]}).encode()
    return [(f"/v1/publish/{topic}", b"{}", {}),
            ("/v1/batch", batch, {"Content-Type": "application/json"}),
            (f"/topics/{topic.replace('/', '.')}", rest, {"Content-Type": JSON_V2})]


async def post(url: str, body: bytes = b"{}", headers: dict[str, str] | None = None,
               ssl_context: ssl.SSLContext | None = None
               ) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=body, headers=headers or {}, ssl=ssl_context or True) as resp:
        raw = await resp.read()
        parsed = json.loads(raw) if "json" in resp.content_type else raw
        return resp.status, parsed, resp


async def test_no_credentials_is_401_with_a_challenge_per_scheme(served: Served) -> None:
    url, pipeline, _ = served
    for path, body, headers in endpoints("in/t1/x"):
        status, answer, resp = await post(url + path, body, headers)
        assert status == 401, (path, answer)
        assert resp.headers.getall("WWW-Authenticate") == [
            'Basic realm="lastmile", charset="UTF-8"', 'Bearer realm="lastmile"']
        assert answer["error"] == "not_authenticated"
        if path.startswith("/topics/"):
            assert answer["error_code"] == 40101
    assert pipeline.messages == []


async def test_wrong_password_and_malformed_headers_are_401(served: Served) -> None:
    url, pipeline, _ = served
    for value in (basic("alice", "nope"), basic("mallory", "alice-pw"),
                  "Basic !!notbase64", "Basic " + base64.b64encode(b"no-colon").decode(),
                  "Digest username=alice", "Bearer"):
        status, answer, resp = await post(f"{url}/v1/publish/in/t1/x",
                                          headers={"Authorization": value})
        assert status == 401, (value, answer)
        assert "invalid_token" not in ",".join(resp.headers.getall("WWW-Authenticate"))
    assert pipeline.messages == []


async def test_two_authorization_headers_are_400(served: Served) -> None:
    url, pipeline, _ = served
    async with aiohttp.ClientSession() as session, session.post(
            f"{url}/v1/publish/in/t1/x", data=b"{}",
            headers=[("Authorization", basic("alice", "alice-pw")),
                     ("Authorization", basic("bob", "bob-pw"))]) as resp:
        assert resp.status == 400
    assert pipeline.messages == []


async def test_basic_and_bearer_carry_the_verified_identity(served: Served) -> None:
    url, pipeline, _ = served
    status, _, _ = await post(f"{url}/v1/publish/in/t1/x", headers={
        "Authorization": basic("alice", "alice-pw"), "X-Client-Id": "phone-1"})
    assert status == 200
    status, _, _ = await post(f"{url}/v1/publish/in/t1/y", headers={
        "Authorization": "Bearer good-token"})
    assert status == 200
    alice, carol = pipeline.messages
    assert (alice.username, alice.client_id, alice.claims) == ("alice", "phone-1", None)
    assert (carol.username, carol.claims) == ("carol", {"sub": "carol", "tenant": "t1"})


async def test_an_invalid_bearer_token_says_invalid_token(served: Served) -> None:
    url, pipeline, _ = served
    status, answer, resp = await post(f"{url}/v1/publish/in/t1/x",
                                      headers={"Authorization": "Bearer forged"})
    assert status == 401 and answer["details"]["reason"] == "bad_credentials"
    assert resp.headers.getall("WWW-Authenticate") == [
        'Basic realm="lastmile", charset="UTF-8"',
        'Bearer realm="lastmile", error="invalid_token", error_description="token expired"']
    assert pipeline.messages == []


async def test_401_and_403_are_told_apart_on_every_endpoint(served: Served) -> None:
    url, pipeline, _ = served
    for path, body, headers in endpoints("alice-only/x"):
        status, answer, _ = await post(url + path, body, {
            **headers, "Authorization": basic("bob", "wrong")})
        assert status == 401, (path, answer)
        status, answer, _ = await post(url + path, body, {
            **headers, "Authorization": basic("bob", "bob-pw")})
        assert status == 403, (path, answer)
        if path.startswith("/topics/"):
            assert answer["error_code"] == 40301
        status, answer, _ = await post(url + path, body, {
            **headers, "Authorization": basic("alice", "alice-pw")})
        assert status == 200, (path, answer)
    assert [m.username for m in pipeline.messages] == ["alice"] * 3


async def test_a_failing_address_is_held_before_the_costly_check() -> None:
    auth = FakeAuth(delay=0.3)
    server, _ = await serve(auth)
    try:
        status, _, _ = await post(str(server.make_url("/v1/publish/in/t1/x")),
                                  headers={"Authorization": basic("alice", "guess")})
        assert status == 401
        (first, asked), (second, verified) = auth.events
        assert (first, second) == ("delay_for", "verify")
        assert verified - asked >= 0.3  # slept at least what the throttle said
    finally:
        await server.close()


async def test_users_sharing_an_x_client_id_share_no_idempotency_answers(
        served: Served) -> None:
    url, pipeline, _ = served
    results = []
    for user in ("alice", "bob", "alice"):
        status, answer, _ = await post(f"{url}/v1/publish/in/t1/x", headers={
            "Authorization": basic(user, f"{user}-pw"), "X-Client-Id": "phone-1",
            "Idempotency-Key": "k-1"})
        assert status == 200
        results.append(answer["deliveries"][0]["offset"])
    # bob's request was produced, not answered with alice's; alice's retry was replayed.
    assert results == [1, 2, 1]
    assert [m.username for m in pipeline.messages] == ["alice", "bob"]


async def test_one_users_rate_limit_does_not_limit_another() -> None:
    auth = FakeAuth()
    server, _ = await serve(auth, http_rate_per_client=0.01, http_rate_burst=1)
    url = str(server.make_url("/v1/publish/in/t1/x"))
    try:
        alice = {"Authorization": basic("alice", "alice-pw"), "X-Client-Id": "phone-1"}
        bob = {"Authorization": basic("bob", "bob-pw"), "X-Client-Id": "phone-1"}
        assert (await post(url, headers=alice))[0] == 200
        assert (await post(url, headers=alice))[0] == 429
        assert (await post(url, headers=bob))[0] == 200
    finally:
        await server.close()


async def test_anonymous_x_client_id_picks_neither_bucket_nor_scope() -> None:
    auth = FakeAuth(allow_anonymous=True)
    server, pipeline = await serve(auth, http_rate_per_client=0.01, http_rate_burst=2)
    url = str(server.make_url("/v1/publish/in/t1/x"))
    try:
        one = {"X-Client-Id": "phone-1", "Idempotency-Key": "k"}
        status, first, _ = await post(url, headers=one)
        assert status == 200 and pipeline.messages[0].username is None
        assert pipeline.messages[0].client_id == "phone-1"  # a label for rules, no more
        # Another X-Client-Id from the same address is the same anonymous caller:
        # the same key is answered from the store, and the bucket is shared.
        status, again, _ = await post(url, headers={**one, "X-Client-Id": "phone-2"})
        assert (status, again) == (200, first) and len(pipeline.messages) == 1
        status, _, _ = await post(url, headers={"X-Client-Id": "phone-3"})
        assert status == 429
    finally:
        await server.close()


async def test_an_oversized_authorization_header_never_reaches_the_authenticator(
        served: Served) -> None:
    url, pipeline, auth = served
    status, _, _ = await post(f"{url}/v1/publish/in/t1/x",
                              headers={"Authorization": "Bearer " + "a" * 9000})
    assert status in (400, 431)  # aiohttp's header-field bound (8190 bytes)
    assert auth.seen == [] and pipeline.messages == []


# --- client certificates -----------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-subj", "/CN=lastmile-test-ca", "-days", "2", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("device", "device-7")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        extra = ["-extfile", "san.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *extra, cwd=d)


async def test_a_verified_client_certificate_is_the_identity(tmp_path: Path) -> None:
    make_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    server_ctx.load_verify_locations(tmp_path / "ca.crt")
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    auth = FakeAuth()
    server, pipeline = await serve(auth, server_ctx)
    url = f"https://127.0.0.1:{server.port}/v1/publish/in/t1/x"
    try:
        client = ssl.create_default_context(cafile=tmp_path / "ca.crt")
        status, _, _ = await post(url, ssl_context=client)
        assert status == 401  # TLS without a client certificate proves nothing
        client.load_cert_chain(tmp_path / "device.crt", tmp_path / "device.key")
        status, answer, _ = await post(url, headers={"X-Client-Id": "d7"},
                                       ssl_context=client)
        assert status == 200, answer
        (message,) = pipeline.messages
        assert (message.cert_identity, message.username, message.client_id) == (
            "device-7", None, "d7")
    finally:
        await server.close()
