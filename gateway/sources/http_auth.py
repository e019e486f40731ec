"""Who is asking over HTTP: ``Authorization`` (Basic, Bearer) and client certificates.

The request is turned into ``Credentials`` and the shared ``Authenticator``
(``gateway.auth``) gives the verdict, as for MQTT: ``quick()`` first (no
hashing), else the per-address failure throttle, then ``verify()`` (hashing
off the event loop).  A refusal is 401 with ``WWW-Authenticate`` naming the
schemes this gateway accepts (RFC 7235, RFC 7617, RFC 6750).

The answer is a ``Caller``: the verified identity, the device name the client
gave (``X-Client-Id``, a label for rules and templates), and the ``scope`` its
rate bucket and Idempotency-Key answers are kept under.  The scope is built
from the verified identity only: an authenticated user's ``X-Client-Id``
splits its own scope into devices but cannot reach another user's; an
anonymous client is known by its source address alone (docs/http.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Sequence
from typing import NamedTuple

from aiohttp import web

from gateway.auth import (
    ANONYMOUS,
    Authenticator,
    AuthRefusal,
    Credentials,
    Identity,
    Verdict,
)
from gateway.sources.http_common import BadRequest, NotAuthenticated, text_header

REALM = "lastmile"
BASIC = f'Basic realm="{REALM}", charset="UTF-8"'
BEARER = f'Bearer realm="{REALM}"'

# Rate bucket and idempotency scope: ("anonymous", address) or
# (method, verified name, certificate identity, X-Client-Id).
Scope = tuple[str, ...]


class Caller(NamedTuple):
    identity: Identity
    client_id: str  # X-Client-Id as sent: names the device, proves nothing
    scope: Scope


def peer_host(request: web.Request) -> str:
    # The TCP peer, never X-Forwarded-For: a header anyone can write picks no bucket.
    return request.remote or ""


def cert_identity(request: web.Request) -> str | None:
    """Subject CN of the client certificate the TLS layer verified, if any.

    ``getpeercert()`` is empty unless the certificate was verified against the
    listener's CA, so an unverified certificate names nobody.
    """
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName" and isinstance(value, str) and value:
                return value
    return None


def credentials(request: web.Request) -> Credentials:
    """What the request presents; a malformed ``Authorization`` is refused here (401)."""
    peer, cert = peer_host(request), cert_identity(request)
    values = request.headers.getall("Authorization", [])
    if len(values) > 1:
        raise BadRequest("more than one Authorization header")
    if not values:
        return Credentials(cert_identity=cert, peer_host=peer)
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        if not token.isascii():
            raise NotAuthenticated("the Bearer token is not a token", reason="bad_credentials")
        return Credentials(password=token.encode(), bearer=True, cert_identity=cert,
                           peer_host=peer)
    if scheme.lower() == "basic" and token:
        try:
            user, colon, password = base64.b64decode(token, validate=True).partition(b":")
            if not colon:
                raise ValueError("no colon")
            username = user.decode("utf-8")
        except (binascii.Error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise NotAuthenticated("malformed Basic credentials (RFC 7617)",
                                   reason="bad_credentials") from exc
        return Credentials(username=username, password=password, cert_identity=cert,
                           peer_host=peer)
    raise NotAuthenticated("unsupported Authorization scheme; use Basic or Bearer",
                           reason="bad_credentials")


class AnonymousOnly:
    """The authenticator when none is configured: anonymous access or nothing."""

    def __init__(self, allow_anonymous: bool) -> None:
        self.allow_anonymous = allow_anonymous

    def quick(self, creds: Credentials) -> Verdict | None:
        if self.allow_anonymous:
            return ANONYMOUS
        return AuthRefusal(reason="missing", message="no authentication method is configured")

    async def verify(self, creds: Credentials) -> Verdict:
        verdict = self.quick(creds)
        assert verdict is not None
        return verdict

    def delay_for(self, peer_host: str) -> float:
        return 0.0


def _quoted(text: str) -> str:
    # RFC 6750 error_description: printable ASCII without '"' and '\'.
    return "".join(c for c in text if " " <= c <= "~" and c not in '"\\')[:200]


class HttpAuth:
    """Turns a request into a ``Caller`` or raises ``NotAuthenticated`` (401)."""

    def __init__(self, auth: Authenticator, schemes: Sequence[str]) -> None:
        self.auth = auth
        self.basic = "basic" in schemes
        self.bearer = "bearer" in schemes

    def challenges(self, creds: Credentials | None, refusal: AuthRefusal | None
                   ) -> list[str]:
        """One ``WWW-Authenticate`` value per scheme the gateway accepts."""
        out = [BASIC] if self.basic else []
        if self.bearer:
            if creds is not None and creds.bearer and refusal is not None:
                out.append(f'{BEARER}, error="invalid_token", '
                           f'error_description="{_quoted(refusal.message)}"')
            else:
                out.append(BEARER)
        return out

    async def identify(self, request: web.Request) -> Caller:
        try:
            creds = credentials(request)
        except NotAuthenticated as exc:
            exc.challenges = self.challenges(None, None)
            raise
        verdict = self.auth.quick(creds)
        if verdict is None:
            delay = self.auth.delay_for(creds.peer_host)
            if delay > 0:  # this address keeps failing: hold it before the costly check
                await asyncio.sleep(delay)
            verdict = await self.auth.verify(creds)
        if isinstance(verdict, AuthRefusal):
            raise NotAuthenticated(verdict.message, reason=verdict.reason,
                                   challenges=self.challenges(creds, verdict))
        client_id = text_header("X-Client-Id", request.headers.get("X-Client-Id", ""))
        return Caller(verdict, client_id, scope_of(verdict, client_id, creds.peer_host))


def scope_of(identity: Identity, client_id: str, peer: str) -> Scope:
    if identity.anonymous:
        return ("anonymous", peer)
    return (identity.method, identity.name or "", identity.cert or "", client_id)
