"""HTTP publishers authenticate against the real gateway: ``lastmile serve`` with a
password file written by Debian's ``mosquitto_passwd``, JWTs made by PyJWT with keys
generated here (JWKS in a file), real HTTP clients, and the tansu broker.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.helpers import Broker, free_port
from tests.integration.http_support import Gateway, http_gateway, tenant
from tests.support.pki import Pki

pytestmark = pytest.mark.integration

ISSUER = "https://issuer.test"
AUDIENCE = "lastmile"
JSON_V2 = "application/vnd.kafka.json.v2+json"

RULES = """
dead_letter: {cluster: default, topic: t.dead-letter}
unmatched: reject
rules:
  - name: http-in
    match: {topic: "in/{tenant}/#", source: http}
    kafka: {topic: "t.auth.{tenant}", key: "{client_id}"}
  - name: alice-only
    match: {topic: "alice/{tenant}/#", source: http}
    kafka: {topic: "t.alice.{tenant}"}
    allow: {usernames: [alice]}
  - name: devices-only
    match: {topic: "dev/{tenant}/#", source: http}
    kafka: {topic: "t.dev.{tenant}", key: "{client_id}"}
    allow: {identities: ["device-*"]}
  - name: rest-alice-only
    match: {topic: "kafka/{name}", source: http}
    kafka: {topic: "{name}"}
    allow: {usernames: [alice]}
"""


class Keys:
    """An RSA key in the gateway's JWKS, and one it has never seen."""

    def __init__(self) -> None:
        self.good = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> str:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.good.public_key()))
        return json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]})

    def token(self, sub: str = "carol", *, key: Any = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600,
                   **claims}
        return jwt.encode(payload, key or self.good, algorithm="RS256", headers={"kid": "k1"})


def mosquitto_passwd(path: Path, users: dict[str, str]) -> None:
    create = ["-c"]
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", *create, "-b", str(path), user, password],
                       check=True, capture_output=True, timeout=30)
        create = []


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def auth_settings(tmp: Path, keys: Keys, **extra: Any) -> dict[str, Any]:
    passwd = tmp / "passwd"
    mosquitto_passwd(passwd, {"alice": "alice-pw", "bob": "bob-pw"})
    jwks = tmp / "jwks.json"
    jwks.write_text(keys.jwks())
    return {"auth__allow_anonymous": False, "auth__password_file": str(passwd),
            "auth__jwt": {"jwks_file": str(jwks), "issuer": ISSUER, "audience": AUDIENCE},
            **extra}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, broker: Broker, keys: Keys
       ) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("http-auth")
    # Failures from 127.0.0.1 would otherwise hold this module's later checks back
    # (test_failing_address_is_slowed has a gateway of its own); a small bucket for
    # the rate test (every other test names its own X-Client-Id).
    settings = auth_settings(tmp, keys, auth__failures_before_delay=10_000,
                             limits__http_rate_per_client=0.001, limits__http_rate_burst=4)
    with http_gateway(tmp, broker.bootstrap, RULES, **settings) as gateway:
        yield gateway


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Answer:
    status_code: int
    challenges: list[str]  # every WWW-Authenticate header, in order
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def post(gw: Gateway, path: str, body: bytes = b"{}", *, tls: ssl.SSLContext | None = None,
         **headers: str) -> Answer:
    base = f"https://localhost:{gw.ports['https']}" if tls is not None else gw.url
    request = urllib.request.Request(base + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30, context=tls) as resp:
            return Answer(resp.status, resp.headers.get_all("WWW-Authenticate") or [],
                          resp.read().decode())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, exc.headers.get_all("WWW-Authenticate") or [],
                          exc.read().decode())


def three_endpoints(t: str, prefix: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Single publish, batch, REST Proxy: (path, body, headers), all toward ``prefix``."""
    batch = json.dumps([{"topic": f"{prefix}/{t}/x", "payload": {"n": 2}}]).encode()
    rest = json.dumps({"records": [{"value": {"n": 3}}]}).encode()
    return [(f"/v1/publish/{prefix}/{t}/x", b'{"n": 1}', {}),
            ("/v1/batch", batch, {"Content-Type": "application/json"}),
            (f"/topics/t.rest.{t}", rest, {"Content-Type": JSON_V2})]


CHALLENGES = ['Basic realm="lastmile", charset="UTF-8"', 'Bearer realm="lastmile"']


def test_no_credentials_is_401_and_nothing_reaches_kafka(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    for path, body, headers in three_endpoints(t, "in"):
        resp = post(gw, path, body, **headers, **{"X-Client-Id": f"c-{t}"})
        assert resp.status_code == 401, (path, resp.text)
        assert resp.challenges == CHALLENGES
        assert resp.json()["error"] == "not_authenticated"
    assert resp.json()["error_code"] == 40101  # REST Proxy's shape
    # A marker from a client that may publish: it is the only record in the topic.
    ok = post(gw, f"/v1/publish/in/{t}/x", b"marker", **basic("alice", "alice-pw"))
    assert ok.status_code == 200, ok.text
    assert [m.value() for m in broker.read(f"t.auth.{t}", 1)] == [b"marker"]


def test_wrong_password_is_401_right_password_is_200(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    for user, password in (("alice", "bob-pw"), ("mallory", "alice-pw"), ("alice", "")):
        resp = post(gw, f"/v1/publish/in/{t}/x", b"refused", **basic(user, password))
        assert resp.status_code == 401, resp.text
        assert resp.challenges == CHALLENGES
    resp = post(gw, f"/v1/publish/in/{t}/x", b"taken", **basic("alice", "alice-pw"),
                **{"X-Client-Id": "phone-1"})
    assert resp.status_code == 200, resp.text
    (record,) = broker.read(f"t.auth.{t}", 1)
    assert (record.value(), record.key()) == (b"taken", b"phone-1")


def test_a_valid_bearer_token_publishes(gw: Gateway, keys: Keys, broker: Broker) -> None:
    t = tenant()
    resp = post(gw, f"/v1/publish/in/{t}/x", b"by-jwt", **bearer(keys.token("carol")))
    assert resp.status_code == 200, resp.text
    assert [m.value() for m in broker.read(f"t.auth.{t}", 1)] == [b"by-jwt"]


@pytest.mark.parametrize("why", ["expired", "not-yet-valid", "wrong-issuer", "wrong-audience",
                                 "wrong-key"])
def test_a_bad_token_is_401_invalid_token(gw: Gateway, keys: Keys, broker: Broker,
                                          why: str) -> None:
    now = int(time.time())
    token = {
        "expired": lambda: keys.token(exp=now - 3600, iat=now - 7200),
        "not-yet-valid": lambda: keys.token(nbf=now + 3600),
        "wrong-issuer": lambda: keys.token(iss="https://elsewhere.test"),
        "wrong-audience": lambda: keys.token(aud="someone-else"),
        "wrong-key": lambda: keys.token(key=keys.other),
    }[why]()
    t = tenant()
    resp = post(gw, f"/v1/publish/in/{t}/x", b"refused", **bearer(token))
    assert resp.status_code == 401, resp.text
    basic_challenge, bearer_challenge = resp.challenges
    assert basic_challenge == CHALLENGES[0]
    assert bearer_challenge.startswith('Bearer realm="lastmile", error="invalid_token"'), \
        bearer_challenge
    assert broker.read_all(f"t.auth.{t}") == []


def test_not_allowed_by_a_rule_is_403_on_every_endpoint(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    for path, body, headers in three_endpoints(t, "alice"):
        wrong = post(gw, path, body, **headers, **basic("bob", "not-bobs"))
        assert wrong.status_code == 401, (path, wrong.text)
        bob = post(gw, path, body, **headers, **basic("bob", "bob-pw"))
        assert bob.status_code == 403, (path, bob.text)
        alice = post(gw, path, body, **headers, **basic("alice", "alice-pw"))
        assert alice.status_code == 200, (path, alice.text)
        if path.startswith("/topics/"):
            assert bob.json()["error_code"] == 40301
    assert len(broker.read(f"t.alice.{t}", 2)) == 2  # alice's publish and batch, only
    assert len(broker.read(f"t.rest.{t}", 1)) == 1


def test_users_sharing_an_x_client_id_get_their_own_idempotent_answers(
        gw: Gateway, broker: Broker) -> None:
    t = tenant()
    same = {"X-Client-Id": "shared-phone", "Idempotency-Key": f"key-{t}"}
    a = post(gw, f"/v1/publish/in/{t}/x", b"same body", **same, **basic("alice", "alice-pw"))
    b = post(gw, f"/v1/publish/in/{t}/x", b"same body", **same, **basic("bob", "bob-pw"))
    assert a.status_code == b.status_code == 200
    assert a.json()["deliveries"] != b.json()["deliveries"]  # bob's own produce
    again = post(gw, f"/v1/publish/in/{t}/x", b"same body", **same,
                 **basic("alice", "alice-pw"))
    assert again.json() == a.json()  # alice's retry: her first answer
    assert len(broker.read(f"t.auth.{t}", 2)) == 2


def test_one_users_rate_limit_does_not_limit_another(gw: Gateway) -> None:
    t = tenant()
    device = {"X-Client-Id": f"phone-{t}"}
    codes = [post(gw, f"/v1/publish/in/{t}/x", b"x", **device,
                  **basic("alice", "alice-pw")).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 200, 429]
    bob = post(gw, f"/v1/publish/in/{t}/x", b"x", **device, **basic("bob", "bob-pw"))
    assert bob.status_code == 200, bob.text


def test_failing_address_is_slowed(tmp_path: Path, broker: Broker, keys: Keys) -> None:
    """Wrong passwords from one address go through the Authenticator's throttle."""
    settings = auth_settings(tmp_path, keys, auth__failures_before_delay=2)
    with http_gateway(tmp_path, broker.bootstrap, RULES, **settings) as gw:
        t = tenant()
        for _ in range(2):
            assert post(gw, f"/v1/publish/in/{t}/x", **basic("alice", "guess")
                        ).status_code == 401
        started = time.monotonic()
        assert post(gw, f"/v1/publish/in/{t}/x", **basic("alice", "guess")).status_code == 401
        assert time.monotonic() - started >= 0.25  # held at least the first delay


def test_anonymous_mode_serves_the_readme_walkthrough(tmp_path: Path, broker: Broker,
                                                      rules_dir: Path) -> None:
    """allow_anonymous: true, the shipped rules, the README's curl command."""
    user = uuid.uuid4().hex
    with http_gateway(tmp_path, broker.bootstrap, "rules: []\n",
                      rules__dir=str(rules_dir)) as gw:
        out = subprocess.run(
            ["curl", "-s", "-w", "\n%{http_code}", "-H", "X-Client-Id: phone-1",
             "-d", json.dumps({"user": {"id": user}}),
             f"{gw.url}/v1/publish/app/shop/events/click"],
            check=True, capture_output=True, text=True, timeout=30).stdout
        body, status = out.rsplit("\n", 1)
        assert status == "200", body
        (delivery,) = json.loads(body)["deliveries"]
        assert delivery["topic"] == "mobile.events"
        records = broker.read("mobile.events", 1)
        assert any(r.key() == user.encode() for r in records)


def test_a_client_certificate_is_the_third_way_in(tmp_path: Path, broker: Broker,
                                                  keys: Keys) -> None:
    """HTTPS with optional client certificates: the verified CN is the identity that
    ``allow.identities`` checks; no certificate and no credentials is still 401."""
    pki = Pki(tmp_path / "pki")
    (crt, key), device, intruder = (pki.issue("server", "localhost", server=True),
                                    pki.issue("device", "device-7"),
                                    pki.issue("intruder", "intruder"))
    https = {"enabled": True, "host": "127.0.0.1", "port": free_port(), "certfile": str(crt),
             "keyfile": str(key), "cafile": str(pki.ca)}
    settings = auth_settings(tmp_path, keys, listeners__https=https)
    with http_gateway(tmp_path, broker.bootstrap, RULES, **settings) as gw:
        gw.ports["https"] = https["port"]

        def tls(cert: tuple[Path, Path] | None) -> ssl.SSLContext:
            context = ssl.create_default_context(cafile=str(pki.ca))
            if cert is not None:
                context.load_cert_chain(*cert)
            return context

        t = tenant()
        path = f"/v1/publish/dev/{t}/temp"
        bare = post(gw, path, b"no-cert", tls=tls(None))
        assert bare.status_code == 401 and bare.challenges == CHALLENGES, bare.text
        assert post(gw, path, b"intruder", tls=tls(intruder)).status_code == 403
        alice = post(gw, path, b"alice", tls=tls(None), **basic("alice", "alice-pw"))
        assert alice.status_code == 403, alice.text  # known, but not a device-* identity
        ok = post(gw, path, b"device", tls=tls(device), **{"X-Client-Id": "d7"})
        assert ok.status_code == 200, ok.text
        (record,) = broker.read(f"t.dev.{t}", 1)
        assert (record.value(), record.key()) == (b"device", b"d7")
