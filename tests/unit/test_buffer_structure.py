"""The buffer's seams: flow-control holds, and no import of the Kafka sink."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.buffer.flow import FlowControl
from tests.helpers import ROOT

pytestmark = pytest.mark.unit


def test_flow_pauses_on_bytes_or_any_hold_and_resumes_when_all_clear() -> None:
    flow = FlowControl(high=100, low=50)
    seen: list[bool] = []
    flow.subscribe(seen.append)
    flow.add(100)
    flow.hold("spool full", True)
    flow.remove(60)  # below low water, but the spool is still full
    assert flow.paused
    flow.hold("spool broken", True)
    flow.hold("spool full", False)
    assert flow.paused
    flow.hold("spool broken", False)
    assert not flow.paused and seen == [True, False]


def test_buffer_never_imports_the_kafka_sink() -> None:
    code = ("import sys, gateway.buffer.queue, gateway.buffer.spooled, gateway.buffer.inspect; "
            "print([m for m in sys.modules if m.startswith(('gateway.sinks', 'confluent_kafka'))])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
