"""JWTs as MQTT passwords and Bearer tokens, verified against a JWKS file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.auth import AuthRefusal, Credentials, Identity, Verdict
from gateway.auth.check import Authenticator
from gateway.auth.jwks import looks_like_jwt, text_claims
from gateway.config.schema import Auth, Jwt
from gateway.errors import ConfigError
from tests.support.jwt_keys import Key, hmac_with_public_key, unsigned_token, write_jwks

pytestmark = pytest.mark.unit

ISS = "https://auth.example.com"


@pytest.fixture(scope="module")
def rsa1() -> Key:
    return Key("RSA", "rsa-1")


@pytest.fixture(scope="module")
def ec1() -> Key:
    return Key("EC", "ec-1")


@pytest.fixture(scope="module")
def rsa2() -> Key:
    return Key("RSA", "rsa-2")


def make(path: Path, **jwt_cfg: object) -> Authenticator:
    cfg = Jwt(jwks_file=str(path), **jwt_cfg)  # type: ignore[arg-type]
    return Authenticator(Auth(jwt=cfg), poll_s=0.02)


@pytest.fixture
async def auth(tmp_path: Path, rsa1: Key, ec1: Key) -> AsyncIterator[Authenticator]:
    write_jwks(tmp_path / "jwks.json", rsa1, ec1)
    a = make(tmp_path / "jwks.json", issuer=ISS, audience="lastmile", leeway_s=5)
    await a.start()
    yield a
    await a.close()


def bearer(token: bytes, **kw: object) -> Credentials:
    return Credentials(password=token, bearer=True, peer_host="10.1.1.1", **kw)  # type: ignore[arg-type]


async def full(auth: Authenticator, creds: Credentials) -> Verdict:
    verdict = auth.quick(creds)
    return verdict if verdict is not None else await auth.verify(creds)


def refused(verdict: Verdict, why: str = "") -> bool:
    return (isinstance(verdict, AuthRefusal) and verdict.reason == "bad_credentials"
            and why in verdict.message)


async def test_valid_tokens_rsa_and_ec(auth: Authenticator, rsa1: Key, ec1: Key) -> None:
    token = rsa1.token(iss=ISS, aud="lastmile", groups=["a", "b"], admin=False, n=3,
                       meta={"x": 1}, nothing=None)
    verdict = auth.quick(bearer(token, cert_identity="cn-1"))  # signatures are cheap: no verify
    assert isinstance(verdict, Identity)
    assert (verdict.method, verdict.name, verdict.cert) == ("jwt", "device-1", "cn-1")
    assert verdict.claims is not None
    assert verdict.claims["groups"] == "a,b" and verdict.claims["admin"] == "false"
    assert verdict.claims["n"] == "3" and verdict.claims["iss"] == ISS
    assert "meta" not in verdict.claims
    assert verdict.expires_at is not None and verdict.expires_at > time.time()
    ec_token = ec1.token(iss=ISS, aud=["other", "lastmile"], sub="sensor-9")
    assert getattr(auth.quick(bearer(ec_token)), "name", None) == "sensor-9"
    assert auth.accepted["jwt"] == 2


async def test_jwt_as_mqtt_password(auth: Authenticator, rsa1: Key) -> None:
    token = rsa1.token(iss=ISS, aud="lastmile")
    creds = Credentials(username="whatever-the-client-says", password=token)
    verdict = auth.quick(creds)
    assert isinstance(verdict, Identity) and verdict.name == "device-1"
    assert refused(auth.quick(Credentials(username="u", password=b"not a token")))


@pytest.mark.parametrize("case", [
    "expired", "not_yet_valid", "wrong_issuer", "no_issuer", "wrong_audience", "no_audience",
    "missing_sub", "empty_sub", "missing_exp", "unknown_kid", "alg_not_allowed"])
async def test_refused_tokens(auth: Authenticator, rsa1: Key, case: str) -> None:
    good = {"iss": ISS, "aud": "lastmile"}
    claims: dict[str, object] = {
        "expired": {**good, "ttl": -60},  # past the 5 s leeway
        "not_yet_valid": {**good, "nbf": int(time.time()) + 60},
        "wrong_issuer": {**good, "iss": "https://evil.example.com"},
        "no_issuer": {**good, "iss": None},
        "wrong_audience": {**good, "aud": "someone-else"},
        "no_audience": {**good, "aud": None},
        "missing_sub": {**good, "sub": None},
        "empty_sub": {**good, "sub": ""},
        "missing_exp": {**good, "exp": None},
        "unknown_kid": {**good, "kid": "nobody"},
        "alg_not_allowed": {**good, "alg": "PS256"},
    }[case]  # type: ignore[assignment]
    verdict = await full(auth, bearer(rsa1.token(**claims)))  # type: ignore[arg-type]
    assert refused(verdict, "invalid token"), verdict
    assert auth.refused["bad_credentials"] == 1 and auth.accepted["jwt"] == 0


async def test_leeway_accepts_small_clock_skew(auth: Authenticator, rsa1: Key) -> None:
    token = rsa1.token(iss=ISS, aud="lastmile", ttl=-2, nbf=int(time.time()) + 2)
    assert isinstance(auth.quick(bearer(token)), Identity)


async def test_wrong_key_alg_none_and_hmac_confusion(auth: Authenticator, rsa1: Key) -> None:
    impostor = Key("RSA", "rsa-1")  # same kid, another key
    assert refused(await full(auth, bearer(impostor.token(iss=ISS, aud="lastmile"))),
                   "signature")
    payload = {"sub": "root", "iss": ISS, "aud": "lastmile", "exp": int(time.time()) + 60}
    assert refused(await full(auth, bearer(unsigned_token(payload))), "'none'")
    assert refused(await full(auth, bearer(hmac_with_public_key(rsa1, payload))), "'HS256'")
    assert refused(await full(auth, bearer(b"a.b.c")))
    assert auth.accepted["jwt"] == 0


async def test_tokens_are_cached_until_they_expire(tmp_path: Path, rsa1: Key) -> None:
    write_jwks(tmp_path / "jwks.json", rsa1)
    auth = make(tmp_path / "jwks.json", leeway_s=0)
    await auth.start()
    assert auth.jwt is not None
    token = rsa1.token(ttl=2)
    assert isinstance(auth.quick(bearer(token)), Identity)
    assert len(auth.jwt._cache) == 1
    assert isinstance(auth.quick(bearer(token)), Identity)
    deadline = time.monotonic() + 30
    while isinstance(auth.quick(bearer(token)), Identity):  # cached only until exp
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert refused(auth.quick(bearer(token)), "expired")
    await auth.close()


async def test_jwks_file_rotation(tmp_path: Path, rsa1: Key, rsa2: Key) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa1)
    auth = make(path)
    await auth.start()
    old, new = rsa1.token(), rsa2.token(sub="device-2")
    try:
        assert isinstance(auth.quick(bearer(old)), Identity)
        assert refused(await full(auth, bearer(new)), "no key")
        write_jwks(path, rsa1, rsa2)  # the issuer rotates a key in: no restart
        verdict = await full(auth, bearer(new))
        assert isinstance(verdict, Identity) and verdict.name == "device-2"
        write_jwks(path, rsa2)  # ... and the old key out: its (cached) tokens stop working
        deadline = time.monotonic() + 30
        while isinstance(auth.quick(bearer(old)), Identity):
            assert time.monotonic() < deadline, "the removed key still verifies"
            await asyncio.sleep(0.02)
        assert refused(await full(auth, bearer(old)), "no key")
        assert isinstance(auth.quick(bearer(new)), Identity)
        path.write_text("{not json")  # a broken file keeps the keys in force
        deadline = time.monotonic() + 30
        assert auth.jwt is not None
        while auth.jwt._file_sig != (path.stat().st_dev, path.stat().st_ino,
                                     path.stat().st_size, path.stat().st_mtime_ns):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert isinstance(auth.quick(bearer(new)), Identity)
    finally:
        await auth.close()


async def test_token_without_kid_tries_the_keys_of_its_type(tmp_path: Path, rsa1: Key,
                                                            rsa2: Key, ec1: Key) -> None:
    write_jwks(tmp_path / "jwks.json", ec1, rsa1, rsa2)
    auth = make(tmp_path / "jwks.json")
    await auth.start()
    assert isinstance(auth.quick(bearer(rsa2.token(kid=None))), Identity)
    assert isinstance(auth.quick(bearer(ec1.token(kid=None))), Identity)
    await auth.close()


async def test_bad_jwks_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"kid": "not a set"}')
    with pytest.raises(ConfigError, match="not a JWKS"):
        await make(path).start()


@pytest.mark.parametrize("algs", [["none"], ["HS256"], ["RS256", "HS512"], [], ["XX1"]])
def test_unsafe_algorithms_are_a_config_error(tmp_path: Path, algs: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"auth\.jwt\.algorithms"):
        make(tmp_path / "jwks.json", algorithms=algs)


@pytest.mark.parametrize(("key", "value"), [("refresh_s", 0), ("leeway_s", -1)])
def test_bad_timings_are_a_config_error(tmp_path: Path, key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"auth\.jwt\.{key}"):
        make(tmp_path / "jwks.json", **{key: value})


def test_jwt_shape_and_claims_text() -> None:
    key = Key("EC", "e")
    assert looks_like_jwt(key.token())
    assert not looks_like_jwt(b"hunter2") and not looks_like_jwt(b"a.b.c")
    assert not looks_like_jwt(b"x" * 20_000)
    assert text_claims({"a": 1.5, "b": True, "c": [1, "x"], "d": [[1]], "e": None}) == {
        "a": "1.5", "b": "true", "c": "1,x"}
