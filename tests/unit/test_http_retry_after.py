"""Retry-After is the same on every HTTP answer: the limiter's wait when it has one."""

from __future__ import annotations

from gateway.errors import NoMatchingRule, QuotaExceeded, Unavailable
from gateway.sources import rest_proxy
from gateway.sources.http_common import RETRY_AFTER_S, error_response


def test_quota_exceeded_waits_as_long_as_the_limiter_says() -> None:
    error = QuotaExceeded("too fast", retry_after_s=4.6)
    assert error_response(error).headers["Retry-After"] == "5"
    # The REST Proxy shape gives the same hint, not the generic one.
    assert rest_proxy.error_response(error).headers["Retry-After"] == "5"


def test_a_short_wait_is_still_at_least_one_second() -> None:
    error = QuotaExceeded("too fast", retry_after_s=0.01)
    assert error_response(error).headers["Retry-After"] == "1"


def test_unavailable_uses_the_default_hint() -> None:
    response = error_response(Unavailable("buffer full"))
    assert response.status == 503
    assert response.headers["Retry-After"] == str(RETRY_AFTER_S)


def test_no_retry_after_on_what_retrying_cannot_fix() -> None:
    assert "Retry-After" not in error_response(NoMatchingRule("no rule")).headers
    assert "Retry-After" not in rest_proxy.error_response(NoMatchingRule("no rule")).headers
