"""A gateway process with test rules, for the HTTP and WebSocket integration tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import GatewayProcess, running, write_config

# Every Kafka topic a test reads is made unique by its {tenant} capture, because
# the broker is shared by the whole session.
RULES = """
dead_letter: {cluster: default, topic: t.dead-letter}
unmatched: reject
rules:
  - name: http-in
    match: {topic: "in/{tenant}/#", source: http}
    kafka: {topic: "t.http.{tenant}", key: "{client_id}"}
  - name: closed
    match: "closed/#"
    action: reject
    reason: closed for tests
  - name: json-only
    match: "json/{tenant}/#"
    payload: {format: json, on_invalid: reject}
    kafka: {topic: "t.json.{tenant}"}
  - name: rest-proxy
    match: {topic: "kafka/{name}", source: http}
    kafka: {topic: "{name}"}
  - name: websocket
    match: {topic: "ws/{tenant}/#", source: mqtt}
    kafka: {topic: "t.ws.{tenant}", key: "{client_id}"}
"""


@dataclass
class Gateway:
    url: str
    ports: dict[str, int]
    proc: GatewayProcess


def tenant() -> str:
    return uuid.uuid4().hex[:10]


@contextlib.contextmanager
def http_gateway(tmp: Path, bootstrap: str, rules_text: str = RULES,
                 **overrides: Any) -> Iterator[Gateway]:
    """``lastmile serve`` with the test rules and the spool off (acks mean Kafka)."""
    rules = tmp / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    (rules / "00-test.yaml").write_text(rules_text)
    config = tmp / "gateway.yaml"
    settings: dict[str, Any] = {"spool__enabled": False, "rules__watch": False, **overrides}
    ports = write_config(config, bootstrap=bootstrap, rules_dir=rules, spool_dir=tmp / "spool",
                         **settings)
    proc = GatewayProcess(config, tmp / "gateway.log")
    # MQTT starts last, so its port open means the HTTP and WebSocket routes are up too.
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        yield Gateway(f"http://127.0.0.1:{ports['http']}", ports, proc)
