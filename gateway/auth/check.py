"""The credential check every listener calls: password file, JWT, certificate, anonymous.

Verdicts, for what a client presented:

- nothing: its client-certificate identity (method "certificate") if the TLS
  layer verified one; else ``ANONYMOUS`` when ``allow_anonymous``; else "missing".
- a JWT (an HTTP Bearer token, or an MQTT password shaped like a JWT while
  ``auth.jwt`` is configured): verified against the JWKS; the identity is its
  ``sub`` (the username, if any, is ignored).  A Bearer token without
  ``auth.jwt`` is "bad_credentials".
- a username and password, with a password file: the password must match the
  user's hash, else "bad_credentials" (unknown users cost the same hashing, so
  timing does not tell which users exist).  A username without a password, or a
  password without a username, is "bad_credentials".
- a username with nothing configured that could verify it: the username proves
  nothing, so it is never an identity: the certificate identity, else
  ``ANONYMOUS`` (name None) when ``allow_anonymous``, else "missing".  (With
  ``auth.jwt`` configured, a password that is not a JWT is "bad_credentials".)

Every identity keeps the certificate identity when there is one.

``quick`` answers everything that needs no hashing (the cases above without a
password check, JWTs, and password checks found in the cache); ``verify`` runs
the rest, with PBKDF2/SHA-512 on a small thread pool (hashlib releases the GIL),
so the event loop keeps serving while a connect storm is checked.

The cache holds verified (username, keyed BLAKE2b of the password) pairs, never
a plaintext password; the BLAKE2b key is random per process.  It is emptied when
the password file changes.  Failures are not cached.

The throttle: a source address that gave ``failures_before_delay`` wrong
credentials has its next hashed checks held back by ``delay_for`` (0.25 s,
doubling, at most ``max_failure_delay_s``); its count is forgotten after a quiet
minute.  Only "bad_credentials" counts (a client trying anonymous first is not
guessing), and only checks that reach ``verify`` are held, so a client whose
credentials are cached is never slowed by a neighbour behind the same NAT.

The password file is re-read when it changes on disk (stat polled every
``poll_s``); a malformed new file is logged and the previous one kept.  At
``start`` a malformed file is a ``ConfigError`` naming the file and line.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gateway.auth import ANONYMOUS, AuthRefusal, Credentials, Identity, Verdict
from gateway.auth import Authenticator as AuthenticatorProtocol
from gateway.auth.jwks import JwtVerifier, TokenClaims, check_config, looks_like_jwt
from gateway.auth.passwd import (
    DEFAULT_ITERATIONS,
    SALT_BYTES,
    PasswordHash,
    load_password_file,
)
from gateway.auth.watch import Signature, signature
from gateway.config.schema import Auth
from gateway.errors import ConfigError

METHODS = ("anonymous", "password", "jwt", "certificate")
REASONS = ("missing", "bad_credentials")
FORGET_AFTER_S = 60.0  # a quiet minute clears an address's failure count
FIRST_DELAY_S = 0.25



def _dummy_for(users: dict[str, PasswordHash]) -> PasswordHash:
    """What an unknown user is checked against: the file's most common hash kind and
    iteration count, so unknown users cost what known ones do (no user enumeration by
    timing).  Its digest of zeros matches nothing."""
    kinds = Counter((h.kind, h.iterations) for h in users.values())
    kind, iterations = kinds.most_common(1)[0][0] if kinds else ("7", DEFAULT_ITERATIONS)
    return PasswordHash(kind, b"\0" * SALT_BYTES, b"\0" * 64, iterations)


class Authenticator:
    """Implements ``gateway.auth.Authenticator``; one per worker process."""

    def __init__(self, config: Auth, *, log: Any = None, poll_s: float = 1.0,
                 cache_size: int = 10_000, throttle_size: int = 10_000,
                 hash_threads: int = 2, jwks_refetch_min_s: float = 30.0) -> None:
        self.config = config
        self.log = log if log is not None else structlog.get_logger("lastmile.auth")
        self.poll_s = poll_s
        self.accepted: dict[str, int] = dict.fromkeys(METHODS, 0)
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.throttled = 0  # attempts delay_for held back
        self.password_reloads = 0
        self.password_reload_failures = 0
        self.jwt: JwtVerifier | None = None
        if config.jwt is not None:
            check_config(config.jwt)
            self.jwt = JwtVerifier(config.jwt, log=self.log, cache_size=cache_size,
                                   refetch_min_s=jwks_refetch_min_s)
        self._users: dict[str, PasswordHash] = {}
        self._dummy = _dummy_for({})
        self._users_sig: Signature = None
        self._generation = 0  # bumped when the password file changes
        self._cache: OrderedDict[tuple[str, bytes], Identity] = OrderedDict()
        self._cache_size = cache_size
        self._cache_key = secrets.token_bytes(32)
        self.clock: Callable[[], float] = time.monotonic  # the throttle's clock (tests set it)
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._throttle_size = throttle_size
        self._hash_threads = hash_threads
        self._executor: ThreadPoolExecutor | None = None
        self._watch_task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Load the password file and the JWKS (ConfigError if malformed); start watching."""
        path = self.config.password_file
        if path is not None:
            self._users_sig = signature(path)
            self._users = load_password_file(path)
            self._dummy = _dummy_for(self._users)
            self.log.info("auth_password_file_loaded", file=path, users=len(self._users))
        if self.jwt is not None:
            await self.jwt.start()
        if self._watch_task is None and (path is not None or self.jwt is not None):
            self._watch_task = asyncio.create_task(self._watch(), name="auth-watch")

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        if self.jwt is not None:
            await self.jwt.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                self.poll()
            except Exception:  # a watcher that dies silently would freeze the users
                self.log.exception("auth_watch_failed")

    def poll(self) -> None:
        """Reload what changed on disk (the watch task calls this; tests and SIGHUP may)."""
        path = self.config.password_file
        if path is not None:
            sig = signature(path)
            if sig != self._users_sig:
                self._users_sig = sig
                self.reload_password_file()
        if self.jwt is not None:
            self.jwt.poll()

    def reload_password_file(self) -> bool:
        """Swap in the file as it is now; on any error log it and keep the previous users."""
        path = self.config.password_file
        if path is None:
            return False
        try:
            users = load_password_file(path)
        except ConfigError as exc:
            self.password_reload_failures += 1
            self.log.error("auth_password_file_reload_failed", file=path, error=str(exc),
                           keeping_users=len(self._users))
            return False
        self._users = users
        self._dummy = _dummy_for(users)
        self._generation += 1
        self._cache.clear()
        self.password_reloads += 1
        self.log.info("auth_password_file_reloaded", file=path, users=len(users))
        return True

    # --- the checks ------------------------------------------------------------

    def quick(self, creds: Credentials) -> Verdict | None:
        verdict = self._decide(creds)
        return None if verdict is None else self._count(creds, verdict)

    async def verify(self, creds: Credentials) -> Verdict:
        verdict = self._decide(creds)
        if verdict is None:
            if self._is_jwt(creds):  # _decide answered every other JWT case
                assert self.jwt is not None and creds.password is not None
                verdict = self._jwt_verdict(await self.jwt.check_async(creds.password), creds)
            else:
                verdict = await self._check_password(creds)
        return self._count(creds, verdict)

    def _is_jwt(self, creds: Credentials) -> bool:
        if creds.bearer:
            return True
        return (self.jwt is not None and creds.password is not None
                and looks_like_jwt(creds.password))

    def _decide(self, creds: Credentials) -> Verdict | None:
        """The verdict when it needs no hashing; None when ``verify`` must work for it."""
        cert = creds.cert_identity
        if self._is_jwt(creds):
            if self.jwt is None:
                return _bad("bearer tokens are not accepted here (auth.jwt is not configured)")
            if not creds.password:
                return _bad("empty bearer token")
            result = self.jwt.check(creds.password)
            return None if result is None else self._jwt_verdict(result, creds)
        if creds.username is None and creds.password is None:
            return self._unproven(cert)
        if self.config.password_file is not None:
            if creds.username is None:
                return _bad("a password without a username")
            if creds.password is None:
                return _bad(f"no password given for user {creds.username!r}")
            hit = self._cache_get(self._key(creds.username, creds.password))
            if hit is None:
                return None
            return hit if cert is None else msgspec.structs.replace(hit, cert=cert)
        if self.jwt is not None and creds.password is not None:
            return _bad("the password is not a valid JWT")
        return self._unproven(cert)

    def _unproven(self, cert: str | None) -> Verdict:
        if cert is not None:
            return Identity(method="certificate", cert=cert)
        if self.config.allow_anonymous:
            return ANONYMOUS
        return AuthRefusal(reason="missing", message="authentication required")

    def _jwt_verdict(self, result: TokenClaims | str, creds: Credentials) -> Verdict:
        if isinstance(result, str):
            return _bad(f"invalid token: {result}")
        return Identity(method="jwt", name=result.sub, cert=creds.cert_identity,
                        claims=result.claims, expires_at=result.exp)

    async def _check_password(self, creds: Credentials) -> Verdict:
        user, password = creds.username, creds.password
        assert user is not None and password is not None
        entry = self._users.get(user)
        generation = self._generation
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._hash_threads,
                                                thread_name_prefix="lastmile-auth")
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._executor, (entry or self._dummy).matches, password)
        if not ok or entry is None:
            return _bad(f"unknown user or wrong password for {user!r}")
        identity = Identity(method="password", name=user)
        if generation == self._generation:  # not verified against a file since replaced
            self._cache_put(self._key(user, password), identity)
        if creds.cert_identity is not None:
            return msgspec.structs.replace(identity, cert=creds.cert_identity)
        return identity

    # --- cache -----------------------------------------------------------------

    def _key(self, user: str, password: bytes) -> tuple[str, bytes]:
        digest = hashlib.blake2b(password, key=self._cache_key, digest_size=32).digest()
        return (user, digest)

    def _cache_get(self, key: tuple[str, bytes]) -> Identity | None:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
        return hit

    def _cache_put(self, key: tuple[str, bytes], identity: Identity) -> None:
        self._cache[key] = identity
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # --- counting and the throttle --------------------------------------------

    def _count(self, creds: Credentials, verdict: Verdict) -> Verdict:
        if isinstance(verdict, Identity):
            self.accepted[verdict.method] += 1
            return verdict
        self.refused[verdict.reason] += 1
        if verdict.reason == "bad_credentials":
            self._failed(creds.peer_host)
        self.log.debug("auth_refused", reason=verdict.reason, peer=creds.peer_host,
                       message=verdict.message)
        return verdict

    def _failed(self, host: str) -> None:
        if not host:
            return  # an unknown source must not share one bucket with every other
        now = self.clock()
        previous = self._failures.pop(host, None)
        count = 1 if previous is None or now - previous[1] > FORGET_AFTER_S else previous[0] + 1
        self._failures[host] = (count, now)
        while len(self._failures) > self._throttle_size:
            self._failures.popitem(last=False)

    def failures(self, host: str) -> int:
        """Recent failures counted against ``host`` (0 once forgotten)."""
        record = self._failures.get(host)
        if record is None or self.clock() - record[1] > FORGET_AFTER_S:
            return 0
        return record[0]

    def delay_for(self, peer_host: str) -> float:
        count = self.failures(peer_host)
        if count == 0:
            self._failures.pop(peer_host, None)
            return 0.0
        excess = count - self.config.failures_before_delay
        if excess < 0:
            return 0.0
        self.throttled += 1
        return float(min(self.config.max_failure_delay_s, FIRST_DELAY_S * 2 ** min(excess, 40)))


def _bad(message: str) -> AuthRefusal:
    return AuthRefusal(reason="bad_credentials", message=message)


if TYPE_CHECKING:  # mypy proves the class satisfies the listeners' protocol

    def _conforms(auth: Authenticator) -> AuthenticatorProtocol:
        return auth
