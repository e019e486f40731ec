"""``lastmile passwd FILE USER``: ``mosquitto_passwd`` for Lastmile's password files.

Same file format and the same default hash (``$7$``, 101 iterations, 12-byte
salt), so the file also works for Mosquitto.  The file is rewritten atomically
(temp file, fsync, rename): a gateway re-reading it on change never sees half a
file.  Other lines, comments included, are kept as they were.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from gateway.auth.passwd import (
    DEFAULT_ITERATIONS,
    MAX_ITERATIONS,
    check_username,
    hash_password,
    parse_password_file,
    updated_lines,
    write_atomically,
)
from gateway.errors import ConfigError


def add_passwd_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "passwd", help="add, change or delete a user of a password file (mosquitto_passwd format)")
    p.add_argument("file", help="password file")
    p.add_argument("user", help="username")
    p.add_argument("password", nargs="?", default=None,
                   help="with -b only (visible to other users in ps: prefer --password-stdin)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-c", "--create", action="store_true",
                      help="create the file (an existing one is overwritten)")
    mode.add_argument("-D", "--delete", action="store_true", help="delete the user")
    p.add_argument("-b", "--batch", action="store_true",
                   help="take the password from the command line (as mosquitto_passwd -b)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.add_argument("-I", "--iterations", type=int, default=DEFAULT_ITERATIONS,
                   help=f"PBKDF2 iterations (default {DEFAULT_ITERATIONS}, as mosquitto_passwd)")
    p.set_defaults(func=main_passwd)


def _fail(message: str) -> int:
    print(f"lastmile passwd: {message}", file=sys.stderr)
    return 1


def _read_password(args: argparse.Namespace) -> bytes | str:
    """The password, or the reason there is none (as text)."""
    if args.batch:
        if args.password is None:
            return "-b needs the password as the third argument"
        return str(args.password).encode()
    if args.password is not None:
        return "a password argument needs -b (or use --password-stdin)"
    if args.password_stdin:
        return sys.stdin.buffer.readline().rstrip(b"\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Reenter password: ") != first:
        return "passwords do not match"
    return first.encode()


def main_passwd(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        check_username(args.user)
    except ValueError as exc:
        return _fail(str(exc))
    if not 1 <= args.iterations <= MAX_ITERATIONS:
        return _fail(f"-I must be 1..{MAX_ITERATIONS}")
    lines: list[str] = []
    if not args.create:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _fail(f"{path} does not exist (-c creates it)")
        except (OSError, UnicodeDecodeError) as exc:
            return _fail(f"cannot read {path}: {exc}")
        try:
            users = parse_password_file(text, str(path))
        except ConfigError as exc:  # rewriting it would keep a line nobody can use
            return _fail(f"{exc} (fix or remove that line first)")
        if args.delete and args.user not in users:
            return _fail(f"user {args.user!r} not found in {path}")
        lines = text.splitlines()
    if args.delete:
        write_atomically(path, updated_lines(lines, args.user, None))
        return 0
    password = _read_password(args)
    if isinstance(password, str):
        return _fail(password)
    if not password:
        return _fail("empty password")
    hashed = hash_password(password, iterations=args.iterations)
    write_atomically(path, updated_lines(lines, args.user, hashed))
    return 0
