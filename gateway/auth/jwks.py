"""JWT verification against a JWKS (a file, a URL, or both), with PyJWT.

What a token must have to be accepted:

- a header ``alg`` listed in ``auth.jwt.algorithms`` ("none" and HS* are refused
  when the config is loaded: a public JWKS must never double as an HMAC secret);
- a signature by a key of the JWKS: the key named by ``kid``, or, when the token
  names none, any key of the right type.  Keys whose ``use`` is not "sig", and
  symmetric ("oct") keys, are skipped;
- ``exp`` (required: a token without one could never be revoked) and ``nbf`` when
  present, both with ``leeway_s`` of clock skew;
- ``iss`` equal to ``issuer`` and ``aud`` containing ``audience`` when configured;
- a non-empty string ``sub``: the identity's name.

The identity's claims are the token's claims as text: strings as they are,
numbers in decimal, booleans "true"/"false", lists of such values joined with
"," (``"groups": ["a", "b"]`` becomes ``"a,b"``); null and nested objects are
dropped.

Keys: ``jwks_file`` is re-read when it changes on disk (``poll``); ``jwks_url``
is fetched at start and every ``refresh_s``, and again (at most once per
``refetch_min_s``) when a token names a ``kid`` nobody knows, so a key the
issuer just rotated in works at once.  A failed fetch or a malformed new file
keeps the previous keys.  Verified tokens are cached (bounded, by a keyed digest
of the token) until they expire, and the cache is emptied whenever the keys
change, so a removed key stops verifying at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

from gateway.auth.watch import Signature, signature
from gateway.config.schema import Jwt
from gateway.errors import ConfigError

MAX_TOKEN_BYTES = 16_384
MAX_JWKS_BYTES = 1_048_576
# The key type each algorithm family verifies with.
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


@dataclass(frozen=True, slots=True)
class TokenClaims:
    sub: str
    claims: Mapping[str, str]
    exp: float


def check_config(config: Jwt) -> None:
    """ConfigError for settings that would be unsafe or spin: see ``check_algorithms``."""
    check_algorithms(config.algorithms)
    if not config.refresh_s > 0:
        raise ConfigError("must be more than 0", key="auth.jwt.refresh_s")
    if not config.leeway_s >= 0:
        raise ConfigError("must be 0 or more", key="auth.jwt.leeway_s")


def check_algorithms(algorithms: list[str]) -> None:
    """ConfigError unless every algorithm is an asymmetric one PyJWT knows."""
    known = get_default_algorithms()
    if not algorithms:
        raise ConfigError("list at least one algorithm", key="auth.jwt.algorithms")
    for alg in algorithms:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise ConfigError(f"{alg!r} is not allowed (only signatures by a JWKS key: "
                              "RS*, PS*, ES*, EdDSA)", key="auth.jwt.algorithms")
        if alg not in known or alg[:2] not in _KTY:
            raise ConfigError(f"unknown algorithm {alg!r}", key="auth.jwt.algorithms")


def looks_like_jwt(token: bytes) -> bool:
    """Three base64url segments whose first decodes to a JSON object with "alg"."""
    if len(token) > MAX_TOKEN_BYTES or token.count(b".") != 2:
        return False
    head = token.split(b".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # RecursionError: "[[[[..."
        return False
    return isinstance(header, dict) and "alg" in header


def text_claims(payload: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in payload.items():
        if _scalar(value):
            out[name] = _text(value)
        elif isinstance(value, list) and all(_scalar(v) for v in value):
            out[name] = ",".join(_text(v) for v in value)
    return out


def _scalar(value: object) -> bool:
    return isinstance(value, str | int | float)  # bool is an int


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_jwks(data: bytes, source: str) -> list[jwt.PyJWK]:
    """The usable signing keys; ValueError when the document is not a JWKS at all."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWKS (expected {"keys": [...]})')
    keys: list[jwt.PyJWK] = []
    for item in doc["keys"]:
        if not isinstance(item, dict) or item.get("kty") == "oct":
            continue
        if item.get("use", "sig") != "sig":
            continue
        try:
            keys.append(jwt.PyJWK(item))
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue  # an unsupported key must not hide the others
    return keys


class JwtVerifier:
    def __init__(self, config: Jwt, *, log: Any, cache_size: int = 10_000,
                 refetch_min_s: float = 30.0, fetch_timeout_s: float = 10.0) -> None:
        self.config = config
        self.log = log
        self.refetch_min_s = refetch_min_s
        self.fetch_timeout_s = fetch_timeout_s
        self.fetches_ok = 0
        self.fetches_failed = 0
        self._file_keys: list[jwt.PyJWK] = []
        self._url_keys: list[jwt.PyJWK] = []
        self._fingerprint: tuple[str, ...] = ()
        self._file_sig: Signature = None
        self._last_fetch = -1e18
        self._fetch_lock = asyncio.Lock()
        self._cache: OrderedDict[bytes, TokenClaims] = OrderedDict()
        self._cache_size = cache_size
        self._cache_key = secrets.token_bytes(32)
        self._session: Any = None  # aiohttp.ClientSession when jwks_url is set
        self._task: asyncio.Task[None] | None = None

    @property
    def keys(self) -> list[jwt.PyJWK]:
        return self._file_keys + self._url_keys

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self.load_file()
        if self.config.jwks_url is not None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.fetch_timeout_s))
            await self.fetch()
            self._task = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    def load_file(self) -> None:
        """Read jwks_file (at start): ConfigError when it is unreadable or not a JWKS."""
        path = self.config.jwks_file
        if path is None:
            return
        self._file_sig = signature(path)
        try:
            keys = parse_jwks(Path(path).read_bytes(), path)
        except OSError as exc:
            raise ConfigError(f"cannot read JWKS: {exc.strerror}", file=path) from None
        except ValueError as exc:
            raise ConfigError(str(exc), file=path) from None
        self._set_keys("file", keys)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _set_keys(self, source: str, keys: list[jwt.PyJWK]) -> None:
        if source == "file":
            self._file_keys = keys
        else:
            self._url_keys = keys
        fingerprint = tuple(sorted(json.dumps(k._jwk_data, sort_keys=True) for k in self.keys))
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self._cache.clear()  # a removed key must stop verifying at once
            self.log.info("auth_jwks_loaded", source=source, keys=len(keys),
                          kids=[k.key_id for k in keys])

    def poll(self) -> None:
        """Re-read jwks_file if it changed; a bad new file is logged, the old keys kept."""
        path = self.config.jwks_file
        if path is None:
            return
        sig = signature(path)
        if sig == self._file_sig:
            return
        self._file_sig = sig
        try:
            keys = parse_jwks(Path(path).read_bytes(), path)
        except (OSError, ValueError) as exc:
            self.log.error("auth_jwks_reload_failed", file=path, error=str(exc),
                           keeping_keys=len(self._file_keys))
            return
        self._set_keys("file", keys)

    async def _refresh_loop(self) -> None:
        while True:
            ok = self.fetches_ok > 0 and self._url_keys
            await asyncio.sleep(self.config.refresh_s if ok else min(self.config.refresh_s, 10))
            await self.fetch()

    async def fetch(self) -> bool:
        """Fetch jwks_url now; False (logged, keys kept) when it fails."""
        url = self.config.jwks_url
        if url is None or self._session is None:
            return False
        self._last_fetch = time.monotonic()
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError("JWKS larger than 1 MiB")
            keys = parse_jwks(bytes(body), url)
        except (OSError, ValueError, TimeoutError) as exc:
            self.fetches_failed += 1
            self.log.warning("auth_jwks_fetch_failed", url=url, error=str(exc) or repr(exc),
                             keeping_keys=len(self._url_keys))
            return False
        except Exception as exc:  # aiohttp.ClientError and kin
            self.fetches_failed += 1
            self.log.warning("auth_jwks_fetch_failed", url=url, error=repr(exc),
                             keeping_keys=len(self._url_keys))
            return False
        self.fetches_ok += 1
        self._set_keys("url", keys)
        return True

    # --- verification ----------------------------------------------------------

    def check(self, token: bytes, *, may_defer: bool = True) -> TokenClaims | str | None:
        """The claims, or why the token is refused, or None: an unknown kid that a
        JWKS refresh (``check_async``) might find."""
        digest = hashlib.blake2b(token, key=self._cache_key, digest_size=32).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            if time.time() < hit.exp + self.config.leeway_s:
                self._cache.move_to_end(digest)
                return hit
            del self._cache[digest]
        try:
            text = token.decode("ascii")
            header = jwt.get_unverified_header(text)
        except (UnicodeDecodeError, jwt.PyJWTError):
            return "malformed token"
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            return f"algorithm {alg!r} is not allowed"
        candidates = [k for k in self.keys if _fits(k, alg, kid)]
        if not candidates:
            if may_defer and kid is not None and self._may_refresh():
                return None
            return f"no key for kid {kid!r}" if kid is not None else "no key for the token"
        for key in candidates:
            result = self._decode(text, key, alg)
            if result is not _WRONG_KEY:
                if isinstance(result, TokenClaims):
                    self._cache_put(digest, result)
                return result  # type: ignore[return-value]
        return "signature verification failed"

    def _decode(self, text: str, key: jwt.PyJWK, alg: str) -> TokenClaims | str | object:
        cfg = self.config
        try:
            payload = jwt.decode(
                text, key.key, algorithms=[alg], audience=cfg.audience, issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": cfg.audience is not None})
        except jwt.InvalidSignatureError:
            return _WRONG_KEY
        except (TypeError, ValueError, jwt.InvalidKeyError):
            return _WRONG_KEY  # the key does not fit the algorithm
        except jwt.PyJWTError as exc:
            return str(exc) or type(exc).__name__
        sub = payload.get("sub")
        if not isinstance(sub, str) or not sub:
            return "sub must be a non-empty string"
        exp = payload.get("exp")
        if not isinstance(exp, int | float):
            return "exp must be a number"
        return TokenClaims(sub=sub, claims=text_claims(payload), exp=float(exp))

    def _may_refresh(self) -> bool:
        if self.config.jwks_file is not None and signature(self.config.jwks_file) != self._file_sig:
            return True
        if self.config.jwks_url is None:
            return False
        # A fetch under way may bring the key: wait for it rather than refuse.
        return (self._fetch_lock.locked()
                or time.monotonic() - self._last_fetch >= self.refetch_min_s)

    async def check_async(self, token: bytes) -> TokenClaims | str:
        """``check``, refreshing the JWKS first when the token names an unknown kid."""
        result = self.check(token)
        if result is not None:
            return result
        self.poll()
        if self.config.jwks_url is not None:
            async with self._fetch_lock:  # one fetch for a crowd with the same new kid
                if time.monotonic() - self._last_fetch >= self.refetch_min_s:
                    await self.fetch()
        result = self.check(token, may_defer=False)
        assert result is not None
        return result

    def _cache_put(self, digest: bytes, claims: TokenClaims) -> None:
        self._cache[digest] = claims
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


_WRONG_KEY = object()


def _fits(key: jwt.PyJWK, alg: str, kid: object) -> bool:
    data = key._jwk_data
    if kid is not None and key.key_id != kid:
        return False
    if data.get("alg") not in (None, alg):
        return False
    return bool(data.get("kty") == _KTY.get(alg[:2]))
