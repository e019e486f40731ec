"""Who a client is: the shapes every listener shares (MQTT, WebSocket, HTTP).

A listener turns what the client presented into ``Credentials`` and asks an
``Authenticator`` (``gateway.auth.check``) for a verdict: an ``Identity`` or an
``AuthRefusal``.  The verdict is the only source of identity downstream: rules'
``allow`` and ``match.username`` see ``Identity.name`` (never a username
nobody verified), ``Identity.cert`` and ``Identity.claims``.

    verdict = auth.quick(creds)          # on the loop; None when it would cost CPU
    if verdict is None:
        await asyncio.sleep(auth.delay_for(creds.peer_host))   # failed-attempt throttle
        verdict = await auth.verify(creds)                      # hashing off the loop
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

import msgspec

Method = Literal["anonymous", "password", "jwt", "certificate"]
# Why a client was refused.  The listener maps it: MQTT 3.1.1 CONNACK, MQTT 5
# CONNACK, HTTP status (see REFUSAL_CODES).
#   missing:          no credentials and anonymous access is off
#   bad_credentials:  unknown user, wrong password, or a JWT that fails verification
Refusal = Literal["missing", "bad_credentials"]

# reason -> (3.1.1 CONNACK return code, 5.0 CONNACK reason code, HTTP status)
REFUSAL_CODES: dict[str, tuple[int, int, int]] = {
    "missing": (0x05, 0x87, 401),
    "bad_credentials": (0x04, 0x86, 401),
}


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    """What one client presented, as the listener read it."""

    username: str | None = None
    password: bytes | None = None  # MQTT password, Basic password, or a Bearer token
    bearer: bool = False  # the password came as "Authorization: Bearer" (a JWT only)
    cert_identity: str | None = None  # subject CN of a verified client certificate
    peer_host: str = ""  # source address, for the failed-attempt throttle


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """A client the gateway has verified (or let in anonymously)."""

    method: Method
    # The verified name: password-file user, or the JWT's ``sub``; None when anonymous
    # or certificate-only.
    name: str | None = None
    cert: str | None = None  # certificate identity (mTLS), verified by the TLS layer
    claims: Mapping[str, str] | None = None  # JWT claims as text ({claim.NAME}, allow)
    expires_at: float | None = None  # wall-clock seconds (JWT exp); None: never

    @property
    def anonymous(self) -> bool:
        return self.name is None and self.cert is None


class AuthRefusal(msgspec.Struct, frozen=True, kw_only=True):
    reason: Refusal
    message: str  # for logs and the HTTP error body; never echoes a password


ANONYMOUS = Identity(method="anonymous")

Verdict = Identity | AuthRefusal


class Authenticator(Protocol):
    """What listeners need from ``gateway.auth.check.Authenticator``."""

    def quick(self, creds: Credentials) -> Verdict | None:
        """A verdict that costs no hashing (anonymous, certificate, cache hit), else None."""

    async def verify(self, creds: Credentials) -> Verdict:
        """The full check; slow hashing runs off the event loop."""

    def delay_for(self, peer_host: str) -> float:
        """Seconds to hold a new attempt from ``peer_host`` (0 unless it keeps failing).

        ``quick`` and ``verify`` count every verdict they give (per method, per refusal
        reason) and feed this throttle themselves.
        """
