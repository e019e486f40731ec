"""Run Helm's own engine on the chart: render, lint, validate (Python >= 3.12 only).

Run by tests/chart with .venv-helm's Python (helm-python-sdk needs 3.12; the gateway's
venv is 3.11): reads one JSON request on stdin, writes one JSON answer on stdout.

Request: {"chart": path, "kube_versions": ["1.25.0", ...],
          "cases": {name: {"values": {...}, "namespace": "...", "lint": bool}}}
Answer:  {name: {"manifests": {template: text}, "error": str | null,
                 "lint": {kube_version: report}, "invalid": [str, ...]}}
"""

from __future__ import annotations

import json
import sys
from typing import Any

import kubernetes_validate  # type: ignore[import-not-found]
import yaml
from helm_python.chart import Chart, lint  # type: ignore[import-not-found]

# Prometheus Operator kinds: no schema in kubernetes-validate; tests/chart checks them.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}


def validate(text: str, template: str, versions: list[str]) -> list[str]:
    problems = []
    for doc in yaml.safe_load_all(text):
        if not doc or doc.get("kind") in CUSTOM_KINDS:
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as exc:  # ValidationError, SchemaNotFoundError
                where = "/".join(str(p) for p in getattr(exc, "path", ()))
                why = getattr(exc, "message", str(exc))
                problems.append(f"{template} {doc.get('kind')} k8s {version}: {where}: {why}")
    return problems


def run_case(chart: Chart, path: str, case: dict[str, Any], versions: list[str]) -> dict[str, Any]:
    values = case.get("values", {})
    out: dict[str, Any] = {"manifests": {}, "error": None, "lint": {}, "invalid": []}
    try:
        out["manifests"] = chart.render(values=values, name=case.get("name", "lastmile"),
                                        namespace=case.get("namespace", "edge"),
                                        is_install=True)
    except Exception as exc:  # HelmRenderError, HelmValuesError: the test reads the text
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    for template, text in out["manifests"].items():
        if template.endswith(".yaml"):
            out["invalid"] += validate(text, template, versions)
    if case.get("lint"):
        for version in versions:
            out["lint"][version] = lint(path, values, strict=True,
                                        namespace=case.get("namespace", "edge"),
                                        kube_version=f"v{version}")
    return out


def main() -> None:
    request = json.load(sys.stdin)
    chart = Chart.load(request["chart"])
    versions = request["kube_versions"]
    answer = {name: run_case(chart, request["chart"], case, versions)
              for name, case in request["cases"].items()}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
