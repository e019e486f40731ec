"""benchmarks/floors.py's command line and the runner's CPU split (no processes timed)."""

from __future__ import annotations

import pytest

from benchmarks import floors
from benchmarks.run import cpu_split

pytestmark = pytest.mark.unit


def test_cpu_split_is_cores_per_group_and_the_rest_of_the_machine() -> None:
    before = {"server": 1.0, "loadgen": 0.0, "tansu": 3.0, "box": 10.0, "t": 100.0}
    after = {"server": 2.0, "loadgen": 1.0, "tansu": 3.4, "box": 15.0, "t": 102.0}
    assert cpu_split(before, after) == {"server": 0.5, "loadgen": 0.5, "tansu": 0.2,
                                        "box": 2.5, "other": 1.3, "wall_s": 2.0}
    assert cpu_split(after, after) == {}


@pytest.mark.parametrize("argv, said", [
    (["--burn", "1.5"], "--burn takes 0 < CORES <= 1"),
    (["--burn", "0"], "--burn takes 0 < CORES <= 1"),
    (["--max"], "--max needs --bootstrap"),
    (["--max", "--bootstrap", "127.0.0.1:1", "--duration", "0"], "--duration must be > 0"),
])
def test_bad_arguments_are_refused_with_the_reason(argv: list[str], said: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        floors.main(argv)
    assert e.value.code == 2
    assert said in capsys.readouterr().err


def test_burn_uses_about_the_cpu_asked_for_at_most() -> None:
    used = floors.burn(0.2, 0.3)
    assert 0 < used <= 0.2 * 0.3 + 0.05  # never much more than asked (it may get less)
