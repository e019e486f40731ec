"""Password files in the format of Mosquitto 2's ``mosquitto_passwd``.

One user a line, ``user:hash``; blank lines and lines starting with ``#`` are
skipped.  Two hashes, both with a 12-byte random salt, base64 (standard
alphabet, padded):

    alice:$6$<salt>$<sha512(password + salt)>                    (Mosquitto 1.6 and earlier)
    alice:$7$<iterations>$<salt>$<PBKDF2-HMAC-SHA512(password, salt, iterations, 64)>

``lastmile passwd`` writes ``$7$`` with 101 iterations, Mosquitto's default, so a
file moves between Mosquitto and Lastmile unchanged in both directions.  A
malformed line is a ``ConfigError`` naming the file and the line: a file we only
half understood would lock out (or, worse, let in) the wrong users.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError

DEFAULT_ITERATIONS = 101  # mosquitto_passwd's default for $7$
SALT_BYTES = 12  # mosquitto_passwd's salt length
MAX_ITERATIONS = 10_000_000  # a file asking for more is a typo or an attack on our CPU


@dataclass(frozen=True, slots=True)
class PasswordHash:
    kind: str  # "6" (salted SHA-512) or "7" (PBKDF2-HMAC-SHA512)
    salt: bytes
    digest: bytes
    iterations: int = 0  # $7$ only

    def matches(self, password: bytes) -> bool:
        """The slow part: run it off the event loop (hashlib releases the GIL)."""
        if self.kind == "6":
            computed = hashlib.sha512(password + self.salt).digest()
        else:
            computed = hashlib.pbkdf2_hmac(
                "sha512", password, self.salt, self.iterations, len(self.digest))
        return hmac.compare_digest(computed, self.digest)

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode()
        digest = base64.b64encode(self.digest).decode()
        if self.kind == "6":
            return f"$6${salt}${digest}"
        return f"$7${self.iterations}${salt}${digest}"


def _b64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64") from None
    if not raw:
        raise ValueError(f"{what} is empty")
    return raw


def parse_hash(text: str) -> PasswordHash:
    """``$6$...`` or ``$7$...``; ValueError saying what is wrong (never echoing the hash)."""
    parts = text.split("$")
    if len(parts) == 4 and parts[0] == "" and parts[1] == "6":
        salt, digest = _b64(parts[2], "salt"), _b64(parts[3], "hash")
        if len(digest) != 64:
            raise ValueError("$6$ hash is not 64 bytes")
        return PasswordHash("6", salt, digest)
    if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
        if not parts[2].isdigit() or not 1 <= int(parts[2]) <= MAX_ITERATIONS:
            raise ValueError(f"$7$ iteration count must be 1..{MAX_ITERATIONS}")
        salt, digest = _b64(parts[3], "salt"), _b64(parts[4], "hash")
        if len(digest) != 64:
            raise ValueError("$7$ hash is not 64 bytes")
        return PasswordHash("7", salt, digest, int(parts[2]))
    if text.startswith(("$6$", "$7$")):
        raise ValueError("malformed hash")
    raise ValueError("not a $6$ or $7$ hash (plain-text passwords are not accepted; "
                     "hash the file with mosquitto_passwd -U or lastmile passwd)")


def parse_password_file(text: str, path: str = "") -> dict[str, PasswordHash]:
    """Users and their hashes; ConfigError(file, line) on the first malformed line."""
    users: dict[str, PasswordHash] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ConfigError("expected user:hash", file=path, line=number)
        try:
            users[user] = parse_hash(hashed)
        except ValueError as exc:
            raise ConfigError(f"user {user!r}: {exc}", file=path, line=number) from None
    return users


def load_password_file(path: str | Path) -> dict[str, PasswordHash]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read password file: {exc.strerror}", file=str(path)) from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError("password file is not UTF-8", file=str(path)) from None
    return parse_password_file(text, str(path))


def hash_password(password: bytes, *, iterations: int = DEFAULT_ITERATIONS,
                  salt: bytes | None = None) -> PasswordHash:
    """A new ``$7$`` hash, as ``mosquitto_passwd`` makes by default."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password, salt, iterations, 64)
    return PasswordHash("7", salt, digest, iterations)


def check_username(user: str) -> None:
    if not user or ":" in user or any(c in user for c in "\r\n"):
        raise ValueError("a username must be non-empty and contain no ':' or line break")


def updated_lines(lines: Iterable[str], user: str, hashed: PasswordHash | None) -> list[str]:
    """The file's lines with ``user`` set to ``hashed`` (appended if new), or removed (None).

    Every other line (comments included) is kept as it was, in place.
    """
    out: list[str] = []
    done = False
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line.partition(":")[0] == user and not line.startswith("#"):
            if hashed is not None and not done:
                out.append(f"{user}:{hashed.encode()}")
            done = True
            continue
        out.append(line)
    if hashed is not None and not done:
        out.append(f"{user}:{hashed.encode()}")
    return out


def write_atomically(path: str | Path, lines: list[str]) -> None:
    """Temp file beside ``path``, fsync, rename: a reader sees the old file or the new one.

    An existing file keeps its mode; a new one is 0600 (it holds hashes).
    """
    target = Path(path)
    try:
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{line}\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
