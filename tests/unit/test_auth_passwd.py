"""Password files: Mosquitto's format read and written byte-compatibly; ``lastmile passwd``."""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path

import pytest

from gateway.auth.passwd import (
    hash_password,
    load_password_file,
    parse_hash,
    parse_password_file,
    updated_lines,
    write_atomically,
)
from gateway.cli import main
from gateway.errors import ConfigError

pytestmark = pytest.mark.unit

# Written by Debian's mosquitto_passwd 2.0.11 (tests/integration/test_auth_tools.py runs
# the tool itself): -c -b (default $7$, 101 iterations), -H sha512 ($6$), -I 1000.
MOSQUITTO_FILE = """\
alice:$7$101$S4uPc/ZXX4HJTzsm$MMqErsOtqMWStsXrWX+pSGLgVOV9Dl6LrDLvs58Wz53pIcHJgZvBPQ5T/ivCZht5ivXjN6bFy7F9hA88fQ/Cyg==
bob:$6$9SJ5ICpF/B4QcYek$1qCgbo4FYbRjAna3qgnZxwNsfSP5GVvU1/7ZryZWVUoUr8BnEDVBEjQGSPyCbhVXtgroUzWIMizAOKSUyObQ0A==
carol:$7$1000$+C427LUzL7FeqFDs$t6z2tM7qjPuHoGE7DyK3iKVvOMfOWV+hmooZGWhsQa/Dt7dQy9DWREntnYzdZahLt0Ufx+7Hk6LpoHqB8QFyMA==
"""


def test_mosquitto_written_hashes_verify() -> None:
    users = parse_password_file(MOSQUITTO_FILE, "passwd")
    assert set(users) == {"alice", "bob", "carol"}
    assert users["alice"].matches(b"secret")
    assert not users["alice"].matches(b"Secret")
    assert users["bob"].kind == "6" and users["bob"].matches(b"pw")
    assert not users["bob"].matches(b"pw ")
    assert users["carol"].iterations == 1000 and users["carol"].matches(b"pw")
    assert not users["carol"].matches(b"")


def test_encode_round_trips_mosquitto_lines() -> None:
    for line in MOSQUITTO_FILE.splitlines():
        assert parse_hash(line.split(":", 1)[1]).encode() == line.split(":", 1)[1]


def test_comments_and_blank_lines_are_skipped() -> None:
    text = "# users\n\n   \n" + MOSQUITTO_FILE + "# end\r\n"
    assert len(parse_password_file(text)) == 3


@pytest.mark.parametrize(("line", "why"), [
    ("alice", "expected user:hash"),
    (":$6$abc$def", "expected user:hash"),
    ("alice:secret", "plain-text"),
    ("alice:$6$!!!$AAAA", "salt is not base64"),
    ("alice:$6$S4uPc/ZXX4HJTzsm$AAAA", "not 64 bytes"),
    ("alice:$7$x$S4uPc/ZXX4HJTzsm$AAAA", "iteration count"),
    ("alice:$7$0$S4uPc/ZXX4HJTzsm$AAAA", "iteration count"),
    ("alice:$7$101$S4uPc/ZXX4HJTzsm", "malformed hash"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "passwd"
    path.write_text("# header\n" + MOSQUITTO_FILE + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_password_file(path)
    assert info.value.file == str(path)
    assert info.value.line == 5
    assert why in str(info.value)
    assert "secret" not in str(info.value)  # names the problem, never the password


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read password file"):
        load_password_file(tmp_path / "nope")


def test_hash_password_matches_mosquitto_defaults() -> None:
    hashed = hash_password(b"pw")
    text = hashed.encode()
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", text)
    assert len(hashed.salt) == 12
    assert parse_hash(text).matches(b"pw")
    assert hash_password(b"pw").salt != hashed.salt  # random salt


def test_updated_lines_keeps_other_lines_in_place() -> None:
    lines = ["# ops team", "alice:old", "", "bob:old"]
    new = hash_password(b"x", iterations=1)
    assert updated_lines(lines, "alice", new) == [
        "# ops team", f"alice:{new.encode()}", "", "bob:old"]
    assert updated_lines(lines, "carol", new)[-1] == f"carol:{new.encode()}"
    assert updated_lines(lines, "bob", None) == ["# ops team", "alice:old", ""]


def test_write_atomically_modes(tmp_path: Path) -> None:
    new = tmp_path / "new"
    write_atomically(new, ["a:b"])
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert new.read_text() == "a:b\n"
    existing = tmp_path / "existing"
    existing.write_text("")
    existing.chmod(0o640)
    write_atomically(existing, ["x:y"])
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


# --- lastmile passwd -----------------------------------------------------------------


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(["passwd", *argv])
    return int(info.value.code or 0)


def test_cli_create_batch_and_update(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    assert run_cli("-c", "-b", str(path), "alice", "s3cret") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert run_cli("-b", str(path), "bob", "pw", "-I", "7") == 0
    users = load_password_file(path)
    assert users["alice"].matches(b"s3cret") and users["alice"].iterations == 101
    assert users["bob"].matches(b"pw") and users["bob"].iterations == 7
    assert run_cli("-b", str(path), "alice", "changed") == 0
    users = load_password_file(path)
    assert users["alice"].matches(b"changed") and not users["alice"].matches(b"s3cret")
    assert path.read_text().splitlines()[0].startswith("alice:")  # updated in place


def test_cli_password_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "passwd"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n")))
    assert run_cli("-c", "--password-stdin", str(path), "dev") == 0
    assert load_password_file(path)["dev"].matches(b"from stdin")


def test_cli_prompts_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "passwd"
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert run_cli("-c", str(path), "dev") == 1
    assert not path.exists()
    answers = iter(["same", "same"])
    assert run_cli("-c", str(path), "dev") == 0
    assert load_password_file(path)["dev"].matches(b"same")


def test_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "passwd"
    assert run_cli("-b", str(path), "alice", "pw") == 1  # no -c: the file must exist
    assert "-c creates it" in capsys.readouterr().err
    assert run_cli("-c", "-b", str(path), "ali:ce", "pw") == 1
    assert run_cli("-c", "-b", str(path), "alice", "") == 1
    assert not path.exists()
    assert run_cli("-c", "-b", str(path), "alice", "pw") == 0
    assert run_cli("-D", str(path), "nobody") == 1
    path.write_text(path.read_text() + "broken line\n")
    assert run_cli("-b", str(path), "bob", "pw") == 1
    assert "passwd:2" in capsys.readouterr().err


def test_cli_delete(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("# keep me\n" + MOSQUITTO_FILE)
    assert run_cli("-D", str(path), "bob") == 0
    text = path.read_text()
    assert text.startswith("# keep me\nalice:") and "bob:" not in text
    assert set(load_password_file(path)) == {"alice", "carol"}
