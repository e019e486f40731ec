"""Outgoing QoS 0/1/2 flows of one client and the committable offset watermark."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.downlink.outbound import (
    RELEASED,
    SENT,
    OffsetTracker,
    OutboundFlow,
    Outgoing,
    Pending,
)

pytestmark = pytest.mark.unit

TP = ("commands", 0)


def _msgs(flow: OutboundFlow, *qos: int) -> list[Outgoing]:
    out = [Outgoing(f"t/{i}", b"x", q) for i, q in enumerate(qos)]
    for m in out:
        assert flow.enqueue(m) is None
    return out


def test_receive_maximum_bounds_qos1_in_flight_and_acks_open_the_window() -> None:
    flow = OutboundFlow(receive_maximum=2)
    a, b, c = _msgs(flow, 1, 1, 1)
    assert flow.pull() == [a, b] and (a.packet_id, b.packet_id) == (1, 2)
    assert flow.window() == 0 and flow.pull() == []
    assert flow.on_puback(1) is a
    assert flow.pull() == [c] and c.packet_id == 3
    assert flow.on_puback(1) is None and flow.unknown_acks == 1  # already acknowledged
    assert flow.on_puback(2) is b and flow.on_puback(3) is c and len(flow) == 0


def test_qos0_does_not_use_the_window_but_keeps_its_place_in_line() -> None:
    flow = OutboundFlow(receive_maximum=1)
    a, b, c = _msgs(flow, 0, 1, 0)
    d, = _msgs(flow, 1)
    assert flow.pull() == [a, b, c]  # d waits for b's PUBACK; c, QoS 0, went anyway
    assert flow.pull() == []
    flow.on_puback(b.packet_id)
    assert flow.pull() == [d]
    e, f = _msgs(flow, 1, 0)
    assert flow.pull() == []  # f waits behind e: one client's order is kept
    assert flow.pull(limit=1) == [] and list(flow.queue) == [e, f]


def test_qos2_handshake() -> None:
    flow = OutboundFlow(receive_maximum=1)
    a, b = _msgs(flow, 2, 2)
    assert flow.pull() == [a]
    assert flow.on_pubcomp(a.packet_id) is None and flow.unknown_acks == 1  # no PUBREC yet
    assert flow.on_pubrec(a.packet_id) is True and a.state == RELEASED
    assert flow.on_pubrec(a.packet_id) is True  # the client's resend: PUBREL again
    assert flow.pull() == []  # a holds its slot until PUBCOMP
    assert flow.on_pubcomp(a.packet_id) is a
    assert flow.pull() == [b]
    assert flow.on_puback(b.packet_id) is None  # PUBACK is not an answer to QoS 2
    assert flow.on_pubrec(99) is False and flow.unknown_acks == 3


def test_error_reason_codes_end_the_flow() -> None:
    flow = OutboundFlow(receive_maximum=2)
    a, b = _msgs(flow, 1, 2)
    flow.pull()
    assert flow.on_puback(a.packet_id, 0x87) is a
    assert flow.on_pubrec(b.packet_id, 0x80) is False  # no PUBREL; the slot is free
    assert flow.refused == 2 and flow.window() == 2


@pytest.mark.parametrize(("policy", "dropped_topic", "kept"), [
    ("drop-oldest", "t/0", ["t/1", "t/2", "new"]),
    ("drop-newest", "new", ["t/0", "t/1", "t/2"]),
])
def test_a_full_queue_drops_by_policy_counts_and_releases_the_offset(
    policy: str, dropped_topic: str, kept: list[str]
) -> None:
    tracker = OffsetTracker()
    flow = OutboundFlow(queue_limit=3, full_policy=policy)  # type: ignore[arg-type]
    for offset in range(4):
        pending = tracker.consumed(TP, offset)
        pending.hold()
        topic = "new" if offset == 3 else f"t/{offset}"
        dropped = flow.enqueue(Outgoing(topic, b"x", 1, origin=pending))
        tracker.fanned_out(pending)
        assert (dropped is None) is (offset < 3)
    assert dropped is not None and dropped.topic == dropped_topic and dropped.origin is None
    assert flow.dropped == 1 and [m.topic for m in flow.queue] == kept
    # drop-oldest dropped offset 0: nothing before offset 1 is pending now.
    assert tracker.committable() == {TP: 1 if policy == "drop-oldest" else 0}


def test_in_flight_messages_are_not_dropped_by_the_queue_policy() -> None:
    flow = OutboundFlow(receive_maximum=2, queue_limit=1)
    a, = _msgs(flow, 1)
    flow.pull()
    b, = _msgs(flow, 1)
    assert flow.enqueue(Outgoing("c", b"", 1)) is b
    assert a.packet_id in flow.inflight


def test_resume_resends_with_dup_then_pubrel_in_order() -> None:
    flow = OutboundFlow(receive_maximum=10)
    a, b, c, d = _msgs(flow, 2, 1, 2, 1)
    flow.pull()
    flow.on_pubrec(a.packet_id)  # a: PUBREL next
    flow.on_puback(d.packet_id)
    e, = _msgs(flow, 1)  # queued while offline
    again = flow.resume(receive_maximum=1)
    assert again == [a, b, c]
    assert [(m.state, m.dup) for m in again] == [(RELEASED, False), (SENT, True), (SENT, True)]
    assert flow.pull() == []  # in flight (3) over the new Receive Maximum (1): e waits
    for m in (b, c):
        if m.qos == 1:
            flow.on_puback(m.packet_id)
    flow.on_pubcomp(a.packet_id)
    flow.on_pubrec(c.packet_id)
    flow.on_pubcomp(c.packet_id)
    assert flow.pull() == [e] and e.dup is False


def test_packet_ids_wrap_and_skip_ids_in_flight() -> None:
    flow = OutboundFlow(receive_maximum=2)
    first, = _msgs(flow, 1)
    flow.pull()
    assert first.packet_id == 1
    for _ in range(65_534):
        m = Outgoing("t", b"", 1)
        flow.enqueue(m)
        [sent] = flow.pull()
        flow.on_puback(sent.packet_id)
    assert sent.packet_id == 65_535
    again, = _msgs(flow, 1)
    flow.pull()
    assert again.packet_id == 2  # 1 is still in flight
    assert flow.resume() == [first, again]  # the oldest first, across the wrap


def test_close_finishes_everything() -> None:
    tracker = OffsetTracker()
    flow = OutboundFlow(receive_maximum=1)
    for offset in range(3):
        pending = tracker.consumed(TP, offset)
        pending.hold()
        flow.enqueue(Outgoing("t", b"", 1, origin=pending))
        tracker.fanned_out(pending)
    flow.pull()
    assert tracker.committable() == {TP: 0}
    assert flow.close() == 3 and len(flow) == 0
    assert tracker.committable() == {TP: 3}


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        OutboundFlow(receive_maximum=0)
    with pytest.raises(ValueError):
        OutboundFlow(queue_limit=0)
    with pytest.raises(ValueError):
        OutboundFlow(full_policy="block")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Outgoing("t", b"", 3)
    with pytest.raises(ValueError):
        OutboundFlow().resume(receive_maximum=70_000)


def test_offsets_commit_only_up_to_the_lowest_unfinished_record() -> None:
    tracker = OffsetTracker()
    assert tracker.committable() == {}
    # Record 10 goes to two QoS 1 subscribers, 11 to none, 12 to one QoS 0 subscriber.
    flows = [OutboundFlow(), OutboundFlow()]
    p10 = tracker.consumed(TP, 10)
    for flow in flows:
        p10.hold()
        flow.enqueue(Outgoing("cmd/a", b"x", 1, origin=p10))
    tracker.fanned_out(p10)
    tracker.fanned_out(tracker.consumed(TP, 11))
    p12 = tracker.consumed(TP, 12)
    p12.hold()
    flows[0].enqueue(Outgoing("cmd/b", b"y", 0, origin=p12))
    tracker.fanned_out(p12)
    assert tracker.committable() == {TP: 10}
    sent = [flow.pull() for flow in flows]  # record 12 (QoS 0) is finished once written
    assert tracker.committable() == {TP: 10}
    flows[1].on_puback(sent[1][0].packet_id)
    assert tracker.committable() == {TP: 10}  # one subscriber has not acknowledged
    flows[0].on_puback(sent[0][0].packet_id)
    assert tracker.committable() == {TP: 13}
    other = ("commands", 1)
    tracker.consumed(other, 0)
    assert tracker.committable() == {TP: 13, other: 0}
    tracker.forget(other)
    assert tracker.committable() == {TP: 13}


def test_offset_misuse_is_refused() -> None:
    tracker = OffsetTracker()
    pending = tracker.consumed(TP, 5)
    with pytest.raises(ValueError):
        tracker.consumed(TP, 5)
    tracker.fanned_out(pending)
    with pytest.raises(RuntimeError):
        pending.release()
    with pytest.raises(RuntimeError):
        pending.hold()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_watermark_is_the_lowest_unfinished_offset_whatever_the_ack_order(
    fanout: list[int], rnd: object
) -> None:
    tracker = OffsetTracker()
    holds: list[Pending] = []
    for offset, subscribers in enumerate(fanout):
        pending = tracker.consumed(TP, offset)
        for _ in range(subscribers):
            pending.hold()
            holds.append(pending)
        tracker.fanned_out(pending)
    rnd.shuffle(holds)  # type: ignore[attr-defined]
    for i in range(len(holds) + 1):
        done = holds[:i]
        unfinished = [o for o, n in enumerate(fanout) if sum(p.offset == o for p in done) < n]
        assert tracker.committable() == {TP: min(unfinished, default=len(fanout))}
        if i < len(holds):
            holds[i].release()


def test_adopted_offsets_hold_the_watermark_below_what_was_consumed() -> None:
    tracker = OffsetTracker()
    for offset in range(10, 20):
        tracker.fanned_out(tracker.consumed("p", offset))
    assert tracker.committable() == {"p": 20}
    taken = [tracker.adopt("p", offset, 0) for offset in (12, 11, 15)]
    assert tracker.committable() == {"p": 11}  # lower than before: Kafka takes it
    taken[1].release()
    assert tracker.committable() == {"p": 12}
    taken[0].release()
    assert tracker.committable() == {"p": 15}
    taken[2].release()
    assert tracker.committable() == {"p": 20}
    # A partition not consumed here yet: never past where this worker starts it.
    held = tracker.adopt("q", 7, 3)
    assert tracker.committable()["q"] == 3
    held.release()
    assert tracker.committable()["q"] == 3
    tracker.fanned_out(tracker.consumed("q", 3))
    assert tracker.committable()["q"] == 4
