"""Reading credentials from a request: Authorization (RFC 7617 / 6750) and scopes."""

from __future__ import annotations

import base64

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.auth import ANONYMOUS, Identity
from gateway.sources.http_auth import credentials, scope_of
from gateway.sources.http_common import BadRequest, NotAuthenticated

pytestmark = pytest.mark.unit


def request(*authorization: str):  # type: ignore[no-untyped-def]
    headers = CIMultiDict(("Authorization", value) for value in authorization)
    return make_mocked_request("POST", "/v1/publish/a", headers=headers)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_basic_is_utf8_and_splits_at_the_first_colon() -> None:
    creds = credentials(request("Basic " + b64("jörg:pa:ss wörd".encode())))
    assert (creds.username, creds.password, creds.bearer) == (
        "jörg", "pa:ss wörd".encode(), False)


def test_schemes_are_case_insensitive_and_bearer_is_the_token() -> None:
    creds = credentials(request("bearer  abc.def.ghi "))
    assert (creds.username, creds.password, creds.bearer) == (None, b"abc.def.ghi", True)
    assert credentials(request("BASIC " + b64(b"a:b"))).username == "a"


def test_nothing_sent_is_empty_credentials() -> None:
    creds = credentials(request())
    assert (creds.username, creds.password, creds.cert_identity) == (None, None, None)


@pytest.mark.parametrize("value", ["Basic", "Basic " + b64(b"no-colon"), "Basic %%%",
                                   "Basic " + b64(b"\xff\xfe:pw"), "Bearer", "Bearer tök",
                                   "Negotiate abc", "token"])
def test_malformed_or_unsupported_is_401(value: str) -> None:
    with pytest.raises(NotAuthenticated):
        credentials(request(value))


def test_two_authorization_headers_are_400() -> None:
    with pytest.raises(BadRequest):
        credentials(request("Bearer a", "Bearer b"))


def test_scopes_come_from_the_verified_identity_only() -> None:
    alice = Identity(method="password", name="alice")
    bob = Identity(method="password", name="bob")
    assert scope_of(alice, "phone", "10.0.0.1") != scope_of(bob, "phone", "10.0.0.1")
    assert scope_of(alice, "phone", "10.0.0.1") == scope_of(alice, "phone", "10.9.9.9")
    assert scope_of(ANONYMOUS, "phone", "10.0.0.1") == scope_of(ANONYMOUS, "tablet",
                                                                 "10.0.0.1")
    assert scope_of(ANONYMOUS, "phone", "10.0.0.1") != scope_of(ANONYMOUS, "phone",
                                                                 "10.0.0.2")
