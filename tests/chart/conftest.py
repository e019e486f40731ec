"""Helm's own engine for the chart tests, from .venv-helm (made by `make test`)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT

CHART = ROOT / "helm" / "lastmile"
HELM_VENV = ROOT / ".venv-helm"
# The oldest and newest Kubernetes versions kubernetes-validate knows that Chart.yaml's
# kubeVersion admits.
KUBE_VERSIONS = ["1.25.0", "1.37.0"]

Engine = Callable[[dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]


def _python_312() -> str | None:
    """A Python >= 3.12 on this machine (what helm-python-sdk needs), or None."""
    names = ["python3.14", "python3.13", "python3.12", "python3"]
    names += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python")))
    for name in names:
        exe = shutil.which(name)
        if exe and subprocess.run([exe, "-c", "import sys; sys.exit(sys.version_info < (3, 12))"],
                                  capture_output=True).returncode == 0:
            return exe
    return None


@pytest.fixture(scope="session")
def helm_python() -> str:
    exe = os.environ.get("LASTMILE_HELM_PYTHON") or str(HELM_VENV / "bin" / "python")
    if Path(exe).exists():
        return exe
    if _python_312() is None:
        pytest.skip("chart tests need Python >= 3.12 (helm-python-sdk) and none is installed")
    pytest.fail(f"{exe} missing: `make test` makes it (make .venv-helm/.installed)")


@pytest.fixture(scope="session")
def helm(helm_python: str) -> Engine:
    """Render (and validate, and lint) cases in one run of Helm's engine."""

    def run(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        request = {"chart": str(CHART), "kube_versions": KUBE_VERSIONS, "cases": cases}
        proc = subprocess.run([helm_python, str(Path(__file__).with_name("helm_engine.py"))],
                              input=json.dumps(request), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        answer: dict[str, dict[str, Any]] = json.loads(proc.stdout)
        return answer

    return run
