"""The Authenticator: who gets in, what is counted, the throttle, the cache, reloads."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.auth import ANONYMOUS, AuthRefusal, Credentials, Identity, Verdict
from gateway.auth.check import Authenticator
from gateway.auth.passwd import hash_password
from gateway.config.schema import Auth, Jwt
from gateway.errors import ConfigError

pytestmark = pytest.mark.unit


class Log:
    """Records structlog-style calls."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **kw: self.events.append((event, kw))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.events if name == event]


def write_users(path: Path, users: dict[str, str], iterations: int = 101) -> None:
    path.write_text("".join(
        f"{u}:{hash_password(p.encode(), iterations=iterations).encode()}\n"
        for u, p in users.items()))


async def full(auth: Authenticator, creds: Credentials) -> Verdict:
    """What a listener does: quick, else delay, else verify."""
    verdict = auth.quick(creds)
    if verdict is None:
        verdict = await auth.verify(creds)
    return verdict


@pytest.fixture
async def pw_auth(tmp_path: Path) -> AsyncIterator[Authenticator]:
    path = tmp_path / "passwd"
    write_users(path, {"alice": "secret", "bob": "hunter2"})
    auth = Authenticator(Auth(password_file=str(path)), log=Log(), poll_s=3600)
    await auth.start()
    yield auth
    await auth.close()


async def test_nothing_presented() -> None:
    closed = Authenticator(Auth(allow_anonymous=False), log=Log())
    assert closed.quick(Credentials()) == AuthRefusal(
        reason="missing", message="authentication required")
    assert closed.quick(Credentials(cert_identity="dev-7")) == Identity(
        method="certificate", cert="dev-7")
    open_ = Authenticator(Auth(allow_anonymous=True), log=Log())
    assert open_.quick(Credentials()) is ANONYMOUS
    assert closed.accepted["certificate"] == 1 and closed.refused["missing"] == 1
    assert open_.accepted["anonymous"] == 1


async def test_an_unverified_username_is_never_an_identity() -> None:
    creds = Credentials(username="admin", password=b"whatever")
    verdict = Authenticator(Auth(allow_anonymous=True), log=Log()).quick(creds)
    assert verdict is ANONYMOUS and isinstance(verdict, Identity) and verdict.name is None
    closed = Authenticator(Auth(allow_anonymous=False), log=Log())
    assert isinstance(closed.quick(creds), AuthRefusal)
    assert closed.quick(Credentials(username="admin")).reason == "missing"  # type: ignore[union-attr]
    assert closed.quick(Credentials(username="admin", cert_identity="c")) == Identity(
        method="certificate", cert="c")


async def test_bearer_without_jwt_configured_is_bad_credentials() -> None:
    auth = Authenticator(Auth(allow_anonymous=True), log=Log())
    verdict = auth.quick(Credentials(password=b"a.b.c", bearer=True))
    assert isinstance(verdict, AuthRefusal) and verdict.reason == "bad_credentials"
    jwt_auth = Authenticator(Auth(jwt=Jwt(jwks_file="/nonexistent")), log=Log())
    verdict = jwt_auth.quick(Credentials(bearer=True))
    assert isinstance(verdict, AuthRefusal) and verdict.reason == "bad_credentials"
    deep = base64.urlsafe_b64encode(b"[" * 12_000) + b".e30.x"
    verdict = jwt_auth.quick(Credentials(username="u", password=deep))
    assert isinstance(verdict, AuthRefusal) and verdict.reason == "bad_credentials"


async def test_password_file_verdicts(pw_auth: Authenticator) -> None:
    good = Credentials(username="alice", password=b"secret", cert_identity="crt")
    assert pw_auth.quick(good) is None  # needs hashing the first time
    assert await pw_auth.verify(good) == Identity(method="password", name="alice", cert="crt")
    for creds in [Credentials(username="alice", password=b"guess-xyz"),
                  Credentials(username="mallory", password=b"secret"),
                  Credentials(username="alice"),
                  Credentials(password=b"secret")]:
        verdict = await full(pw_auth, creds)
        assert isinstance(verdict, AuthRefusal), creds
        assert verdict.reason == "bad_credentials"
        assert "secret" not in verdict.message and "guess-xyz" not in verdict.message
    assert (await full(pw_auth, Credentials())).reason == "missing"  # type: ignore[union-attr]
    assert pw_auth.accepted["password"] == 1
    assert pw_auth.refused == {"missing": 1, "bad_credentials": 4}


async def test_unknown_user_costs_a_hash_like_a_known_one(pw_auth: Authenticator) -> None:
    assert pw_auth.quick(Credentials(username="mallory", password=b"x")) is None


async def test_verified_credentials_are_cached_without_plaintext(pw_auth: Authenticator) -> None:
    creds = Credentials(username="bob", password=b"hunter2")
    await pw_auth.verify(creds)
    hit = pw_auth.quick(creds)
    assert hit == Identity(method="password", name="bob")
    assert pw_auth.quick(Credentials(username="bob", password=b"hunter2",
                                     cert_identity="x")) == Identity(
        method="password", name="bob", cert="x")
    assert pw_auth.quick(Credentials(username="bob", password=b"hunter3")) is None
    for user, digest in pw_auth._cache:
        assert b"hunter2" not in digest and user == "bob"
    assert pw_auth.accepted["password"] == 3


async def test_cache_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    write_users(path, {f"u{i}": "pw" for i in range(5)}, iterations=1)
    auth = Authenticator(Auth(password_file=str(path)), log=Log(), cache_size=3)
    await auth.start()
    for i in range(5):
        await auth.verify(Credentials(username=f"u{i}", password=b"pw"))
    assert len(auth._cache) == 3
    assert auth.quick(Credentials(username="u0", password=b"pw")) is None  # evicted
    assert auth.quick(Credentials(username="u4", password=b"pw")) is not None
    await auth.close()


async def test_password_file_reload(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    write_users(path, {"alice": "one"})
    log = Log()
    auth = Authenticator(Auth(password_file=str(path)), log=log, poll_s=0.02)
    await auth.start()
    try:
        assert isinstance(await auth.verify(Credentials(username="alice", password=b"one")),
                          Identity)
        write_users(path, {"alice": "two", "carol": "three"})
        for _ in range(2000):  # the watch task, not the test, must notice the change
            if auth.password_reloads:
                break
            await asyncio.sleep(0.01)
        assert log.named("auth_password_file_reloaded")[-1]["users"] == 2
        # the cached old password stops working with the file that replaced it
        assert auth.quick(Credentials(username="alice", password=b"one")) is None
        assert isinstance(await auth.verify(Credentials(username="alice", password=b"one")),
                          AuthRefusal)
        assert isinstance(await auth.verify(Credentials(username="carol", password=b"three")),
                          Identity)
        # a broken file is logged and the previous users stay in force
        path.write_text(path.read_text() + "garbage\n")
        auth.poll()
        failed = log.named("auth_password_file_reload_failed")
        assert failed and ":3:" in failed[-1]["error"] and failed[-1]["keeping_users"] == 2
        assert isinstance(await auth.verify(Credentials(username="carol", password=b"three")),
                          Identity)
    finally:
        await auth.close()


async def test_malformed_password_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("alice:plaintext\n")
    with pytest.raises(ConfigError) as info:
        await Authenticator(Auth(password_file=str(path)), log=Log()).start()
    assert info.value.line == 1 and info.value.file == str(path)


async def test_verify_result_from_a_replaced_file_is_not_cached(pw_auth: Authenticator,
                                                               tmp_path: Path) -> None:
    creds = Credentials(username="alice", password=b"secret")
    task = asyncio.create_task(pw_auth.verify(creds))
    await asyncio.sleep(0)  # the hash is running; now the file changes under it
    pw_auth.reload_password_file()
    assert isinstance(await task, Identity)
    assert pw_auth.quick(creds) is None


# --- throttle --------------------------------------------------------------------------


async def test_throttle_is_per_address(pw_auth: Authenticator) -> None:
    now = [1000.0]
    pw_auth.clock = lambda: now[0]
    bad = Credentials(username="alice", password=b"guess", peer_host="10.0.0.1")
    delays = []
    for _ in range(12):
        delays.append(pw_auth.delay_for("10.0.0.1"))
        await pw_auth.verify(bad)
    assert delays[:5] == [0.0] * 5  # failures_before_delay = 5 failures go unhindered
    assert delays[5:8] == [0.25, 0.5, 1.0]
    assert delays[-1] == 10.0  # capped at max_failure_delay_s
    assert pw_auth.throttled == 7
    assert pw_auth.delay_for("10.0.0.2") == 0.0  # the neighbour is not slowed
    good = Credentials(username="alice", password=b"secret", peer_host="10.0.0.2")
    assert isinstance(await pw_auth.verify(good), Identity)
    # anonymous attempts are not guessing: they never count
    for _ in range(10):
        pw_auth.quick(Credentials(peer_host="10.0.0.3"))
    assert pw_auth.delay_for("10.0.0.3") == 0.0
    now[0] += 61  # a quiet minute forgets
    assert pw_auth.delay_for("10.0.0.1") == 0.0
    await pw_auth.verify(bad)
    assert pw_auth.failures("10.0.0.1") == 1


async def test_throttle_table_is_bounded(tmp_path: Path) -> None:
    auth = Authenticator(Auth(allow_anonymous=True), log=Log(), throttle_size=4)
    for i in range(10):
        auth.quick(Credentials(password=b"x.y.z", bearer=True, peer_host=f"h{i}"))
    assert len(auth._failures) == 4 and auth.failures("h9") == 1 and auth.failures("h0") == 0


# --- the loop keeps running while hashes are computed ----------------------------------


async def test_verification_does_not_block_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    write_users(path, {"slow": "pw"}, iterations=200_000)
    auth = Authenticator(Auth(password_file=str(path)), log=Log())
    await auth.start()
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    tick_task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    ticks = 0
    checks = [asyncio.create_task(auth.verify(Credentials(username="slow", password=p)))
              for p in [b"pw", b"no"] * 4]
    # Ticks counted while every check is still in flight: a hash on the loop would
    # leave no turn for the ticker until it finished.
    seen_while_hashing = 0
    while not any(t.done() for t in checks) and seen_while_hashing < 50:
        seen_while_hashing = ticks
        await asyncio.sleep(0)
    results = await asyncio.gather(*checks)
    done = True
    await tick_task
    await auth.close()
    assert seen_while_hashing >= 50, seen_while_hashing
    assert [isinstance(r, Identity) for r in results] == [True, False] * 4


def test_unknown_users_cost_the_files_usual_hash() -> None:
    from gateway.auth.check import _dummy_for
    from gateway.auth.passwd import parse_hash

    six = parse_hash("$6$9SJ5ICpF/B4QcYek$1qCgbo4FYbRjAna3qgnZxwNsfSP5GVvU1/7ZryZWVUoUr8BnEDVBE"
                     "jQGSPyCbhVXtgroUzWIMizAOKSUyObQ0A==")
    slow = hash_password(b"x", iterations=1000)
    dummy = _dummy_for({"a": six, "b": slow, "c": slow})
    assert (dummy.kind, dummy.iterations) == ("7", 1000)
    assert _dummy_for({"a": six}).kind == "6"
    assert not dummy.matches(b"") and not _dummy_for({}).matches(b"")
