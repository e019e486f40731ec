"""The Grafana dashboard and the chart's alerts query only metrics the gateway exports."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, Engine
from tests.helpers import ROOT

pytestmark = pytest.mark.unit

DASHBOARD = CHART / "dashboards" / "lastmile.json"
METRIC = re.compile(r"\b((?:lastmile|process)_[a-z0-9_]+)")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def known_metrics() -> set[str]:
    """Names in docs/metrics.md (the reference) and in the gateway's metrics module."""
    doc = Path(os.environ.get("LASTMILE_METRICS_DOC", ROOT / "docs" / "metrics.md"))
    if not doc.exists():
        pytest.skip(f"{doc} not there yet (issue 16's metrics rework writes it)")
    names = set(re.findall(r"`((?:lastmile|process)_[a-z0-9_]+)`", doc.read_text()))
    module = ROOT / "gateway" / "observability" / "metrics.py"
    names |= set(re.findall(r'"(lastmile_[a-z0-9_]+)"', module.read_text()))
    return names


def unknown(exprs: list[str], known: set[str]) -> set[str]:
    missing = set()
    for expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        for name in METRIC.findall(expr):
            base = next((name.removesuffix(s) for s in HISTOGRAM_SERIES
                         if name.endswith(s) and name.removesuffix(s) in known), name)
            if base not in known:
                missing.add(name)
    return missing


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in board["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"])
    return exprs


def test_dashboard_queries_exported_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    exprs = dashboard_exprs(board)
    assert len(exprs) > 20
    assert unknown(exprs, known_metrics()) == set()
    # What the issue asks an operator to see: traffic, backlog, failures.
    text = " ".join(exprs)
    for name in ("lastmile_messages_received_total", "lastmile_spool_backlog_bytes",
                 "lastmile_spool_oldest_record_age_seconds", "lastmile_refused_total",
                 "lastmile_auth_refused_total", "lastmile_ack_latency_seconds_bucket"):
        assert name in text
    assert 'event="lost_after_ack"' in text


def test_alerts_query_exported_metrics(helm: Engine) -> None:
    known = known_metrics()
    values = {"auth": {"passwordSecret": "p"}, "metrics": {"prometheusRule": {"enabled": True}}}
    case = helm({"alerts": {"values": values}})["alerts"]
    assert case["error"] is None, case["error"]
    rule = yaml.safe_load(case["manifests"]["lastmile/templates/prometheusrule.yaml"])
    exprs = [r["expr"] for r in rule["spec"]["groups"][0]["rules"]]
    assert unknown(exprs, known) == set()
    # Sanity of the check itself: a misspelt name is caught.
    assert unknown(["rate(lastmile_mesages_total[5m])"], known) == {"lastmile_mesages_total"}
