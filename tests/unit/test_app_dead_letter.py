"""Records Kafka refuses for good after they were acked go to the rules' dead-letter topic."""

from __future__ import annotations

import pytest

from gateway.app import App
from gateway.config import load_config
from gateway.model import Record
from gateway.routing import Router, load_rules
from tests.helpers import ANON, ROOT

pytestmark = pytest.mark.unit


def test_refused_record_becomes_a_dead_letter_record_once() -> None:
    app = App(load_config(None, env=ANON), str(ROOT / "bridge-rules"))
    app.router = Router(load_rules(ROOT / "bridge-rules"))
    record = Record(cluster="default", topic="edge.too.big", value=b"v", key=b"k",
                    headers=[("plant", b"p1")])
    dead = app._dead_letter_record(record, "Broker: Message size too large")
    assert dead is not None
    assert (dead.cluster, dead.topic, dead.value, dead.key) == (
        "default", "lastmile.dead-letter", b"v", b"k")
    headers = dict(dead.headers)
    assert headers["lastmile-reason"] == b"kafka_refused"
    assert headers["lastmile-detail"] == b"Broker: Message size too large"
    assert headers["lastmile-topic"] == b"edge.too.big"
    assert headers["plant"] == b"p1"
    # A dead-letter record the dead-letter topic itself refuses is not looped back.
    assert app._dead_letter_record(dead, "again") is None
