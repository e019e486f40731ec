"""The in-flight body budget (limits.http_max_inflight_body_bytes): no sockets."""

from __future__ import annotations

import pytest

from gateway.sources.http_common import BodyBudget, BodyBudgetExceeded, retry_headers

pytestmark = pytest.mark.unit


def test_holds_add_up_and_a_refusal_holds_nothing() -> None:
    budget = BodyBudget(100)
    a, b, c = budget.hold(), budget.hold(), budget.hold()
    a.grow_to(60)
    b.grow_to(40)
    with pytest.raises(BodyBudgetExceeded) as refused:
        c.grow_to(1)
    assert refused.value.http_status == 503
    assert retry_headers(refused.value) == {"Retry-After": "1"}
    assert (budget.used, budget.refused, c.bytes) == (100, 1, 0)
    a.release()
    a.release()  # twice is harmless
    c.grow_to(50)
    assert budget.used == 90
    b.release()
    c.release()
    assert budget.used == 0


def test_a_growing_body_holds_what_it_read() -> None:
    budget = BodyBudget(100)
    hold = budget.hold()
    for size in (10, 30, 30, 80):  # a chunked body, as read
        hold.grow_to(size)
    assert budget.used == hold.bytes == 80
    other = budget.hold()
    with pytest.raises(BodyBudgetExceeded):
        other.grow_to(21)
    hold.release()
    assert budget.used == 0


def test_a_lone_request_always_fits_and_zero_is_off() -> None:
    budget = BodyBudget(100)
    hold = budget.hold()
    hold.grow_to(1000)  # bounded by http_max_body_bytes, not by the budget
    assert budget.used == 1000
    off = BodyBudget(0)
    holds = [off.hold() for _ in range(3)]
    for h in holds:
        h.grow_to(1 << 30)
    assert off.refused == 0


def test_a_lone_chunked_body_may_grow_past_the_budget() -> None:
    budget = BodyBudget(100)
    hold = budget.hold()
    for size in (60, 120, 180):
        hold.grow_to(size)
    assert budget.used == 180
    with pytest.raises(BodyBudgetExceeded):
        budget.hold().grow_to(1)
